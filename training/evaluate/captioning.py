"""Captioning with a stage-2 model (COCO Karpathy test, NoCaps val; paper Table 3): the paper's
prompt and beam settings, then BLEU-4 / CIDEr (and METEOR / SPICE when they can run) against the
reference captions, per NoCaps domain when the images carry one."""
from __future__ import annotations

import time

import torch

from training.config import EvalConfig
from training.evaluate.data import CaptionImage, ImageFolder, model_device, preprocess
from training.evaluate.generation import caption_settings
from training.evaluate.metrics import caption_scores, nocaps_scores


def strip_prompt(text: str, prompt: str) -> str:
    """The caption without the prompt, in case a model echoes it."""
    text = text.strip()
    if prompt and text.lower().startswith(prompt.lower()):
        text = text[len(prompt):].strip()
    return text


@torch.no_grad()
def generate_captions(model, images: list[CaptionImage], folder: ImageFolder, cfg: EvalConfig) -> dict[str, str]:
    """{image_id: caption}; beam ``cfg.num_beams``, ``caption_min_new_tokens``..``max_new_tokens`` new tokens."""
    prompt, gen = caption_settings(cfg)
    size = model.cfg.image_size
    out = {}
    for s in range(0, len(images), cfg.batch_size):
        chunk = images[s:s + cfg.batch_size]
        pixels = preprocess([folder.load(i.file) for i in chunk], size).to(model_device(model))
        texts = model.generate(pixels, prompt, **gen)
        out.update({i.image_id: strip_prompt(t, prompt) for i, t in zip(chunk, texts)})
    return out


def evaluate_captioning(model, images: list[CaptionImage], folder: ImageFolder, cfg: EvalConfig) -> dict:
    """Scores (x100) plus the generated captions, so a results file can be re-scored or inspected."""
    t0 = time.perf_counter()
    predictions = generate_captions(model, images, folder, cfg)
    t1 = time.perf_counter()
    refs = {i.image_id: i.captions for i in images}
    if any(i.domain for i in images):  # NoCaps
        scores = nocaps_scores(refs, predictions, {i.image_id: i.domain for i in images if i.domain},
                               tokenizer=cfg.tokenizer, extra=cfg.caption_metrics)
    else:
        scores = caption_scores(refs, predictions, tokenizer=cfg.tokenizer, extra=cfg.caption_metrics)
    return {**scores, "prompt": cfg.caption_prompt, "num_beams": cfg.num_beams,
            "seconds": {"generate": t1 - t0, "score": time.perf_counter() - t1},
            "predictions": [{"image_id": k, "caption": v} for k, v in predictions.items()]}
