"""Experiment tracking: forward each per-step metrics row (rank 0) to TensorBoard, MLflow and W&B.

One job: :class:`Trackers` receives the rows :class:`training.metrics.MetricsLog` writes to
``metrics.jsonl`` and hands their numeric values, under the same names, with ``step`` as the
step, to every backend enabled in :class:`training.config.TrainConfig` (all off by default):

* ``train.tensorboard=true`` — ``torch.utils.tensorboard.SummaryWriter`` event files in
  ``<run>/tensorboard``. Ray Train v2 (Ray 2.60's default) documents logging straight from the
  train function; Ray's ``TBXLoggerCallback`` is a Ray *Tune* ``LoggerCallback`` and does not
  apply to Train v2 runs (``RunConfig.callbacks`` only takes ``ray.train.UserCallback``).
* ``train.mlflow_tracking_uri=...`` (+ ``train.mlflow_experiment``, default ``blip2``) — Ray's
  ``ray.air.integrations.mlflow.setup_mlflow`` inside the train function, then
  ``mlflow.log_metrics``. A ``file:`` URI (or a plain path) uses MLflow's file store, which
  MLflow >= 3.7 refuses unless ``MLFLOW_ALLOW_FILE_STORE=true``; asking for a file URI is taken
  as that opt-in (set for this process when unset).
* ``train.wandb_project=...`` (+ ``train.wandb_mode=online|offline``) — Ray's
  ``ray.air.integrations.wandb.setup_wandb``; run files under ``<run>/wandb``. Online mode needs
  ``WANDB_API_KEY`` (or a ``wandb login``) on the rank-0 node; Ray checks it at setup.

Both Ray helpers only skip non-zero ranks through Train-v1/Tune sessions, so the loop calls
this on rank 0 only. A run directory on S3 is staged locally (TensorBoard and W&B files) and
uploaded whenever :meth:`Trackers.flush` runs (each checkpoint) and at the end, like
``metrics.jsonl``.

Resume: ``<run>/trackers.json`` keeps the MLflow run id (+ tracking URI and experiment) and the
W&B run id; a re-run of the same run directory continues the same MLflow run (via
``MLFLOW_RUN_ID``) and the same W&B run (``id=..., resume="allow"``) and writes new TensorBoard
event files into the same folder with ``purge_step`` = the resumed step + 1, so TensorBoard
discards the steps a crashed attempt logged after its last checkpoint. MLflow and W&B cannot
drop points: MLflow keeps both values of such replayed steps, W&B keeps the first (it ignores
steps not above its last one); by the loop's resume contract the replayed values agree anyway.
A missing package is a clear :class:`MissingBackendError` at config time and again at startup.
"""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import fsspec

from pipelines.storage import Staging
from training.tracking_packages import check_installed, enabled

if TYPE_CHECKING:
    from training.config import TrainConfig

IDS_FILE = "trackers.json"


