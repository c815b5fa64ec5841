"""Shared pieces of the stage-1 tests: tiny configs, a randomly initialised EVA tower, images."""
from __future__ import annotations

from pathlib import Path

import torch

from training.config import ModelConfig


def eva_tower(src: Path, out: Path, seed: int = 0) -> Path:
    """Re-initialise the tiny EVA tower with std 0.02 into ``out``.

    ``Blip2VisionConfig`` defaults to ``initializer_range=1e-10``, so a Blip2VisionModel built
    from a bare config is (numerically) all zeros and every image looks the same; the tests need
    an encoder whose features depend on the image.
    """
    from transformers import Blip2VisionConfig, Blip2VisionModel

    if (out / "config.json").exists():
        return out
    cfg = Blip2VisionConfig.from_pretrained(src)
    cfg.initializer_range = 0.02
    torch.manual_seed(seed)
    model = Blip2VisionModel(cfg)
    with torch.no_grad():  # LayerNorms keep (1, 0); embeddings/linears get N(0, 0.02)
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.02)
        for layer in model.encoder.layers:  # EVA/LAVIS has q and v biases only: k bias stays 0
            bias = layer.self_attn.qkv.bias
            bias[cfg.hidden_size: 2 * cfg.hidden_size] = 0.0
    model.save_pretrained(out)
    return out


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

