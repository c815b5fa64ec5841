"""AdamW groups, warm-up + cosine schedule, accumulation, autocast/scaler selection."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from training.config import TrainConfig
from training.optim import autocast, build_optimizer, grad_scaler, lr_at, param_groups


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.fc = nn.Linear(4, 8)
        self.ln = nn.LayerNorm(8)
        self.query = nn.Parameter(torch.zeros(1, 3, 8))   # 3-D: decayed like a matrix

    def forward(self, x):
        return self.ln(self.fc(self.frozen(x))) + self.query.mean()


def test_param_groups_exclude_biases_1d_and_frozen():
    groups = {g["name"]: g for g in param_groups(Net(), 0.05)}
    net = Net()
    decay_ids = {id(p) for p in param_groups(net, 0.05)[0]["params"]}
    no_decay_ids = {id(p) for p in param_groups(net, 0.05)[1]["params"]}
    assert decay_ids == {id(net.fc.weight), id(net.query)}
    assert no_decay_ids == {id(net.fc.bias), id(net.ln.weight), id(net.ln.bias)}
    assert groups["decay"]["weight_decay"] == 0.05 and groups["no_decay"]["weight_decay"] == 0.0


def test_lr_warmup_then_cosine_to_min():
    lr, lo, warm, total = 1e-4, 1e-5, 2000, 250_000
    assert lr_at(0, lr, lo, warm, total) == pytest.approx(lr / warm)
    assert lr_at(999, lr, lo, warm, total) == pytest.approx(lr / 2)
    assert lr_at(warm, lr, lo, warm, total) == pytest.approx(lr)
    mid = warm + (total - warm) // 2
    assert lr_at(mid, lr, lo, warm, total) == pytest.approx((lr + lo) / 2, rel=1e-4)
    assert lr_at(total, lr, lo, warm, total) == pytest.approx(lo)
    assert lr_at(total + 10, lr, lo, warm, total) == pytest.approx(lo)
    seq = [lr_at(s, lr, lo, warm, total) for s in range(warm, total, 5000)]
    assert all(a >= b for a, b in zip(seq, seq[1:]))  # monotone after warm-up


def test_optimizer_and_scheduler_follow_config():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=4, steps=20, betas=(0.9, 0.98), weight_decay=0.05)
    net = Net()
    opt, sched = build_optimizer(net, cfg)
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["betas"] == (0.9, 0.98)
    seen = []
    for _ in range(20):
        seen.append(opt.param_groups[0]["lr"])
        net(torch.randn(2, 4)).sum().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    expected = [lr_at(s, 1e-3, 1e-4, 4, 20) for s in range(20)]
    assert seen == pytest.approx(expected)
    assert net.frozen.weight.grad is None


def test_accumulated_grads_equal_full_batch_grads():
    torch.manual_seed(0)
    net, x = nn.Linear(4, 1), torch.randn(8, 4)
    net(x).pow(2).mean().backward()
    full = net.weight.grad.clone()
    net.zero_grad()
    for chunk in x.split(2):
        (net(chunk).pow(2).mean() / 4).backward()
    torch.testing.assert_close(net.weight.grad, full)


def test_autocast_and_scaler_by_precision():
    cpu = torch.device("cpu")
    with autocast("bf16", cpu):
        y = nn.Linear(4, 4)(torch.randn(2, 4))
    assert y.dtype == torch.bfloat16
    with autocast("fp32", cpu):
        assert nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.float32
    assert grad_scaler("fp16", cpu).is_enabled() and not grad_scaler("bf16", cpu).is_enabled()
    with pytest.raises(ValueError):
        autocast("fp8", cpu)
    assert math.isfinite(lr_at(0, 1e-4, 1e-5, 0, 10))