class Trackers:
    """The enabled backends of one run, opened on rank 0 at ``start_step`` (0, or the resumed step)."""

    def __init__(self, run_uri: str, train: "TrainConfig", start_step: int = 0, params: dict | None = None):
        check_installed(train)
        self.fs, self.root = fsspec.core.url_to_fs(run_uri)
        self.run_name = self.root.rstrip("/").rsplit("/", 1)[-1]
        self.staging = Staging(run_uri, prefix="blip2-trackers-")
        self.ids = self._read_ids()
        self.tb = self.mlflow = self.wandb = None
        if train.tensorboard:
            self._open_tensorboard(start_step)
        if train.mlflow_tracking_uri:
            self._open_mlflow(train, params or {})
        if train.wandb_project:
            self._open_wandb(train, params or {})
        self._write_ids()

    # -- where files go -----------------------------------------------------------------------
    def _dir(self, sub: str) -> Path:
        d = self.staging.path / sub
        d.mkdir(parents=True, exist_ok=True)
        return d

    def _read_ids(self) -> dict:
        path = f"{self.root}/{IDS_FILE}"
        return json.loads(self.fs.cat(path)) if self.fs.exists(path) else {}

    def _write_ids(self) -> None:
        self.fs.makedirs(self.root, exist_ok=True)
        with self.fs.open(f"{self.root}/{IDS_FILE}", "w") as f:
            json.dump(self.ids, f, indent=1)

    # -- backends -----------------------------------------------------------------------------
    def _open_tensorboard(self, start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard drops earlier-written events at steps >= it (a crashed
        # attempt's steps after its last checkpoint), as MetricsLog drops those rows.
        self.tb = SummaryWriter(log_dir=str(self._dir("tensorboard")), purge_step=start_step + 1)

    def _open_mlflow(self, train: "TrainConfig", params: dict) -> None:
        from ray.air.integrations.mlflow import setup_mlflow

        uri, experiment = train.mlflow_tracking_uri, train.mlflow_experiment or "blip2"
        if "://" not in uri or uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # the user asked for the file store
        prev = self.ids.get("mlflow", {})
        resume = prev.get("run_id") if (prev.get("tracking_uri"), prev.get("experiment")) == (uri, experiment) \
            and _mlflow_run_exists(uri, prev.get("run_id")) else None
        if resume:
            os.environ["MLFLOW_RUN_ID"] = resume  # mlflow.start_run continues this run (and pops the variable)
        try:
            # params only for a new run: MLflow refuses to change a logged parameter's value
            self.mlflow = setup_mlflow(config=None if resume else params, tracking_uri=uri,
                                       experiment_name=experiment, run_name=self.run_name,
                                       create_experiment_if_not_exists=True)
        finally:
            os.environ.pop("MLFLOW_RUN_ID", None)
        self.ids["mlflow"] = {"run_id": self.mlflow.active_run().info.run_id, "tracking_uri": uri,
                              "experiment": experiment}

    def _open_wandb(self, train: "TrainConfig", params: dict) -> None:
        from ray.air.integrations.wandb import setup_wandb

        # Ray's API-key check reads the mode from the environment, not from the init kwargs
        os.environ["WANDB_MODE"] = train.wandb_mode
        prev = self.ids.get("wandb", {})
        run_id = prev["id"] if prev.get("project") == train.wandb_project else uuid.uuid4().hex[:16]
        self.wandb = setup_wandb(config=params, project=train.wandb_project, id=run_id, name=self.run_name,
                                 group=None, resume="allow", mode=train.wandb_mode,
                                 dir=str(self._dir(".")))
        self.ids["wandb"] = {"id": self.wandb.id, "project": train.wandb_project}

    # -- logging ------------------------------------------------------------------------------
    def log(self, row: dict) -> None:
        step = int(row["step"])
        values = {k: float(v) for k, v in row.items()
                  if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
        if self.mlflow is not None:
            self.mlflow.log_metrics(values, step=step, synchronous=False)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def flush(self) -> None:
        if self.tb is not None:
            self.tb.flush()
        if self.mlflow is not None:
            self.mlflow.flush_async_logging()
        self.staging.upload("tensorboard", "wandb")

    def close(self) -> None:
        """End every backend's run and upload the staged files (remote run directory)."""
        if self.tb is not None:
            self.tb.close()
        if self.mlflow is not None:
            self.mlflow.flush_async_logging()
            self.mlflow.end_run()
        if self.wandb is not None:
            self.wandb.finish()
        self.tb = self.mlflow = self.wandb = None
        self.flush()


def _mlflow_run_exists(uri: str, run_id: str | None) -> bool:
    if not run_id:
        return False
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        return MlflowClient(tracking_uri=uri).get_run(run_id).info.lifecycle_stage == "active"
    except MlflowException:
        return False


def open_trackers(run_uri: str, train: "TrainConfig", start_step: int = 0, params: dict | None = None) -> Trackers | None:
    """The run's :class:`Trackers`, or None when no backend is enabled."""
    return Trackers(run_uri, train, start_step, params) if enabled(train) else None
