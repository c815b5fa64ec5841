"""Checkpoint files: trainable weights only, optimizer/scheduler/scaler/RNG/data position round trip."""
from __future__ import annotations

import random

import numpy as np
import torch
from safetensors.torch import load_file

from tests.training.toy_model import ToyModel
from training.checkpoint import (DataPosition, TrainState, load_into, load_state, save_rank_files,
                                 save_shared_files)
from training.config import TrainConfig
from training.optim import build_optimizer, grad_scaler


def _trained(seed: int):
    torch.manual_seed(seed)
    model = ToyModel()
    opt, sched = build_optimizer(model, TrainConfig(lr=1e-2, warmup_steps=1, steps=10))
    x, texts = torch.randn(4, 3, 32, 32), ["a red circle", "a blue square", "a cat", "a dog"]
    for _ in range(3):
        model(x, texts)["loss"].backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    return model, opt, sched, grad_scaler("fp32", torch.device("cpu")), x, texts


def test_round_trip_restores_training_exactly(tmp_path):
    model, opt, sched, scaler, x, texts = _trained(0)
    state = TrainState(step=3, data=DataPosition(epoch=1, batches_in_epoch=2, samples_seen=40,
                                                 shard_order=["part-00001.parquet"]), world_size=2)
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    save_rank_files(tmp_path, rank=1)
    save_shared_files(tmp_path, model.trainable_state_dict(), opt, sched, scaler, state, config={"seed": 0})

    saved = load_file(str(tmp_path / "trainable.safetensors"))
    assert "vision.weight" not in saved and set(saved) == set(model.trainable_state_dict())  # frozen: never saved

    # the uninterrupted continuation
    expected_draw = (random.random(), np.random.rand(), torch.rand(1).item())
    model.train()
    torch.manual_seed(7)
    loss_ref = model(x, texts)["loss"]
    loss_ref.backward()
    opt.step()
    ref = {k: v.clone() for k, v in model.trainable_state_dict().items()}

    fresh, opt2, sched2, scaler2, _, _ = _trained(1)  # different weights and optimizer state
    fresh.vision.load_state_dict(model.vision.state_dict())  # frozen part: from its pretrained files
    restored = load_into(tmp_path, 1, fresh, opt2, sched2, scaler2)
    assert restored == state and load_state(tmp_path).data.shard_order == ["part-00001.parquet"]
    assert sched2.last_epoch == sched.last_epoch and opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected_draw  # rank-1 RNG back
    torch.manual_seed(7)
    loss = fresh(x, texts)["loss"]
    loss.backward()
    opt2.step()
    assert loss.item() == loss_ref.item()
    for k, v in fresh.trainable_state_dict().items():
        torch.testing.assert_close(v, ref[k], rtol=0, atol=0)
