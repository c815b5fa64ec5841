"""Metric functions: pure, no model, no I/O beyond pycocoevalcap's Java helpers.

- :func:`retrieval_recall` - R@k both directions from an image x text score matrix, COCO-style
  (several captions per image; image->text is a hit if *any* of its captions ranks within k).
- :func:`caption_scores` - BLEU-4 and CIDEr(-D) through pycocoevalcap; METEOR/SPICE when they can run.
- :func:`nocaps_scores` - :func:`caption_scores` per NoCaps domain and overall.
- :func:`vqa_accuracy` / :func:`vqa_scores` - the official VQAv2 (and OK-VQA) accuracy.
- :func:`gqa_scores` - GQA's exact match.
"""
from __future__ import annotations

import os
import re
import shutil
from collections import defaultdict
from typing import Sequence

import numpy as np

from training.evaluate.vqa_normalize import normalize_answer, process_punctuation, strip_whitespace

NOCAPS_DOMAINS = ("in-domain", "near-domain", "out-domain")

# -- retrieval ----------------------------------------------------------------------------


def _ranks(scores: np.ndarray, positives: list[Sequence[int]]) -> np.ndarray:
    """0-based rank of the best positive of each row.

    Ties count against the model: the rank is the number of *negatives* scoring at least as high
    as the row's best positive, so a constant score matrix scores 0, never 100.
    """
    ranks = np.empty(len(positives), dtype=np.int64)
    for i, pos in enumerate(positives):
        row = scores[i]
        mask = np.zeros(row.shape[0], dtype=bool)
        mask[list(pos)] = True
        best = row[mask].max()
        ranks[i] = int(np.count_nonzero(row[~mask] >= best))
    return ranks


