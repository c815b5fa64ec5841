"""Metric functions against hand-computed cases (ties, empty predictions, multi-caption images), and
each benchmark's metric on its official-format fixture, scored by hand by the official scripts' rules."""
from __future__ import annotations

import math
import shutil

import numpy as np
import pytest

from tests.helpers.benchmarks import write_benchmark_sets
from training.evaluate.data import load_caption_annotations, load_gqa, load_vqa
from training.evaluate.metrics import (caption_scores, gqa_scores, nocaps_scores, retrieval_recall,
                                       simple_tokenize, tokenize_captions, vqa_accuracy, vqa_scores)
from training.evaluate.vqa_normalize import normalize_answer, process_punctuation

JAVA = shutil.which("java") is not None

# -- retrieval ----------------------------------------------------------------------------

# 3 images x 6 texts, 2 captions per image: image 0 -> texts 0,1; image 1 -> 2,3; image 2 -> 4,5
IMG2TXT = [[0, 1], [2, 3], [4, 5]]
TXT2IMG = [0, 0, 1, 1, 2, 2]


def test_recall_perfect_and_reversed():
    perfect = np.full((3, 6), 0.1)
    for i, caps in enumerate(IMG2TXT):
        perfect[i, caps] = 0.9
    r = retrieval_recall(perfect, IMG2TXT, TXT2IMG)
    assert r["txt_r1"] == r["img_r1"] == r["r_mean"] == 100.0
    worst = 1.0 - perfect
    r = retrieval_recall(worst, IMG2TXT, TXT2IMG, ks=(1, 4, 5))
    # image->text: the 4 other texts all score higher -> rank 4: miss at 1 and 4, hit at 5
    assert (r["txt_r1"], r["txt_r4"], r["txt_r5"]) == (0.0, 0.0, 100.0)
    # text->image: 2 other images score higher -> rank 2: hit at 4 and 5
    assert (r["img_r1"], r["img_r4"], r["img_r5"]) == (0.0, 100.0, 100.0)


def test_recall_any_caption_counts_for_image_to_text():
    s = np.array([
        # t0    t1    t2    t3    t4    t5
        [0.20, 0.95, 0.90, 0.10, 0.10, 0.10],  # img0: its caption t1 is first          -> rank 0
        [0.10, 0.10, 0.30, 0.80, 0.90, 0.85],  # img1: t3 behind t4, t5                   -> rank 2
        [0.50, 0.60, 0.70, 0.80, 0.40, 0.10],  # img2: best own caption t4 behind 4 texts -> rank 4
    ])
    r = retrieval_recall(s, IMG2TXT, TXT2IMG, ks=(1, 3, 5))
    assert r["txt_r1"] == pytest.approx(100 / 3)
    assert r["txt_r3"] == pytest.approx(200 / 3)
    assert r["txt_r5"] == 100.0
    # text->image (columns): t0: img2 .5 > img0 .2 -> rank 1; t1: .95 top -> 0; t2: img0 .9 > img1 .3 -> 1;
    # t3: img1 .8 ties img2 .8 -> 1 (ties count against); t4: img1 .9 > img2 .4 -> 1; t5: img1 .85 > .1 -> 1
    assert r["img_r1"] == pytest.approx(100 / 6)
    assert r["img_r3"] == 100.0
    assert r["txt_r_mean"] == pytest.approx((100 / 3 + 200 / 3 + 100) / 3)
    assert r["r_mean"] == pytest.approx((r["txt_r_mean"] + r["img_r_mean"]) / 2)


def test_recall_ties_count_against_the_model():
    const = np.zeros((3, 6))
    r = retrieval_recall(const, IMG2TXT, TXT2IMG, ks=(1, 4, 5))
    # i2t: 4 negatives tie with the best positive -> rank 4; t2i: 2 negatives tie -> rank 2
    assert (r["txt_r1"], r["txt_r4"], r["txt_r5"]) == (0.0, 0.0, 100.0)
    assert (r["img_r1"], r["img_r4"]) == (0.0, 100.0)
    # ties among an image's own captions do not hurt it
    s = np.zeros((3, 6))
    s[0, [0, 1]] = 1.0
    assert retrieval_recall(s, IMG2TXT, TXT2IMG, ks=(1,))["txt_r1"] == pytest.approx(100 / 3)


