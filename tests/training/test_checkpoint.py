"""Checkpoint files: trainable weights only, optimizer/scheduler/scaler/RNG/data position round trip."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.training.toy_model import ToyModel
from training.checkpoint import (DataPosition, TrainState, UnsafeCheckpointError, load_into, load_state,
                                 save_rank_files, save_shared_files)
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
    state = TrainState(step=3, data=DataPosition(epoch=1, consumed=16, samples_seen=40), world_size=2,
                       global_batch=8)
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
    assert restored == state and load_state(tmp_path).data.consumed == 16
    assert not list(tmp_path.glob("rng_*.pt"))  # RNG states: safetensors + JSON metadata, no pickle
    assert sched2.last_epoch == sched.last_epoch and opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected_draw  # rank-1 RNG back
    torch.manual_seed(7)
    loss = fresh(x, texts)["loss"]
    loss.backward()
    opt2.step()
    assert loss.item() == loss_ref.item()
    for k, v in fresh.trainable_state_dict().items():
        torch.testing.assert_close(v, ref[k], rtol=0, atol=0)


class _RunsCode:
    """A pickle payload that, if unpickled, would create ``path`` (stands in for any code)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_checkpoint_whose_pickle_runs_code_is_refused(tmp_path):
    model, opt, sched, scaler, _, _ = _trained(0)
    save_rank_files(tmp_path, rank=0)
    save_shared_files(tmp_path, model.trainable_state_dict(), opt, sched, scaler, TrainState(step=3))
    marker = tmp_path / "pwned"
    state = opt.state_dict()
    state["param_groups"][0]["evil"] = _RunsCode(marker)
    torch.save(state, tmp_path / "optimizer.pt")
    before = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    fresh, opt2, sched2, scaler2, _, _ = _trained(1)
    untouched = {k: v.clone() for k, v in fresh.trainable_state_dict().items()}
    with pytest.raises(UnsafeCheckpointError, match=r"optimizer\.pt: refused to load.*could run code"):
        load_into(tmp_path, 0, fresh, opt2, sched2, scaler2)
    assert not marker.exists()                                           # the payload never ran
    for k, v in fresh.trainable_state_dict().items():                    # and nothing was half-applied
        torch.testing.assert_close(v, untouched[k], rtol=0, atol=0)
    assert any((before[k] != untouched[k]).any() for k in before)


def test_an_old_per_rank_position_resumes_at_the_next_epoch():
    old = '{"step": 5, "world_size": 2, "data": {"epoch": 1, "batches_in_epoch": 2, "samples_seen": 40, ' \
          '"shard_order": []}}'
    assert TrainState.from_json(old).data == DataPosition(epoch=2, consumed=0, samples_seen=40)
