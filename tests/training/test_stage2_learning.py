"""Stage 2 learns: on the synthetic shapes corpus the held-out caption loss drops clearly and greedy
captions name a colour that is in the image.

The frozen LLM must be a language model for soft prompts to steer it: the shared tiny OPT is random
(std-0.02 embeddings bound its logits to about ±1, nothing can be steered). So it is first taught
as the demo teaches it (``tiny_teacher.teach_reading_llm``: all weights, text only, to write a
caption after seeing that caption's words in its context), saved, and only then loaded frozen by stage 2, where
just the Q-Former, queries, ``ln_vision`` and projection train. Encoder: the tiny CLIP tower of the
tiny preset (64 px, CLIP mean/std).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from orchestration.tiny_models import CLIP_MEAN, CLIP_STD
from orchestration.tiny_teacher import Lesson, teach_reading_llm
from pipelines.synthetic import COLORS, make_corpus
from training.config import ModelConfig
from training.stage2 import Blip2Stage2

N_TRAIN, N_TEST = 256, 32


def to_pixels(path) -> torch.Tensor:
    """64 px RGB → CLIP-normalised ``[3, 64, 64]`` fp32 (PIL + NumPy + torch, as the trainer's ingest)."""
    arr = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    arr = (arr - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1)


def colour_named(model, pixel_values, items) -> float:
    """Fraction of images whose greedy caption's first colour word is a colour of that image."""
    model.eval()
    captions = model.generate(pixel_values, max_new_tokens=10)
    model.train()
    first = [next((w for w in c.split() if w in COLORS), None) for c in captions]
    return sum(f in item.colors for f, item in zip(first, items)) / len(items)


@pytest.mark.slow
def test_stage2_learns_captions_on_shapes(tiny_models, tmp_path):
    torch.manual_seed(0)
    items = make_corpus(tmp_path / "corpus", n=N_TRAIN + N_TEST, seed=0, size=64)
    pixels = torch.stack([to_pixels(tmp_path / "corpus" / it.file) for it in items])
    captions = [it.caption for it in items]
    train_x, test_x = pixels[:N_TRAIN], pixels[N_TRAIN:]
    train_c, test_c, test_items = captions[:N_TRAIN], captions[N_TRAIN:], items[N_TRAIN:]

    llm = tmp_path / "llm"
    teach_reading_llm(tiny_models["opt"], llm, Lesson([], train_c, items[:N_TRAIN]), steps=300, seed=0)
    cfg = ModelConfig(vision="clip_vit_l", vision_path=str(tiny_models["vision"]), frozen_dtype="float32",
                      image_size=64, qformer_init=str(tiny_models["bert"]), num_query_tokens=8,
                      llm_family="opt", llm_path=str(llm))
    model = Blip2Stage2.from_config(cfg).train()
    llm_before = {k: v.clone() for k, v in model.language_model.state_dict().items()}

    def held_out_loss() -> float:
        model.eval()
        with torch.no_grad():
            loss = model(test_x, test_c)["loss"].item()
        model.train()
        return loss

    loss0, colour0 = held_out_loss(), colour_named(model, test_x, test_items)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    for _ in range(400):
        idx = torch.randint(0, N_TRAIN, (16,), generator=g)
        loss = model(train_x[idx], [train_c[i] for i in idx])["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    loss1, colour1 = held_out_loss(), colour_named(model, test_x, test_items)
    print(f"held-out caption loss {loss0:.3f} -> {loss1:.3f}; colour named {colour0:.2f} -> {colour1:.2f}")

    assert loss1 < 0.6 * loss0, (loss0, loss1)          # measured: 2.24 -> 0.80
    assert colour1 >= 0.6 and colour1 > colour0 + 0.2, (colour0, colour1)  # measured: 0.28 -> 0.91
    assert all(torch.equal(v, llm_before[k]) for k, v in model.language_model.state_dict().items())