def test_recall_separate_t2i_matrix_and_bad_shapes():
    i2t = np.eye(3, 6)
    t2i = np.zeros((6, 3))
    t2i[np.arange(6), TXT2IMG] = 1.0
    r = retrieval_recall(i2t, IMG2TXT, TXT2IMG, scores_t2i=t2i, ks=(1,))
    assert r["img_r1"] == 100.0
    with pytest.raises(ValueError, match="shape mismatch"):
        retrieval_recall(np.zeros((3, 5)), IMG2TXT, TXT2IMG)
    with pytest.raises(ValueError, match="at least one caption"):
        retrieval_recall(np.zeros((2, 2)), [[0, 1], []], [0, 0])


# -- captioning ---------------------------------------------------------------------------


@pytest.mark.parametrize("tokenizer", ["simple", pytest.param("ptb", marks=pytest.mark.skipif(
    not JAVA, reason="java not installed: PTB tokenizer unavailable"))])
def test_bleu4_hand_computed(tokenizer):
    refs = {"1": ["A b c d e f."], "2": ["f g h i j"]}
    # image 1 alone: p1..p4 = 5/6, 4/5, 3/4, 2/3, brevity 1 -> BLEU-4 = (1/3)^(1/4)
    one = caption_scores({"1": refs["1"]}, {"1": "a b c d e g"}, tokenizer=tokenizer)
    assert one["bleu4"] == pytest.approx(100 * (1 / 3) ** 0.25, rel=1e-6)
    assert one["bleu1"] == pytest.approx(100 * 5 / 6, rel=1e-6)
    # corpus level: counts summed over images (image 2 is an exact 5-token match)
    both = caption_scores(refs, {"1": "a b c d e g", "2": "F G H I J!"}, tokenizer=tokenizer)
    expected = (10 / 11 * 8 / 9 * 6 / 7 * 4 / 5) ** 0.25
    assert both["bleu4"] == pytest.approx(100 * expected, rel=1e-6)
    assert both["tokenizer"] == tokenizer and both["images"] == 2 and both["missing"] == 0


def test_cider_hand_computed():
    # Two images, unit-count n-grams that each occur in one image only: idf = log(2) for every
    # n-gram, so each n with n-grams contributes cosine 1; "a b" has n = 1, 2 only:
    # CIDEr-D = 10 * (1 + 1 + 0 + 0) / 4 = 5 per image (100x: 500).
    refs = {"1": ["a b"], "2": ["c d"]}
    assert caption_scores(refs, {"1": "a b", "2": "c d"}, tokenizer="simple")["cider"] == pytest.approx(500.0)
    # 5-token captions have all four n-gram orders: 10 per image
    refs5 = {"1": ["a b c d e"], "2": ["f g h i j"]}
    assert caption_scores(refs5, {"1": "a b c d e", "2": "f g h i j"}, tokenizer="simple")["cider"] == pytest.approx(1000.0)


def test_empty_and_missing_predictions():
    refs = {"1": ["a b c d e"], "2": ["f g h i j"]}
    s = caption_scores(refs, {"1": "", "2": "f g h i j"}, tokenizer="simple")
    # image 1 contributes nothing: CIDEr = (0 + 10) / 2; BLEU: every n-gram of image 2 matches,
    # brevity penalty exp(1 - 10/5)
    assert s["cider"] == pytest.approx(500.0)
    assert s["bleu4"] == pytest.approx(100 * math.exp(-1), rel=1e-6)
    missing = caption_scores(refs, {"2": "f g h i j"}, tokenizer="simple")
    assert missing["missing"] == 1 and missing["cider"] == pytest.approx(500.0)
    assert caption_scores(refs, {}, tokenizer="simple")["bleu4"] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="no reference"):
        caption_scores({}, {})


@pytest.mark.skipif(not JAVA, reason="java not installed: PTB tokenizer unavailable")
def test_simple_tokenizer_matches_ptb_on_captions():
    caps = {"1": ["A man's dog -- wasn't there; they'll see: 1,000 cats?"],
            "2": ["Don't go there!  It's (really) 3.5 m-long... ok"], "3": [""], "4": ["Two dogs, on a couch."]}
    ptb, _ = tokenize_captions(caps, "ptb")
    assert ptb == {k: [simple_tokenize(c) for c in v] for k, v in caps.items()}


REFS = {"1": ["a red circle above a blue square"], "2": ["a green triangle"]}
PREDS = {"1": "a red circle above a square", "2": "a green triangle"}


