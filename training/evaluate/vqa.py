"""Zero-shot VQAv2 with a stage-2 model (paper §4): "Question: {} Answer:" for OPT,
"Question: {} Short answer:" for FlanT5, beam 5, length penalty -1, then the official accuracy."""
from __future__ import annotations

import time

import torch

from training.config import EvalConfig
from training.evaluate.data import ImageFolder, VqaQuestion, model_device, preprocess
from training.evaluate.generation import vqa_settings
from training.evaluate.metrics import vqa_scores


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


def evaluate_vqa(model, questions: list[VqaQuestion], folder: ImageFolder, cfg: EvalConfig) -> dict:
    scored = [q for q in questions if q.answers]
    if not scored:
        raise ValueError("no question carries human answers (test-dev?): nothing to score")
    t0 = time.perf_counter()
    predictions = answer_questions(model, questions, folder, cfg)
    t1 = time.perf_counter()
    scores = vqa_scores(predictions, {q.question_id: {"answers": q.answers, "answer_type": q.answer_type}
                                      for q in scored})
    return {**scores, "prompt": vqa_prompt(model, cfg), "num_beams": cfg.vqa_num_beams,
            "length_penalty": cfg.vqa_length_penalty, "seconds": {"generate": t1 - t0},
            "predictions": [{"question_id": k, "answer": v} for k, v in predictions.items()]}
