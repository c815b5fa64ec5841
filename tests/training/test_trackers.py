"""Experiment tracking (training/trackers.py): TensorBoard, MLflow and W&B hold metrics.jsonl's values.

The resized toy run of ``tests/training/conftest.py`` (real Ray Train, all three backends on —
TensorBoard event files, MLflow's file store, W&B in offline mode — stopped after step 3 and
run again with the same output/name on another world size, so it resumes from checkpoint 3).
Each backend is read back with its own reader and must hold, per step 1..6, the loss values of
``metrics.jsonl``, exactly once (only rank 0 logs), in one MLflow run / one W&B run id.
The missing-package tests are instant.
"""
from __future__ import annotations

import glob
import json
import struct
from pathlib import Path

import pytest

from tests.training.train_fixtures import TOY_EPOCH_STEPS
from training.config import ModelConfig, TrainConfig
from training.trackers import IDS_FILE, PACKAGES, MissingBackendError, TrackingConfig, require

LOSSES = ("loss", "loss_itc", "loss_aux")


@pytest.fixture(scope="module")
def tracked_run(resized_toy_run):
    run, rows, ids, root = resized_toy_run
    assert [r["step"] for r in rows] == list(range(1, TOY_EPOCH_STEPS + 1))
    return run, rows, ids, root


@pytest.mark.slow
def test_tensorboard_events_hold_the_jsonl_losses(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, rows, _, _ = tracked_run
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one per invocation
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    for key in (*LOSSES, "lr", "samples_per_s"):
        events = acc.Scalars(key)
        assert [e.step for e in events] == [r["step"] for r in rows], key
        for e, r in zip(events, rows):  # event files store float32
            assert e.value == pytest.approx(r[key], rel=1e-6, abs=1e-12), (key, r["step"])


@pytest.mark.slow
def test_mlflow_run_holds_the_jsonl_losses_in_one_resumed_run(tracked_run, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow >= 3.7 asks for this opt-in to read it too
    _, rows, ids, root = tracked_run
    client = MlflowClient(tracking_uri=(root / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("blip2-test")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [ids["mlflow"]["run_id"]]  # the re-run continued the same run
    assert runs[0].info.status == "FINISHED" and runs[0].info.run_name == "resized"
    assert runs[0].data.params["train/lr"] == "0.001" and runs[0].data.params["seed"] == "0"
    for key in LOSSES:
        history = sorted(client.get_metric_history(ids["mlflow"]["run_id"], key), key=lambda m: m.step)
        assert [(m.step, m.value) for m in history] == [(r["step"], r[key]) for r in rows], key


def _wandb_records(path: str):
    """Records of a W&B transaction log (``run-<id>.wandb``): LevelDB log format, 32 KiB blocks,
    7-byte record headers (crc32, length, type), after a 7-byte ':W&B' file header."""
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding up to the block end
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:        # full
            yield chunk
        elif kind == 2:      # first
            pending = chunk
        elif kind == 3:      # middle
            pending += chunk
        elif kind == 4:      # last
            yield pending + chunk


@pytest.mark.slow
def test_wandb_offline_runs_hold_the_jsonl_losses_under_one_id(tracked_run):
    from wandb.proto import wandb_internal_pb2 as pb

    run, rows, ids, _ = tracked_run
    files = sorted(glob.glob(str(run / "wandb" / "offline-run-*" / f"run-{ids['wandb']['id']}.wandb")))
    assert len(files) == 2  # both invocations wrote to the same W&B run id
    history = {}
    for f in files:
        for data in _wandb_records(f):
            rec = pb.Record()
            rec.ParseFromString(data)
            if rec.WhichOneof("record_type") == "history":
                item = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
                assert item["_step"] not in history  # every step exactly once
                history[item["_step"]] = item
    assert sorted(history) == [r["step"] for r in rows]
    for r in rows:
        for key in LOSSES:
            assert history[r["step"]][key] == r[key], (key, r["step"])


def test_s3_run_dir_is_staged_uploaded_and_resumed_with_purge(s3_bucket, tmp_path):
    """Without Ray (about 5 s): a run directory on S3 (moto). Invocation 1 logs steps 1-3 and
    dies after its checkpoint at step 2; invocation 2 resumes at step 2 and logs steps 3-4 with
    other values. TensorBoard's purge_step drops the first step 3; W&B keeps one run id."""
    import fsspec
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from training.trackers import Trackers

    run = f"{s3_bucket}/runs/remote"
    cfg = TrackingConfig(tensorboard=True, wandb_project="blip2-test", wandb_mode="offline")
    first = Trackers(run, cfg, start_step=0, params={"seed": 0})
    for step in (1, 2, 3):
        first.log({"step": step, "loss": 10.0 + step, "keys": ["000001"]})
        if step == 2:
            first.flush()  # the checkpoint at step 2 uploads what is staged so far
    first.close()
    second = Trackers(run, cfg, start_step=2, params={"seed": 0})
    for step in (3, 4):
        second.log({"step": step, "loss": 20.0 + step})
    second.close()

    fs = fsspec.filesystem("s3")
    root = run.removeprefix("s3://")
    assert len(fs.glob(f"{root}/tensorboard/events.out.tfevents.*")) == 2
    fs.get(f"{root}/tensorboard/", str(tmp_path / "tb") + "/", recursive=True)
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 11.0), (2, 12.0), (3, 23.0), (4, 24.0)]
    wandb_id = json.loads(fs.cat(f"{root}/{IDS_FILE}"))["wandb"]["id"]
    assert len(fs.glob(f"{root}/wandb/offline-run-*-{wandb_id}/run-{wandb_id}.wandb")) == 2


def test_missing_backend_package_is_a_clear_error():
    with pytest.raises(MissingBackendError, match=r"tracking\.tensorboard .*'no-such-pkg'.*pip install no-such-pkg"):
        require("tracking.tensorboard", "blip2_no_such_module", "no-such-pkg")
    require("tracking.tensorboard", "json", "json")  # an importable module passes


def test_run_training_refuses_a_backend_whose_package_is_missing_before_any_work(monkeypatch, tmp_path):
    """`blip2 train ... tracking.wandb_project=p` without wandb installed: the config is a document
    (`blip2 config` prints it), and run_training refuses before reading the input or starting Ray
    Train, naming the key and the pip package (a module name that does not exist stands in)."""
    from orchestration.config import ConfigError, build
    from training.loop import run_training

    monkeypatch.setitem(PACKAGES, "wandb", ("tracking.wandb_project", "blip2_wandb_not_installed", "wandb"))
    tracking = build(TrackingConfig, {"wandb_project": "p"}, "tracking.")
    train = TrainConfig(input=str(tmp_path / "no-input"), output=str(tmp_path / "runs"))
    with pytest.raises(MissingBackendError, match=r"tracking\.wandb_project .*'wandb' is not installed.*pip install wandb"):
        run_training(ModelConfig(), train, tracking=tracking)
    assert not (tmp_path / "runs").exists()
    TrackingConfig(wandb_project="").check_installed()                               # off: nothing needed
    with pytest.raises(ConfigError, match="tracking: wandb_mode must be online or offline"):
        build(TrackingConfig, {"wandb_mode": "cloud"}, "tracking.")
    with pytest.raises(ConfigError, match="absolute path"):
        build(TrackingConfig, {"mlflow_tracking_uri": "mlruns"}, "tracking.")
