"""Stage 1 under fp16 / bf16 autocast on CUDA agrees with fp32 (needs a GPU; skipped elsewhere).

What the paper presets run: frozen tower in fp16 (or bf16), trainable Q-Former under autocast
(bf16 on H100, fp16 + GradScaler on A100). Same weights, same images and captions, dropout off,
ITM negatives fixed, so the only difference is arithmetic precision. Tolerances (relative):
losses 2e-2 (bf16 keeps 8 mantissa bits: ~4e-3 per rounding, a few roundings deep) and 1e-2
(fp16, 11 bits); Q-Former gradients 1e-1 / 5e-2 (norm of the difference over the fp32 norm).

    python -m pytest --noconftest tests/training/test_gpu_precision.py -s   # on a CUDA machine
"""
from __future__ import annotations

import pytest
import torch

from orchestration.tiny_models import build_tiny_models
from tests.training.stage1_helpers import CAPTIONS, model_config, pixels
from training.optim import autocast, grad_scaler

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")
CASES = {  # name: (frozen_dtype, precision, loss tol, grad tol)
    "fp16 tower + bf16 autocast": ("float16", "bf16", 2e-2, 1e-1),
    "bf16 tower + bf16 autocast": ("bfloat16", "bf16", 2e-2, 1e-1),
    "fp16 tower + fp16 autocast": ("float16", "fp16", 1e-2, 5e-2),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_tiny_models(tmp_path_factory.mktemp("gpu-models"), seed=0, only=["bert", "vision_eva"])


def run(models, frozen_dtype: str, precision: str) -> tuple[dict, torch.Tensor]:
    from training.stage1 import Blip2Stage1

    torch.manual_seed(0)
    model = Blip2Stage1.from_config(model_config(models, frozen_dtype=frozen_dtype)).to(CUDA).eval()
    texts = CAPTIONS * 2
    n = len(texts)
    negatives = (torch.arange(n).roll(1), torch.arange(n).roll(-1))
    scaler = grad_scaler(precision, CUDA)
    with autocast(precision, CUDA):
        out = model(pixels(n).to(CUDA), texts, itm_negatives=negatives)
    scaler.scale(out["loss"]).backward()
    scale = scaler.get_scale() if scaler.is_enabled() else 1.0
    grads = torch.cat([p.grad.flatten() / scale for p in model.qformer.parameters() if p.grad is not None])
    return {k: v.item() for k, v in out.items()}, grads.float()


def test_stage1_losses_and_grads_match_fp32(models):
    ref, ref_grads = run(models, "float32", "fp32")
    assert torch.isfinite(ref_grads).all()
    for name, (frozen, precision, loss_tol, grad_tol) in CASES.items():
        got, grads = run(models, frozen, precision)
        grad_err = ((grads - ref_grads).norm() / ref_grads.norm()).item()
        print(f"{name}: " + ", ".join(f"{k} {got[k]:.5f} (fp32 {ref[k]:.5f})" for k in ref) + f", grad rel err {grad_err:.2e}")
        for key in ref:
            assert abs(got[key] - ref[key]) <= loss_tol * abs(ref[key]), (name, key, got[key], ref[key])
        assert torch.isfinite(grads).all() and grad_err <= grad_tol, (name, grad_err)
