"""Metric functions against hand-computed cases (ties, empty predictions, multi-caption images)."""
from __future__ import annotations

import math
import shutil

import numpy as np
import pytest

from training.evaluate.metrics import (caption_scores, retrieval_recall, simple_tokenize, tokenize_captions,
                                       vqa_accuracy, vqa_scores)
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
