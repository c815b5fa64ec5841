"""One-line inference, in the spirit of mmpretrain's ``inference_model``::

    from orchestration import api
    api.caption("cat.jpg", model="runs/stage2-hf")                  # {'pred_caption': 'a cat on a sofa'}
    api.vqa("cat.jpg", "what colour is the cat?", model="runs/stage2-hf")   # {'pred_answer': 'black'}

``model`` is one of our stage-2 checkpoints, a plain HF ``Blip2ForConditionalGeneration``
directory (local or s3://), or a LAVIS stage-2 state dict file (``.pth``/``.safetensors``; it holds
only the trained weights, so pass ``config=ModelConfig(vision_path=..., llm_path=...)``).
``image`` is a path, a PIL image or an ``HxWx3`` uint8 array, or a list of them (then a list of
results comes back). The defaults are ``blip2 eval``'s (``EvalConfig``, paper §4 / LAVIS): prompt
"a photo of", beam 5 and 8..30 new tokens for captions; "Question: {} Answer:" (OPT) /
"Question: {} Short answer:" (FlanT5), beam 5, length penalty -1 and 1..10 new tokens for VQA.
``settings=EvalConfig(...)`` changes them; every generation keyword of ``transformers`` overrides them.
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@functools.lru_cache(maxsize=2)  # one-liners in a loop must not reload the model every call
def _load(model: str, device: str, config_items: tuple):
    import torch

    from training.config import ModelConfig
    from training.stage2 import Blip2Stage2

    overrides = dict(config_items)
    if device == "cpu":  # fp16/bf16 kernels are slow or missing on CPU
        overrides.update(frozen_dtype="float32", llm_dtype="float32")
    if Path(model).is_file():
        cfg = dataclasses.replace(ModelConfig(), **overrides)
        loaded = Blip2Stage2.from_lavis(model, cfg)
    else:
        known = {f.name for f in dataclasses.fields(ModelConfig)}
        loaded = Blip2Stage2.from_pretrained(model, **{k: v for k, v in overrides.items() if k in known})
    return loaded.to(torch.device(device)).eval()


def load_model(model: str | Path, device: str | None = None, config=None, **overrides):
    """The cached ``Blip2Stage2`` for ``model`` on ``device``; ``config`` (a ModelConfig) is needed
    for LAVIS state-dict files only; ``overrides`` replace ModelConfig fields (e.g. ``llm_dtype``)."""
    items = dataclasses.asdict(config) if config is not None else {}
    if config is not None and not Path(str(model)).is_file():
        items = {}  # a checkpoint directory carries its own config
    items.update(overrides)
    return _load(str(model), device or default_device(), tuple(sorted(items.items())))


def _settings(settings):
    from training.config import EvalConfig

    return settings if settings is not None else EvalConfig()


def load_images(image) -> list:
    """Path / PIL image / uint8 array (or a list of them) → RGB PIL images; a clear error otherwise."""
    import numpy as np
    from PIL import Image

    from pipelines.images import IMAGE_FORMATS

    images = image if isinstance(image, (list, tuple)) else [image]
    out = []
    for img in images:
        if isinstance(img, (str, Path)):
            try:
                with Image.open(img, formats=IMAGE_FORMATS) as f:
                    out.append(f.convert("RGB"))
            except (OSError, ValueError) as e:
                raise ValueError(f"cannot read image {str(img)!r}: {e}") from None
        elif isinstance(img, Image.Image):
            out.append(img.convert("RGB"))
        elif isinstance(img, np.ndarray) and img.ndim == 3 and img.shape[-1] in (3, 4):
            out.append(Image.fromarray(np.ascontiguousarray(img[..., :3]).astype(np.uint8)))
        else:
            raise ValueError(f"image must be a path, a PIL image or an HxWx3 array, got {type(img).__name__}")
    return out


def _run(model, images, prompts, defaults, generate_kwargs):
    import torch

    from training.evaluate.generation import fit_min_new_tokens

    kwargs = {**defaults, **generate_kwargs}
    if "min_new_tokens" not in generate_kwargs:  # a shorter max given alone lowers the default min
        kwargs = fit_min_new_tokens(kwargs)
    pixel_values = model.preprocess(images).to(model.query_tokens.device)
    with torch.no_grad():
        return model.generate(pixel_values, prompts, **kwargs)


def caption(image, model: str | Path, prompt: str | None = None, device: str | None = None, config=None,
            settings=None, **generate_kwargs) -> dict | list[dict]:
    """``{"pred_caption": str}`` per image: the model's continuation of ``prompt``. ``settings`` (an
    ``EvalConfig``) gives the prompt and generation defaults, as ``blip2 eval`` uses them."""
    from training.evaluate.generation import caption_settings

    default_prompt, defaults = caption_settings(_settings(settings))
    prompt = default_prompt if prompt is None else prompt
    images = load_images(image)
    blip2 = load_model(model, device, config)
    texts = _run(blip2, images, [prompt] * len(images), defaults, generate_kwargs)
    results = [{"pred_caption": t} for t in texts]
    return results if isinstance(image, (list, tuple)) else results[0]


def vqa(image, question: str | list[str], model: str | Path, prompt: str | None = None, device: str | None = None,
        config=None, settings=None, **generate_kwargs) -> dict | list[dict]:
    """``{"pred_answer": str}`` per image; ``prompt`` is a template with one ``{}`` for the question
    (default: ``settings.vqa_prompt``, else the paper's, by LLM family)."""
    from training.evaluate.generation import vqa_settings

    images = load_images(image)
    questions = [question] * len(images) if isinstance(question, str) else list(question)
    if len(questions) != len(images):
        raise ValueError(f"{len(questions)} questions for {len(images)} images")
    blip2 = load_model(model, device, config)
    template, defaults = vqa_settings(_settings(settings), blip2.cfg.llm_family)
    template = prompt or template
    answers = _run(blip2, images, [template.format(q) for q in questions], defaults, generate_kwargs)
    results = [{"pred_answer": a} for a in answers]
    return results if isinstance(image, (list, tuple)) else results[0]
