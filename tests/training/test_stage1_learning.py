"""Learning check: stage 1 on the synthetic shapes corpus learns image→text retrieval (CPU, tiny models)."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from PIL import Image

from orchestration.tiny_models import CLIP_MEAN, CLIP_STD
from pipelines.synthetic import make_corpus
from tests.training.stage1_helpers import build_model, model_config

STEPS, BATCH, HELD_OUT, TRAIN, LR = 200, 32, 32, 320, 2e-3


def load_pixels(root, items, size: int = 64) -> torch.Tensor:
    """Plain PIL/NumPy: RGB, resize, scale to [0, 1], CLIP-normalise → ``[n, 3, size, size]`` fp32."""
    arrays = []
    for it in items:
        img = Image.open(root / it.file).convert("RGB").resize((size, size), Image.BICUBIC)
        arrays.append(np.asarray(img, dtype=np.float32) / 255.0)
    x = (np.stack(arrays) - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def recall_at_1(model, pixels: torch.Tensor, captions: list[str]) -> float:
    """Image→text R@1 by the ITC score (max over queries of the cosine), captions all distinct."""
    model.eval()
    _, image_feat = model.encode_image(pixels)
    text_feat = model.encode_text(captions)[2]
    scores = torch.einsum("iqe,te->itq", image_feat, text_feat).amax(-1)
    return (scores.argmax(dim=1) == torch.arange(len(captions))).float().mean().item()


@pytest.mark.slow
def test_stage1_learns_retrieval_on_shapes(tiny_models, tmp_path):
    torch.manual_seed(0)
    items = make_corpus(tmp_path / "corpus", n=TRAIN + 3 * HELD_OUT, seed=1, size=64)
    train, rest = items[:TRAIN], items[TRAIN:]
    train_captions = {it.caption for it in train}
    held, seen = [], set()
    for it in rest:  # distinct captions so chance is exactly 1/HELD_OUT; prefer captions never trained on
        if it.caption not in seen and it.caption not in train_captions:
            held.append(it)
            seen.add(it.caption)
    held = held[:HELD_OUT]
    assert len(held) == HELD_OUT
    train_px, held_px = load_pixels(tmp_path / "corpus", train), load_pixels(tmp_path / "corpus", held)
    held_captions = [it.caption for it in held]

    cfg = model_config(tiny_models, vision="clip_vit_l", vision_path=str(tiny_models["vision"]))
    model = build_model(cfg, seed=0)
    before = recall_at_1(model, held_px, held_captions)
    params = [p for p in model.parameters() if p.requires_grad]
    # tiny model, few steps: a high constant lr gets the (N(0, 0.02)-initialised) cross-attention
    # path off its plateau (~150 steps); step cost is overhead-bound, so a batch of 32 is cheap
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.05, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(0)
    start, first = time.time(), None
    for step in range(STEPS):
        model.train()
        idx = torch.randperm(TRAIN, generator=gen)[:BATCH]
        out = model(train_px[idx], [train[i].caption for i in idx], generator=gen)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        first = first or {k: v.item() for k, v in out.items()}
    last = {k: v.item() for k, v in out.items()}
    after = recall_at_1(model, held_px, held_captions)
    print(f"stage-1 learning check: {STEPS} steps x {BATCH} in {time.time() - start:.1f}s; "
          f"R@1 {before:.3f} -> {after:.3f} (chance {1 / HELD_OUT:.3f}); first {first}; last {last}")
    assert last["loss_itg"] < first["loss_itg"] - 1.0
    assert after >= 5 / HELD_OUT