def test_spice_runs_or_says_why_not():
    s = caption_scores(REFS, PREDS, tokenizer="simple", extra=["spice"])
    # SPICE needs Stanford CoreNLP models that pycocoevalcap would download: we never fetch them
    assert ("spice" in s["skipped"] and s["skipped"]["spice"]) or 0 <= s["spice"] <= 100
    with pytest.raises(ValueError, match="unknown caption metric"):
        caption_scores(REFS, PREDS, tokenizer="simple", extra=["rouge"])


@pytest.mark.slow
@pytest.mark.skipif(not JAVA, reason="java not installed: METEOR cannot run (reported as skipped)")
def test_meteor_runs_with_java():
    s = caption_scores(REFS, PREDS, tokenizer="simple", extra=["meteor"])
    assert 0 < s["meteor"] < 100 and "meteor" not in s["skipped"]


# -- VQA ----------------------------------------------------------------------------------


def test_answer_normalisation():
    assert normalize_answer("Two.") == "2"
    assert normalize_answer("  the  Dog\n") == "dog"
    assert normalize_answer("an apple") == "apple"
    assert normalize_answer("dont know") == "don't know"
    assert normalize_answer("yes!") == "yes"
    assert normalize_answer("3.5") == "3.5"             # a period before a digit stays
    assert normalize_answer("1,000") == "1000"           # a digit-comma-digit removes punctuation outright
    assert normalize_answer("black/white") == "black white"
    assert normalize_answer("black / white") == "black white"
    assert process_punctuation("red, blue") == "red blue"