def retrieval_recall(scores_i2t: np.ndarray, img2txt: list[Sequence[int]], txt2img: Sequence[int],
                     scores_t2i: np.ndarray | None = None, ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Recall@k in percent, both directions.

    scores_i2t: float [n_images, n_texts]; higher = better match.
    img2txt: for each image the indices of its captions; txt2img: for each text its image.
    scores_t2i: float [n_texts, n_images] when the text->image scores differ from the transpose
        (the ITM re-rank fills different shortlists per direction); default ``scores_i2t.T``.
    Returns {"txt_r1", "txt_r5", "txt_r10", "txt_r_mean", "img_r1", ..., "img_r_mean", "r_mean"}
    (``txt_*`` = image->text, LAVIS naming).
    """
    scores_i2t = np.asarray(scores_i2t, dtype=np.float64)
    scores_t2i = scores_i2t.T if scores_t2i is None else np.asarray(scores_t2i, dtype=np.float64)
    n_img, n_txt = scores_i2t.shape
    if scores_t2i.shape != (n_txt, n_img) or len(img2txt) != n_img or len(txt2img) != n_txt:
        raise ValueError(f"shape mismatch: i2t {scores_i2t.shape}, t2i {scores_t2i.shape}, "
                         f"{len(img2txt)} images with captions, {len(txt2img)} texts")
    if n_img == 0 or n_txt == 0:
        raise ValueError("retrieval needs at least one image and one text")
    if any(len(p) == 0 for p in img2txt):
        raise ValueError("every image needs at least one caption")
    i2t = _ranks(scores_i2t, img2txt)
    t2i = _ranks(scores_t2i, [[j] for j in txt2img])
    out = {}
    for prefix, ranks in (("txt", i2t), ("img", t2i)):
        for k in ks:
            out[f"{prefix}_r{k}"] = 100.0 * float(np.mean(ranks < k))
        out[f"{prefix}_r_mean"] = float(np.mean([out[f"{prefix}_r{k}"] for k in ks]))
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out


# -- captioning ---------------------------------------------------------------------------
# The punctuation pycocoevalcap's PTB tokenizer removes after tokenising.
_PTB_PUNCT = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--",
              "...", ";"}
_SIMPLE_TOKEN = re.compile(r"n't|'(?:s|re|ll|ve|d|m)\b|[0-9]+(?:[,.][0-9]+)+|[a-z0-9]+(?:[-.][a-z0-9]+)*|\.\.\.|--|[^\sa-z0-9]")
_CLITIC = re.compile(r"([a-z])(n't)\b")
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "{": "-lcb-", "}": "-rcb-", "[": "-lsb-", "]": "-rsb-"}


def java_available() -> bool:
    return shutil.which("java") is not None


def simple_tokenize(text: str) -> str:
    """Fallback when Java is absent: lower-case, split words / clitics / punctuation, drop the
    punctuation pycocoevalcap's PTB tokenizer drops. Matches PTB on plain captions; may differ
    on rare constructs (URLs, brackets), so scores are marked ``tokenizer: simple``."""
    text = _CLITIC.sub(r"\1 \2", strip_whitespace(text).lower())
    tokens = [_BRACKETS.get(t, t) for t in _SIMPLE_TOKEN.findall(text)]
    return " ".join(t for t in tokens if t not in _PTB_PUNCT)


def tokenize_captions(captions: dict, tokenizer: str = "auto") -> tuple[dict, str]:
    """{id: [str, ...]} → ({id: [tokenised str, ...]}, tokenizer used: "ptb" | "simple")."""
    use_ptb = tokenizer == "ptb" or (tokenizer == "auto" and java_available())
    if use_ptb:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        # PTBTokenizer expects {id: [{"caption": str}]}; an empty caption still yields one line.
        return PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()}), "ptb"
    return {k: [simple_tokenize(c) for c in v] for k, v in captions.items()}, "simple"


def _spice_models_present() -> bool:
    import pycocoevalcap.spice as spice

    return os.path.exists(os.path.join(os.path.dirname(spice.__file__), "lib", "stanford-corenlp-3.6.0.jar"))


def caption_scores(references: dict, predictions: dict, tokenizer: str = "auto",
                   extra: Sequence[str] = ()) -> dict:
    """Corpus BLEU-1..4 and CIDEr-D (x100, COCO convention) of ``predictions`` against ``references``.

    references: {image_id: [caption, ...]} (one or more each); predictions: {image_id: caption}.
    An image without a prediction is scored with an empty caption (counted in ``missing``), so
    leaving images out never raises a score. ``extra`` may hold "meteor" / "spice": each runs only
    when it can (Java; SPICE also needs Stanford CoreNLP 3.6.0 models present locally - we never
    let pycocoevalcap download them) and is otherwise listed in ``skipped`` with the reason.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if not references:
        raise ValueError("no reference captions")
    unknown = sorted(set(extra) - {"meteor", "spice"})
    if unknown:
        raise ValueError(f"unknown caption metric {unknown[0]!r} (meteor, spice)")
    ids = sorted(references)
    missing = [i for i in ids if i not in predictions]
    gts, tok = tokenize_captions({i: list(references[i]) for i in ids}, tokenizer)
    res, _ = tokenize_captions({i: [predictions.get(i) or ""] for i in ids}, tok)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    out = {f"bleu{n + 1}": 100.0 * float(b) for n, b in enumerate(bleu)}
    out["cider"] = 100.0 * float(cider)
    skipped = {}
    for name in extra:
        if not java_available():
            skipped[name] = "java not found"
        elif name == "spice" and not _spice_models_present():
            skipped[name] = "Stanford CoreNLP 3.6.0 models are not installed next to pycocoevalcap's SPICE jar"
        elif name == "meteor":
            from pycocoevalcap.meteor.meteor import Meteor

            out["meteor"] = 100.0 * float(Meteor().compute_score(gts, res)[0])
        else:
            from pycocoevalcap.spice.spice import Spice

            out["spice"] = 100.0 * float(Spice().compute_score(gts, res)[0])
    out.update(images=len(ids), missing=len(missing), tokenizer=tok, skipped=skipped)
    return out


def nocaps_scores(references: dict, predictions: dict, domains: dict, tokenizer: str = "auto",
                  extra: Sequence[str] = ()) -> dict:
    """:func:`caption_scores` on each NoCaps domain's images and on all of them, each subset scored
    on its own (CIDEr's document frequencies from that subset's references, as BLIP / LAVIS' NoCaps
    evaluation does with one ground-truth file per domain).
    domains: {image_id: "in-domain" | "near-domain" | "out-domain"}.

    Returns the overall scores at the top level, ``per_domain`` {domain: scores} and flat
    ``"{domain}_{metric}"`` keys for the table.
    """
    missing = sorted(set(references) - set(domains))
    if missing:
        raise ValueError(f"{len(missing)} images have no NoCaps domain (e.g. {missing[0]})")
    out = caption_scores(references, predictions, tokenizer, extra)
    per_domain = {}
    for domain in NOCAPS_DOMAINS:
        ids = [i for i in references if domains[i] == domain]
        if not ids:
            continue
        scores = caption_scores({i: references[i] for i in ids}, predictions, out["tokenizer"], extra)
        per_domain[domain] = scores
        out.update({f"{domain}_{k}": v for k, v in scores.items() if isinstance(v, float)})
    out["per_domain"] = per_domain
    return out


# -- VQA ----------------------------------------------------------------------------------


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """The official VQAv2 accuracy of one prediction against the human answers (10 in VQAv2).

    The prediction is normalised (punctuation, number words, articles, contractions); the human
    answers get the punctuation step when they disagree, as in the official script. Each answer is
    left out in turn and ``min(#matching others / 3, 1)`` is averaged over the 10 subsets of 9.
    """
    if not answers:
        raise ValueError("a question needs at least one human answer")
    pred = normalize_answer(prediction or "")
    gts = [strip_whitespace(a) for a in answers]
    if len(set(gts)) > 1:
        gts = [process_punctuation(a) for a in gts]
    accs = [min(1.0, sum(a == pred for a in gts[:i] + gts[i + 1:]) / 3) for i in range(len(gts))]
    return float(np.mean(accs))


def vqa_scores(predictions: dict, questions: dict) -> dict:
    """Overall and per-answer-type accuracy (x100).

    predictions: {question_id: answer}; questions: {question_id: {"answers": [str x10],
    "answer_type": str (optional)}}. A question without a prediction scores 0 (counted in ``missing``).
    """
    if not questions:
        raise ValueError("no questions to score")
    per_type: dict[str, list[float]] = defaultdict(list)
    accs = []
    for qid, q in questions.items():
        acc = vqa_accuracy(predictions.get(qid, ""), q["answers"])
        accs.append(acc)
        per_type[q.get("answer_type") or "all"].append(acc)
    out = {"accuracy": 100.0 * float(np.mean(accs)),
           "per_answer_type": {t: 100.0 * float(np.mean(v)) for t, v in sorted(per_type.items())},
           "questions": len(questions), "missing": sum(qid not in predictions for qid in questions)}
    return out


def gqa_scores(predictions: dict, answers: dict) -> dict:
    """Exact-match accuracy (x100) against GQA's one answer per question.

    ``accuracy``: the prediction normalised by the VQA rules first (:func:`normalize_answer`), as
    LAVIS scores BLIP-2's generated answers; ``accuracy_raw``: GQA's own eval.py
    (``prediction == answer``; the prediction only stripped). GQA's answers are already lower-case,
    article-free words, so the two differ only where the model writes "The dog." for "dog".
    predictions: {question_id: answer}; answers: {question_id: ground-truth answer}.
    """
    if not answers:
        raise ValueError("no questions to score")
    norm = [normalize_answer(predictions.get(q, "")) == a for q, a in answers.items()]
    raw = [strip_whitespace(predictions.get(q, "")) == a for q, a in answers.items()]
    return {"accuracy": 100.0 * float(np.mean(norm)), "accuracy_raw": 100.0 * float(np.mean(raw)),
            "questions": len(answers), "missing": sum(q not in predictions for q in answers)}
