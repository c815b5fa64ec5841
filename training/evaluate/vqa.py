"""Zero-shot VQAv2 with a stage-2 model (paper §4): "Question: {} Answer:" for OPT,
"Question: {} Short answer:" for FlanT5, beam 5, length penalty -1, then the official accuracy."""
from __future__ import annotations

import time

import torch

from training.config import EvalConfig
from training.evaluate.data import ImageFolder, VqaQuestion, model_device, preprocess
from training.evaluate.metrics import vqa_scores

PROMPTS = {"opt": "Question: {} Answer:", "t5": "Question: {} Short answer:"}


def vqa_prompt(model, cfg: EvalConfig) -> str:
    """``cfg.vqa_prompt`` when set, else the paper's prompt for the model's LLM family."""
    if cfg.vqa_prompt:
        return cfg.vqa_prompt
    family = getattr(getattr(model, "cfg", None), "llm_family", "opt")
    if family not in PROMPTS:
        raise ValueError(f"no VQA prompt for LLM family {family!r}; set eval.vqa_prompt")
    return PROMPTS[family]


@torch.no_grad()
def answer_questions(model, questions: list[VqaQuestion], folder: ImageFolder, cfg: EvalConfig) -> dict[str, str]:
    """{question_id: answer}."""
    template = vqa_prompt(model, cfg)
    size = model.cfg.image_size
    out = {}
    for s in range(0, len(questions), cfg.batch_size):
        chunk = questions[s:s + cfg.batch_size]
        pixels = preprocess([folder.load(q.file) for q in chunk], size).to(model_device(model))
        answers = model.generate(pixels, [template.format(q.question) for q in chunk],
                                 num_beams=cfg.vqa_num_beams, max_new_tokens=cfg.vqa_max_new_tokens,
                                 length_penalty=cfg.vqa_length_penalty)
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