def test_vqa_accuracy_hand_computed():
    ten = ["2"] * 10
    assert vqa_accuracy("2", ten) == 1.0
    assert vqa_accuracy("two", ten) == 1.0               # number words -> digits in the prediction
    # 2 of 10 humans said "cat": leaving out one of those leaves 1 -> 1/3 (2 subsets), the other 8
    # subsets keep both -> 2/3; mean = (2 * 1/3 + 8 * 2/3) / 10 = 0.6
    assert vqa_accuracy("cat", ["cat", "cat"] + ["dog"] * 8) == pytest.approx(0.6)
    # 3 humans: 3 subsets see 2 (2/3), 7 subsets see 3 (1) -> (3 * 2/3 + 7) / 10 = 0.9
    assert vqa_accuracy("cat", ["cat"] * 3 + ["dog"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("cat", ["cat"] * 4 + ["dog"] * 6) == 1.0
    assert vqa_accuracy("", ["cat"] * 10) == 0.0          # empty prediction
    # the official quirk: human answers get only the punctuation step, the prediction all steps
    assert vqa_accuracy("Yes.", ["yes"] * 5 + ["yes!"] * 5) == 1.0
    with pytest.raises(ValueError):
        vqa_accuracy("x", [])


def test_vqa_scores_per_type_and_missing():
    questions = {"1": {"answers": ["yes"] * 10, "answer_type": "yes/no"},
                 "2": {"answers": ["2"] * 10, "answer_type": "number"},
                 "3": {"answers": ["cat"] * 3 + ["dog"] * 7, "answer_type": "other"}}
    s = vqa_scores({"1": "yes", "2": "3", "3": "cat"}, questions)
    assert s["accuracy"] == pytest.approx(100 * (1 + 0 + 0.9) / 3)
    assert s["per_answer_type"] == pytest.approx({"number": 0.0, "other": 90.0, "yes/no": 100.0})
    s = vqa_scores({"1": "yes"}, questions)
    assert s["missing"] == 2 and s["accuracy"] == pytest.approx(100 / 3)



# -- each benchmark on its official-format fixture ----------------------------------------


@pytest.fixture(scope="module")
def sets(corpus, tmp_path_factory):
    return write_benchmark_sets(corpus, tmp_path_factory.mktemp("benchmarks"))


def _vqa_fixture(sets, name) -> dict:
    qs = load_vqa(str(sets[name]["questions"]), str(sets[name]["annotations"]))
    return {q.question_id: {"answers": q.answers, "answer_type": q.answer_type} for q in qs}


def test_vqav2_fixture_by_the_official_rules(sets):
    """vqaEval.py: the prediction gets punctuation + digit/article/contraction steps; the 10 human
    answers only the punctuation step, and only when they are not all the same; the accuracy is
    min(#others matching / 3, 1) averaged over the 10 leave-one-out subsets."""
    questions = _vqa_fixture(sets, "vqav2")
    predictions = ["two", "A dog!", "dont", "1000", "1,000", "Yes."]
    expected = [
        0.6,   # "two" -> "2"; the 5 humans' "two" never match (no digit step on them): 2 x 1/3 + 8 x 2/3
        0.9,   # "A dog!" -> "dog"; "the dog" keeps its article: 3 "dog" -> 3 x 2/3 + 7 x 1
        0.3,   # "dont" -> "don't": 1 human -> 9 subsets x 1/3, 1 x 0
        1.0,   # humans differ: "1,000" -> "1000" (digit-comma-digit drops the comma): 7 match
        0.0,   # humans all say "1,000": left as is, while the prediction becomes "1000"
        1.0,   # "Yes." -> "yes" (a period not before a digit goes)
    ]
    ids = list(questions)
    s = vqa_scores(dict(zip(ids, predictions)), questions)
    assert s["accuracy"] == pytest.approx(100 * sum(expected) / 6)          # 63.33
    assert s["per_answer_type"] == pytest.approx({"number": 100 * 1.6 / 3, "other": 60.0, "yes/no": 100.0})
    for qid, pred, acc in zip(ids, predictions, expected):
        assert vqa_accuracy(pred, questions[qid]["answers"]) == pytest.approx(acc), pred


def test_okvqa_fixture_by_the_official_rules(sets):
    """OK-VQA is scored by the VQA script on its 10 answers (5 annotators, each listed twice)."""
    questions = _vqa_fixture(sets, "okvqa")
    # "Surfing": 4 of 10 -> 1; "racing": 2 of 10 -> 0.6; "the beach" -> "beach": 2 of 10 -> 0.6
    s = vqa_scores(dict(zip(questions, ["Surfing", "racing", "the beach"])), questions)
    assert s["accuracy"] == pytest.approx(100 * 2.2 / 3)
    s = vqa_scores(dict(zip(questions, ["surf.", "horse race", "the ocean"])), questions)
    assert s["accuracy"] == pytest.approx(100 * (1.0 + 0.6 + 1.0) / 3)   # 4, 2 and 6 of 10


def test_gqa_fixture_exact_match(sets):
    """GQA's eval.py: 1 if the prediction equals the answer; LAVIS first normalises the prediction."""
    answers = {q.question_id: q.answers[0] for q in load_gqa(str(sets["gqa"]["questions"]))}
    predictions = dict(zip(answers, ["dog", "The dog.", "Yes", "right"]))
    s = gqa_scores(predictions, answers)
    assert s["accuracy"] == pytest.approx(75.0)      # dog, dog, yes match; right != left
    assert s["accuracy_raw"] == pytest.approx(25.0)  # only the literal "dog"
    del predictions[next(iter(answers))]
    assert gqa_scores(predictions, answers)["missing"] == 1


def test_nocaps_scores_each_domain_on_its_own(sets):
    images = load_caption_annotations(str(sets["nocaps"]["annotations"]))
    refs = {i.image_id: i.captions for i in images}
    domains = {i.image_id: i.domain for i in images}
    # in-domain: a reference word for word (BLEU-4 100); near: a shortened one; out: unrelated
    preds = {}
    for i in images:
        preds[i.image_id] = {"in-domain": i.captions[1], "near-domain": " ".join(i.captions[0].split()[:3]),
                             "out-domain": "zebra zebra zebra zebra"}[i.domain]
    s = nocaps_scores(refs, preds, domains, tokenizer="simple")
    assert set(s["per_domain"]) == {"in-domain", "near-domain", "out-domain"}
    assert s["in-domain_bleu4"] == pytest.approx(100.0)
    assert s["out-domain_bleu4"] == pytest.approx(0.0, abs=1e-6) and s["out-domain_cider"] == pytest.approx(0.0)
    for domain in ("in-domain", "near-domain", "out-domain"):
        ids = [k for k in refs if domains[k] == domain]
        alone = caption_scores({k: refs[k] for k in ids}, {k: preds[k] for k in ids}, tokenizer="simple")
        assert s[f"{domain}_cider"] == pytest.approx(alone["cider"])      # CIDEr's idf from that domain alone
    overall = caption_scores(refs, preds, tokenizer="simple")
    assert (s["cider"], s["bleu4"]) == pytest.approx((overall["cider"], overall["bleu4"]))
    assert s["in-domain_cider"] > s["near-domain_cider"] > s["out-domain_cider"]
    with pytest.raises(ValueError, match="no NoCaps domain"):
        nocaps_scores(refs, preds, {}, tokenizer="simple")
