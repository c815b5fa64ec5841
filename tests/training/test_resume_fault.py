"""Exact mid-epoch resume and worker-kill recovery on a local Ray with 2 training workers.

Reference: one uninterrupted 8-step run (2 workers × 4 samples, 48-sample corpus: 6 steps per
epoch, so the run crosses into epoch 1). Compared with it, one run that is interrupted twice:
* stopped after step 3 (``train.stop_after=3``) and started again with the same output and
  name — Ray Train restores the run and the loop continues from checkpoint 3 (mid-epoch);
* then its last worker SIGKILLs itself at step 5 (``FailureConfig(max_failures=1)``) — Ray
  Train restarts the worker group, which resumes from checkpoint 4 by itself.
(Both interruptions share one test, on S3 storage, to keep the suite to three Ray Train runs.)
Tolerance: losses agree to 1e-5 absolute (fixed seeds, CPU, gloo all-reduce of two ranks is
order-stable; the slack covers float re-association only). Sample keys must match exactly.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.training.train_fixtures import write_capfilt
from training.config import ModelConfig, TrainConfig
from training.loop import run_training
from training.metrics import read_metrics

pytestmark = pytest.mark.slow
TOL = 1e-5


def _cfg(tmp: Path, data: str, name: str, **kw) -> TrainConfig:
    base = dict(input=data, output=str(tmp / "runs"), name=name, steps=8, batch_size=4, num_workers=2,
                checkpoint_every=2, warmup_steps=2, lr=1e-3, min_lr=1e-4, image_size=32, map_batch_size=8,
                model_class="tests.training.toy_model:ToyModel", log_keys=True)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def data(tmp_path_factory, corpus):
    root = tmp_path_factory.mktemp("resume")
    write_capfilt(str(root / "capfilt"), corpus, rows_per_shard=12)
    return root


@pytest.fixture(scope="module")
def reference(ray_local, data):
    result = run_training(ModelConfig(), _cfg(data, str(data / "capfilt"), "reference"), seed=0)
    assert result.error is None
    return read_metrics(str(data / "runs" / "reference"))


def _assert_same_run(rows: list[dict], ref: list[dict]):
    assert [r["step"] for r in rows] == list(range(1, 9))
    for r, e in zip(rows, ref):
        assert r["keys"] == e["keys"], f"step {r['step']}: different samples"
        for k in ("loss", "loss_itc", "loss_aux", "lr"):
            assert r[k] == pytest.approx(e[k], abs=TOL), f"step {r['step']} {k}"


def _assert_epoch_once(rows: list[dict]):
    epoch0 = [k for r in rows if r["step"] <= 6 for k in r["keys"]]
    assert sorted(epoch0) == [f"{i:06d}" for i in range(48)]  # nothing repeated or skipped


def test_reference_run_covers_epoch_and_learns(reference, data):
    _assert_epoch_once(reference)
    assert reference[-1]["epoch"] == 1 and reference[-1]["loss"] < reference[0]["loss"]
    assert (data / "runs" / "reference" / "final" / "model.safetensors").exists()


def test_stop_rerun_and_worker_kill_replay_the_uninterrupted_run(reference, data, corpus, s3_bucket):
    """Run 1 stops after step 3; run 2 (same output + name) resumes from checkpoint 3 and, at
    step 5, its last worker is SIGKILLed; Ray Train restarts the group from checkpoint 4.
    This run reads its shards from and keeps its checkpoints/metrics/final model on S3 (moto)."""
    import fsspec

    write_capfilt(f"{s3_bucket}/capfilt", corpus, rows_per_shard=12)
    marker = data / "crash.marker"
    cfg = _cfg(data, f"{s3_bucket}/capfilt", "resumed", output=f"{s3_bucket}/runs", crash_at_step=5,
               crash_marker=str(marker), max_failures=1)
    run, fs = f"{s3_bucket}/runs/resumed", fsspec.filesystem("s3")
    first = run_training(ModelConfig(), TrainConfig(**{**cfg.__dict__, "stop_after": 3}), seed=0)
    assert first.checkpoint.path.endswith("resumed/checkpoint_00000003")
    files = {p.rsplit("/", 1)[-1] for p in fs.ls(f"{run}/checkpoint_00000003")}
    assert {"trainable.safetensors", "optimizer.pt", "scheduler.pt", "scaler.pt", "state.json",
            "rng_rank0.pt", "rng_rank1.pt"} <= files
    state = json.loads(fs.cat(f"{run}/checkpoint_00000003/state.json"))
    assert state["step"] == 3 and (state["data"]["epoch"], state["data"]["batches_in_epoch"]) == (0, 3)
    assert not fs.exists(f"{run}/final") and not marker.exists()

    second = run_training(ModelConfig(), cfg, seed=0)  # same output + name: resumes from step 3
    assert marker.exists() and "at step 5" in marker.read_text()      # a worker really died ...
    assert second.error is None                                         # ... and the run finished anyway
    assert second.checkpoint.path.endswith("resumed/checkpoint_00000008")
    rows = read_metrics(run)
    _assert_same_run(rows, reference)
    _assert_epoch_once(rows)
    assert fs.exists(f"{run}/final/model.safetensors") and fs.exists(f"{run}/metrics.csv")
