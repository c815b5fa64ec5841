"""Training checkpoints: what a run needs to continue exactly where it stopped.

Layout of one checkpoint directory (reported with ``ray.train.report``; Ray Train uploads
every rank's files into the same ``checkpoint_*`` folder of ``<storage>/<run name>``):

  trainable.safetensors   trainable weights only (frozen encoder/LLM are never re-saved)
  optimizer.pt            AdamW state          scheduler.pt   LambdaLR state
  scaler.pt               GradScaler state     state.json     step, data position, config
  rng_rank<r>.pt          python / numpy / torch RNG states of rank r (one file per rank)
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file


@dataclass
class DataPosition:
    """Where the data stream is: ``batches_in_epoch`` micro-batches of ``epoch`` consumed per rank."""
    epoch: int = 0
    batches_in_epoch: int = 0
    samples_seen: int = 0                 # global, all ranks, all epochs
    shard_order: list[str] = field(default_factory=list)   # this epoch's shard order (for inspection)


@dataclass
class TrainState:
    step: int = 0                         # optimizer steps done
    data: DataPosition = field(default_factory=DataPosition)
    world_size: int = 1

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "TrainState":
        d = json.loads(text)
        return cls(step=d["step"], data=DataPosition(**d["data"]), world_size=d["world_size"])


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_rank_files(d: Path, rank: int) -> None:
    """Files every rank writes (its RNG states)."""
    torch.save(rng_state(), d / f"rng_rank{rank}.pt")


def save_shared_files(d: Path, trainable: dict[str, torch.Tensor], optimizer, scheduler, scaler,
                      state: TrainState, config: dict | None = None) -> None:
    """Files rank 0 writes: weights, optimizer, scheduler, scaler, state (+ the run's config)."""
    save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, str(d / "trainable.safetensors"))
    torch.save(optimizer.state_dict(), d / "optimizer.pt")
    torch.save(scheduler.state_dict(), d / "scheduler.pt")
    torch.save(scaler.state_dict(), d / "scaler.pt")
    (d / "state.json").write_text(state.to_json())
    if config is not None:
        (d / "config.json").write_text(json.dumps(config, indent=1, default=str))


def load_state(d: Path) -> TrainState:
    return TrainState.from_json((Path(d) / "state.json").read_text())


def load_into(d: Path, rank: int, model, optimizer, scheduler, scaler) -> TrainState:
    """Restore weights, optimizer, scheduler, scaler and this rank's RNG from checkpoint dir ``d``."""
    d = Path(d)
    model.load_trainable_state_dict(load_file(str(d / "trainable.safetensors")))
    optimizer.load_state_dict(torch.load(d / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(d / "scheduler.pt", weights_only=False))
    scaler.load_state_dict(torch.load(d / "scaler.pt", weights_only=False))
    rng = d / f"rng_rank{rank}.pt"
    if rng.exists():  # a different world size on resume: ranks without a file keep fresh RNG
        set_rng_state(torch.load(rng, weights_only=False))
    return load_state(d)
