"""The generation settings of each inference task, read from ``EvalConfig`` in one place.

``blip2 eval``, ``blip2 caption``, ``blip2 vqa`` and ``orchestration.api`` all take their prompt,
beam width, lengths and length penalty from here, so a caption or an answer is generated the same
way whichever surface asks for it (paper §4 / LAVIS: captions beam 5 with 8..30 new tokens after
"a photo of"; VQA beam 5, length penalty -1, 1..10 new tokens, a prompt per LLM family).
"""
from __future__ import annotations

from training.config import EvalConfig

VQA_PROMPTS = {"opt": "Question: {} Answer:", "t5": "Question: {} Short answer:"}


def fit_min_new_tokens(kwargs: dict) -> dict:
    """``kwargs`` with ``min_new_tokens`` lowered to ``max_new_tokens`` where it exceeds it (a
    shorter maximum wins over the default minimum)."""
    if "max_new_tokens" in kwargs:
        kwargs = {**kwargs, "min_new_tokens": min(kwargs.get("min_new_tokens", 0), kwargs["max_new_tokens"])}
    return kwargs


def caption_settings(cfg: EvalConfig) -> tuple[str, dict]:
    """``(prompt, generate kwargs)`` for captioning."""
    return cfg.caption_prompt, fit_min_new_tokens({"num_beams": cfg.num_beams, "max_new_tokens": cfg.max_new_tokens,
                                                   "min_new_tokens": cfg.caption_min_new_tokens})


def vqa_settings(cfg: EvalConfig, llm_family: str) -> tuple[str, dict]:
    """``(question template with one {}, generate kwargs)`` for VQA: ``eval.vqa_prompt`` when set,
    else the paper's prompt for the model's LLM family."""
    template = cfg.vqa_prompt or VQA_PROMPTS.get(llm_family)
    if template is None:
        raise ValueError(f"no VQA prompt for LLM family {llm_family!r}; set eval.vqa_prompt")
    return template, fit_min_new_tokens({"num_beams": cfg.vqa_num_beams, "max_new_tokens": cfg.vqa_max_new_tokens,
                                         "min_new_tokens": cfg.vqa_min_new_tokens,
                                         "length_penalty": cfg.vqa_length_penalty})
