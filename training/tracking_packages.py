"""Which Python package each experiment-tracking backend needs, and the check that it is installed.

A leaf module: ``TrainConfig.validate`` runs the check when a config is built (so a missing
package is refused before any work) and ``training.trackers`` again at start-up, on the workers.
"""
from __future__ import annotations

import importlib.util

# backend -> (module imported, pip package to install)
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"),
            "mlflow": ("mlflow", "mlflow-skinny"),
            "wandb": ("wandb", "wandb")}
KEYS = {"tensorboard": "train.tensorboard", "mlflow": "train.mlflow_tracking_uri", "wandb": "train.wandb_project"}


class MissingBackendError(ValueError):
    """A tracking backend was asked for but its package is not installed."""


def require(module: str, pip: str, key: str) -> None:
    """Raise :class:`MissingBackendError` naming ``pip`` when ``module`` cannot be imported."""
    if importlib.util.find_spec(module) is None:
        raise MissingBackendError(f"{key} is set but the Python package '{pip}' is not installed "
                                  f"(module '{module}' not found): pip install {pip}")


def enabled(train) -> list[str]:
    """The backends a ``TrainConfig`` asks for."""
    return [name for name, on in (("tensorboard", train.tensorboard), ("mlflow", bool(train.mlflow_tracking_uri)),
                                  ("wandb", bool(train.wandb_project))) if on]


def check_installed(train) -> None:
    """Raise :class:`MissingBackendError` for the first backend asked for whose package is missing."""
    for name in enabled(train):
        require(*PACKAGES[name], KEYS[name])
