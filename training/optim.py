"""Optimisation as in BLIP-2 §3.4: AdamW, linear warm-up then cosine decay, grad accumulation.

* weight decay on matrices only: biases and every 1-D parameter (LayerNorm, embeddings'
  norms, query-token scales) are excluded, as in BLIP/ALBEF.
* ``lr(step)``: 0 → ``lr`` linearly over ``warmup_steps``, then cosine from ``lr`` to
  ``min_lr`` at ``total_steps`` (and flat at ``min_lr`` after).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from training.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups of the trainable parameters: decayed (≥2-D, not bias) and not decayed."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over ``param_groups`` + a LambdaLR carrying the warm-up/cosine schedule."""
    groups = param_groups(model, cfg.weight_decay)
    if not any(g["params"] for g in groups):
        raise ValueError("the model has no trainable parameters")
    on_gpu = all(p.is_cuda for g in groups for p in g["params"])
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=1e-8,
                            fused=on_gpu or None)  # one kernel for all parameters on GPU
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_at(s, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.steps) / cfg.lr)
    return opt, sched


AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def autocast(precision: str, device: torch.device):
    """Autocast context for ``precision`` (fp32: disabled)."""
    if precision not in ("fp32", "fp16", "bf16"):
        raise ValueError(f"train.precision must be fp32, fp16 or bf16, got {precision!r}")
    return torch.autocast(device.type, dtype=AMP_DTYPES.get(precision, torch.float32),
                          enabled=precision != "fp32")


def optimizer_step(optimizer: torch.optim.Optimizer, scheduler, scaler: torch.amp.GradScaler) -> None:
    """One optimizer step after the micro-batches' backward passes: the (scaled) update, the
    scaler's new scale, gradients cleared, the LR schedule advanced, in that order."""
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """A GradScaler that is active only for fp16 (bf16/fp32 need none)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
