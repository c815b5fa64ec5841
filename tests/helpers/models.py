"""Model builders shared by test modules (tiny towers with a usable initialisation)."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch


def build_eva_tower(tiny_models, out: Path) -> Path:
    """The tiny EVA tower with a usable init. The shared fixture keeps HF's Blip2VisionConfig
    ``initializer_range=1e-10``: its features are ~1e-9, so no image information would reach the
    Q-Former and a wrong vision path could not show in any comparison. The final LayerNorm
    (= ``ln_vision``) gets non-trivial weights for the same reason."""
    from transformers import Blip2VisionConfig, Blip2VisionModel

    config = Blip2VisionConfig.from_pretrained(tiny_models["vision_eva"])
    config.initializer_range = 0.02
    torch.manual_seed(0)
    model = Blip2VisionModel(config)
    with torch.no_grad():
        model.post_layernorm.weight.uniform_(0.5, 1.5)
        model.post_layernorm.bias.normal_(0, 0.1)
    model.save_pretrained(out)
    shutil.copy(Path(tiny_models["vision_eva"]) / "preprocessor_config.json", out)
    return out
