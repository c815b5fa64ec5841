"""Test-only hooks come from the environment, never from the config; elastic worker-count config."""
from __future__ import annotations

import dataclasses

import pytest

from training.config import TrainConfig
from training.hooks import Hooks


def test_hooks_are_read_from_the_environment_only():
    assert Hooks.from_env({}) == Hooks()
    h = Hooks.from_env({"BLIP2_FAULT_INJECT": "step=5,marker=/tmp/m,rank=0", "BLIP2_LOG_KEYS": "1"})
    assert (h.kill_at_step, h.kill_rank, h.marker, h.log_keys) == (5, 0, "/tmp/m", True)
    with pytest.raises(ValueError, match="BLIP2_FAULT_INJECT"):
        Hooks.from_env({"BLIP2_FAULT_INJECT": "step=5"})          # no marker: it would kill every restart
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    assert not names & {"crash_at_step", "crash_marker", "model_class", "log_keys", "shuffle_buffer"}


def test_num_workers_is_a_count_or_a_range_and_the_global_batch_follows_the_max():
    assert TrainConfig(batch_size=4, num_workers=(1, 3)).resolved_global_batch() == 12
    assert TrainConfig(batch_size=4, num_workers=2, global_batch=10).resolved_global_batch() == 10
    TrainConfig(batch_size=4, num_workers=(1, 3)).validate()
    for bad in ((3, 2), (0, 2)):
        with pytest.raises(ValueError, match="num_workers"):
            TrainConfig(num_workers=bad).validate()
    with pytest.raises(ValueError, match="cannot give one sample"):
        TrainConfig(batch_size=1, global_batch=2, num_workers=(1, 4)).validate()
