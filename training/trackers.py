"""Experiment tracking: forward each per-step metrics row (rank 0) to TensorBoard, MLflow and W&B.

One job: :class:`Trackers` receives the rows :class:`training.metrics.MetricsLog` writes to
``metrics.jsonl`` and hands their numeric values, under the same names, with ``step`` as the
step, to every backend enabled in :class:`TrackingConfig` (the ``tracking.*`` section, all off by default):

* ``tracking.tensorboard=true`` — ``torch.utils.tensorboard.SummaryWriter`` event files in
  ``<run>/tensorboard``. Ray Train v2 (Ray 2.60's default) documents logging straight from the
  train function; Ray's ``TBXLoggerCallback`` is a Ray *Tune* ``LoggerCallback`` and does not
  apply to Train v2 runs (``RunConfig.callbacks`` only takes ``ray.train.UserCallback``).
* ``tracking.mlflow_tracking_uri=...`` (+ ``tracking.mlflow_experiment``, default ``blip2``) — Ray's
  ``ray.air.integrations.mlflow.setup_mlflow`` inside the train function, then
  ``mlflow.log_metrics``. A ``file:`` URI (or a plain path) uses MLflow's file store, which
  MLflow >= 3.7 refuses unless ``MLFLOW_ALLOW_FILE_STORE=true``; asking for a file URI is taken
  as that opt-in (set for this process when unset).
* ``tracking.wandb_project=...`` (+ ``tracking.wandb_mode=online|offline``) — Ray's
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
A backend whose package is missing is a clear :class:`MissingBackendError` from
:meth:`TrackingConfig.check_installed`, which ``run_training`` calls before Ray Train starts (the
config itself is a document: ``blip2 config`` works where the packages are not installed).
"""
from __future__ import annotations

import importlib.util
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import fsspec

from pipelines.storage import Staging

IDS_FILE = "trackers.json"
# backend -> (its key, module imported, pip package to install)
PACKAGES = {"tensorboard": ("tracking.tensorboard", "tensorboard", "tensorboard"),
            "mlflow": ("tracking.mlflow_tracking_uri", "mlflow", "mlflow-skinny"),
            "wandb": ("tracking.wandb_project", "wandb", "wandb")}


class MissingBackendError(ValueError):
    """A tracking backend was asked for but its package is not installed."""


def require(key: str, module: str, pip: str) -> None:
    """Raise :class:`MissingBackendError` naming ``key`` and ``pip`` when ``module`` cannot be imported."""
    if importlib.util.find_spec(module) is None:
        raise MissingBackendError(f"{key} is set but the Python package '{pip}' is not installed "
                                  f"(module '{module}' not found): pip install {pip}")


@dataclass
class TrackingConfig:
    """The ``tracking.*`` section: where rank 0 also sends each metrics row."""
    tensorboard: bool = False          # TensorBoard event files in <run>/tensorboard (pip install tensorboard)
    mlflow_tracking_uri: str = ""      # e.g. http://mlflow:5000 or file:///abs/mlruns (pip install mlflow-skinny)
    mlflow_experiment: str = ""        # "": blip2
    wandb_project: str = ""            # Weights & Biases project (pip install wandb); files in <run>/wandb
    wandb_mode: str = "online"         # online | offline (`wandb sync <run>/wandb/offline-run-*` later)

    def validate(self) -> None:
        if self.wandb_mode not in ("online", "offline"):
            raise ValueError(f"wandb_mode must be online or offline, got {self.wandb_mode!r}")
        if self.mlflow_experiment and not self.mlflow_tracking_uri:
            raise ValueError("mlflow_experiment needs mlflow_tracking_uri")
        uri = self.mlflow_tracking_uri
        if uri and "@" in uri.split("://", 1)[-1].split("/", 1)[0]:
            raise ValueError("mlflow_tracking_uri must not carry user:password@ (configs are logged and "
                             "checkpointed); set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD instead")
        if uri and "://" not in uri and not uri.startswith("/"):
            raise ValueError(f"mlflow_tracking_uri {uri!r}: use a server URI or an absolute path / file:/// URI "
                             "(a relative path would resolve in the Ray worker's directory)")

    def enabled(self) -> list[str]:
        """The backends this section asks for."""
        return [name for name, on in (("tensorboard", self.tensorboard), ("mlflow", bool(self.mlflow_tracking_uri)),
                                      ("wandb", bool(self.wandb_project))) if on]

    def check_installed(self) -> None:
        """Raise :class:`MissingBackendError` for the first backend asked for whose package is missing."""
        for name in self.enabled():
            require(*PACKAGES[name])


class Trackers:
    """The enabled backends of one run, opened on rank 0 at ``start_step`` (0, or the resumed step)."""

    def __init__(self, run_uri: str, cfg: TrackingConfig, start_step: int = 0, params: dict | None = None):
        self.fs, self.root = fsspec.core.url_to_fs(run_uri)
        self.run_name = self.root.rstrip("/").rsplit("/", 1)[-1]
        self.staging = Staging(run_uri, prefix="blip2-trackers-")
        self.ids = self._read_ids()
        self.tb = self.mlflow = self.wandb = None
        if cfg.tensorboard:
            self._open_tensorboard(start_step)
        if cfg.mlflow_tracking_uri:
            self._open_mlflow(cfg, params or {})
        if cfg.wandb_project:
            self._open_wandb(cfg, params or {})
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

    def _open_mlflow(self, cfg: TrackingConfig, params: dict) -> None:
        from ray.air.integrations.mlflow import setup_mlflow

        uri, experiment = cfg.mlflow_tracking_uri, cfg.mlflow_experiment or "blip2"
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

    def _open_wandb(self, cfg: TrackingConfig, params: dict) -> None:
        from ray.air.integrations.wandb import setup_wandb

        # Ray's API-key check reads the mode from the environment, not from the init kwargs
        os.environ["WANDB_MODE"] = cfg.wandb_mode
        prev = self.ids.get("wandb", {})
        run_id = prev["id"] if prev.get("project") == cfg.wandb_project else uuid.uuid4().hex[:16]
        self.wandb = setup_wandb(config=params, project=cfg.wandb_project, id=run_id, name=self.run_name,
                                 group=None, resume="allow", mode=cfg.wandb_mode,
                                 dir=str(self._dir(".")))
        self.ids["wandb"] = {"id": self.wandb.id, "project": cfg.wandb_project}

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


def open_trackers(run_uri: str, cfg: TrackingConfig, start_step: int = 0, params: dict | None = None) -> Trackers | None:
    """The run's :class:`Trackers`, or None when no backend is enabled."""
    return Trackers(run_uri, cfg, start_step, params) if cfg.enabled() else None
