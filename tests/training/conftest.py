"""Fixtures shared by the training tests."""
from __future__ import annotations

import json

import pytest

from tests.training.train_fixtures import TOY, run_training_with_hooks, toy_train_config, write_capfilt
from training.config import ModelConfig, TrainConfig
from training.ingest import IngestConfig
from training.metrics import read_metrics
from training.trackers import IDS_FILE, TrackingConfig


@pytest.fixture(scope="session")
def resized_toy_run(tmp_path_factory, corpus, ray_local):
    """One toy run (global batch 8, a checkpoint every step) started with 2 workers, stopped after
    step 3 (``train.stop_after``) and run again with the same output and name on 1 worker, so it
    resumes from checkpoint 3 at another world size; TensorBoard, MLflow (file store) and W&B
    (offline) on in both invocations. Two Ray Train runs that tests/training/test_elastic.py
    (the resize) and tests/training/test_trackers.py (the trackers' resume) both read.
    Returns (run dir, metrics rows, tracker ids, root)."""
    root = tmp_path_factory.mktemp("resized")
    write_capfilt(str(root / "capfilt"), corpus, rows_per_shard=12)
    cfg = toy_train_config(root, "resized")
    tracking = TrackingConfig(tensorboard=True, mlflow_tracking_uri=(root / "mlruns").as_uri(),
                              mlflow_experiment="blip2-test", wandb_project="blip2-test", wandb_mode="offline")
    tracking.validate()
    model, ingest = ModelConfig(image_size=32), IngestConfig(map_batch_size=8, shuffle_window=2)
    first = run_training_with_hooks(model, TrainConfig(**{**cfg.__dict__, "stop_after": 3}), ingest, tracking,
                                    model_class=TOY)
    assert first.error is None, first.error
    second = run_training_with_hooks(model, TrainConfig(**{**cfg.__dict__, "num_workers": 1}), ingest, tracking,
                                     model_class=TOY)
    assert second.error is None, second.error
    run = root / "runs" / "resized"
    return run, read_metrics(str(run)), json.loads((run / IDS_FILE).read_text()), root
