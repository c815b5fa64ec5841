"""Zero-shot VQA with a stage-2 model (paper §4.1, Table 2): "Question: {} Answer:" for OPT,
"Question: {} Short answer:" for FlanT5, beam 5, length penalty -1; then the official VQAv2 /
OK-VQA accuracy or GQA's exact match, and the answers in each benchmark's official results format."""
from __future__ import annotations

import time

import torch

from training.config import EvalConfig
from training.evaluate.data import ImageFolder, VqaQuestion, model_device, preprocess
from training.evaluate.generation import vqa_settings
from training.evaluate.metrics import gqa_scores, vqa_scores

METRICS = ("vqa", "gqa")


def vqa_prompt(model, cfg: EvalConfig) -> str:
    """``cfg.vqa_prompt`` when set, else the paper's prompt for the model's LLM family."""
    return vqa_settings(cfg, model.cfg.llm_family)[0]


@torch.no_grad()
def answer_questions(model, questions: list[VqaQuestion], folder: ImageFolder, cfg: EvalConfig) -> dict[str, str]:
    """{question_id: answer}."""
    template, gen = vqa_settings(cfg, model.cfg.llm_family)
    size = model.cfg.image_size
    out = {}
    for s in range(0, len(questions), cfg.batch_size):
        chunk = questions[s:s + cfg.batch_size]
        pixels = preprocess([folder.load(q.file) for q in chunk], size).to(model_device(model))
        answers = model.generate(pixels, [template.format(q.question) for q in chunk], **gen)
        out.update({q.question_id: a.strip() for q, a in zip(chunk, answers)})
    return out


def official_results(predictions: dict[str, str], metric: str = "vqa") -> list[dict]:
    """Answers as the benchmark's own tools read them: the VQA evaluation server (VQAv2 test-dev,
    also OK-VQA's script) ``[{"question_id": int, "answer"}]``; GQA's eval.py
    ``[{"questionId": str, "prediction"}]``."""
    if metric == "gqa":
        return [{"questionId": q, "prediction": a} for q, a in predictions.items()]
    return [{"question_id": int(q) if q.isdigit() else q, "answer": a} for q, a in predictions.items()]


def evaluate_vqa(model, questions: list[VqaQuestion], folder: ImageFolder, cfg: EvalConfig,
                 metric: str = "vqa") -> dict:
    """metric: "vqa" (VQAv2 / OK-VQA accuracy over the human answers) | "gqa" (exact match)."""
    if metric not in METRICS:
        raise ValueError(f"unknown VQA metric {metric!r} ({', '.join(METRICS)})")
    scored = [q for q in questions if q.answers]
    if not scored:
        raise ValueError("no question carries human answers (test-dev?): nothing to score")
    t0 = time.perf_counter()
    predictions = answer_questions(model, questions, folder, cfg)
    t1 = time.perf_counter()
    if metric == "gqa":
        scores = gqa_scores(predictions, {q.question_id: q.answers[0] for q in scored})
    else:
        scores = vqa_scores(predictions, {q.question_id: {"answers": q.answers, "answer_type": q.answer_type}
                                          for q in scored})
    return {**scores, "prompt": vqa_prompt(model, cfg), "num_beams": cfg.vqa_num_beams,
            "length_penalty": cfg.vqa_length_penalty, "seconds": {"generate": t1 - t0},
            "metric": metric, "predictions": [{"question_id": k, "answer": v} for k, v in predictions.items()]}
