"""The training run on S3 (moto): shards in, checkpoints/metrics/final model out, resume from S3."""
from __future__ import annotations

import json

import fsspec
import pytest

from tests.training.train_fixtures import write_capfilt
from training.config import ModelConfig, TrainConfig
from training.loop import run_training
from training.metrics import read_metrics

pytestmark = pytest.mark.slow


def test_s3_storage_checkpoints_and_resumes(ray_local, corpus, s3_bucket):
    write_capfilt(f"{s3_bucket}/capfilt", corpus, rows_per_shard=16)
    cfg = TrainConfig(input=f"{s3_bucket}/capfilt", output=f"{s3_bucket}/runs", name="s3run", steps=3,
                      stop_after=2, batch_size=8, num_workers=1, checkpoint_every=1, warmup_steps=1,
                      image_size=32, map_batch_size=8, model_class="tests.training.toy_model:ToyModel")
    first = run_training(ModelConfig(), cfg, seed=0)
    assert first.error is None and first.checkpoint.path.endswith("s3run/checkpoint_00000002")
    fs = fsspec.filesystem("s3")
    run = f"{s3_bucket[5:]}/runs/s3run"
    names = {p.rsplit("/", 1)[-1] for p in fs.ls(f"{run}/checkpoint_00000002")}
    assert {"trainable.safetensors", "optimizer.pt", "state.json", "rng_rank0.pt"} <= names
    assert [r["step"] for r in read_metrics(f"s3://{run}")] == [1, 2]

    second = run_training(ModelConfig(), TrainConfig(**{**cfg.__dict__, "stop_after": 0}), seed=0)
    assert second.checkpoint.path.endswith("s3run/checkpoint_00000003")
    state = json.loads(fs.cat(f"{run}/checkpoint_00000003/state.json"))
    assert state["step"] == 3 and state["data"]["samples_seen"] == 24   # resumed: 2 + 1 steps of 8
    assert [r["step"] for r in read_metrics(f"s3://{run}")] == [1, 2, 3]
    assert fs.exists(f"{run}/final/model.safetensors") and fs.exists(f"{run}/metrics.csv")
