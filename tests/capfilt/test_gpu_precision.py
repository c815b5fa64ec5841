"""CapFilt's fp16 ranker on CUDA (the job's GPU default) scores like fp32 (needs a GPU; skipped elsewhere).

Cosines of L2-normalised fp16 embeddings differ from fp32 by ~1e-3; the kept top two must be the
same wherever the fp32 scores separate them by more than that.

    python -m pytest --noconftest tests/capfilt/test_gpu_precision.py -s   # on a CUDA machine
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from capfilt.ranker import Ranker
from orchestration.tiny_models import build_tiny_models

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TOL = 5e-3


def test_fp16_scores_and_top_two_match_fp32(tmp_path):
    ranker_dir = build_tiny_models(tmp_path, seed=0, only=["ranker"])["ranker"]
    fp32, fp16 = Ranker(str(ranker_dir), dtype="float32"), Ranker(str(ranker_dir), dtype="auto")
    assert fp16.dtype == torch.float16 and fp16.device.type == "cuda"
    size = fp32.model.config.vision_config.image_size
    pixels = torch.randn(16, 3, size, size, generator=torch.Generator().manual_seed(0)).numpy()
    words = ["red", "blue", "green", "circle", "square", "triangle", "left", "of", "a", "above"]
    rng = np.random.default_rng(0)
    captions = [[" ".join(rng.choice(words, rng.integers(2, 8))) for _ in range(11)] for _ in range(16)]
    ref, _, _ = fp32.score(pixels, captions)
    got, _, _ = fp16.score(pixels, captions)
    err = (got - ref).abs().max().item()
    print(f"fp16 vs fp32 max |score diff| {err:.2e}")
    assert err <= TOL
    for r, g in zip(ref, got):
        top_ref, top_got = r.topk(2).indices.tolist(), g.topk(2).indices.tolist()
        margin = (r.sort(descending=True).values[1] - r.sort(descending=True).values[2]).item()
        if top_ref != top_got:  # allowed only where fp32 itself can't tell them apart
            assert margin <= 2 * TOL or abs(r[top_ref[0]] - r[top_ref[1]]) <= 2 * TOL
