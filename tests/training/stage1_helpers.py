"""Shared pieces of the stage-1 tests: tiny configs, models and images."""
from __future__ import annotations

from pathlib import Path

import torch

from training.config import ModelConfig


def model_config(tiny_models: dict, eva: Path | None = None, **kw) -> ModelConfig:
    base = dict(vision="eva_vit_g", vision_path=str(eva or tiny_models["vision_eva"]),
                qformer_init=str(tiny_models["bert"]), num_query_tokens=8, image_size=64,
                frozen_dtype="float32", embed_dim=32, max_text_len=24)
    base.update(kw)
    return ModelConfig(**base)


def build_model(cfg: ModelConfig, seed: int = 0):
    from training.stage1 import Blip2Stage1

    torch.manual_seed(seed)
    return Blip2Stage1.from_config(cfg).eval()  # eval: dropout off, so numbers are comparable


def pixels(n: int, seed: int = 0, size: int = 64) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


CAPTIONS = ["a red circle", "a blue square left of a green circle", "a yellow triangle above a red square",
            "a green circle", "a purple star right of a blue circle", "a red square below a green triangle"]

