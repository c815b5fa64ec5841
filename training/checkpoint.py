"""Training checkpoints: what a run needs to continue exactly where it stopped.

Layout of one checkpoint directory (reported with ``ray.train.report``; Ray Train uploads
every rank's files into the same ``checkpoint_*`` folder of ``<storage>/<run name>``):

  trainable.safetensors   trainable weights only (frozen encoder/LLM are never re-saved)
  optimizer.pt            AdamW state          scheduler.pt   LambdaLR state
  scaler.pt               GradScaler state     state.json     step, data position, config
  rng_rank<r>.safetensors python / numpy / torch RNG states of rank r (one file per rank)

Nothing here is read with a full unpickler: checkpoints may come from shared buckets, and a
pickle can run any code on load. The ``.pt`` files are read with ``torch.load(weights_only=True)``
(tensors and plain containers only); RNG states are tensors in safetensors plus JSON metadata.
"""
from __future__ import annotations

import json
import pickle
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file holds more than tensors and plain containers (it would run code)."""


@dataclass
class DataPosition:
    """Where the data stream is, in the epoch's global sample order (see :mod:`training.ingest`).

    ``consumed`` samples of ``epoch``'s seeded permutation are done (a multiple of the global
    batch): any world size continues at sample ``consumed`` of the same permutation."""
    epoch: int = 0
    consumed: int = 0
    samples_seen: int = 0                 # global, all ranks, all epochs


@dataclass
class TrainState:
    step: int = 0                         # optimizer steps done
    data: DataPosition = field(default_factory=DataPosition)
    world_size: int = 1
    global_batch: int = 0                 # samples per optimizer step when saved

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "TrainState":
        d = json.loads(text)
        data = dict(d["data"])
        if "consumed" not in data:  # a per-rank position of the old layout: restart at the next epoch
            data = {"epoch": data["epoch"] + (1 if data.get("batches_in_epoch") else 0), "consumed": 0,
                    "samples_seen": data.get("samples_seen", 0)}
        return cls(step=d["step"], data=DataPosition(**data), world_size=d["world_size"],
                   global_batch=d.get("global_batch", 0))


# -- RNG states without pickle --------------------------------------------------------------
def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, JSON metadata) of the python, numpy, torch and CUDA RNGs of this process."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    tensors = {"python": torch.tensor(py_state, dtype=torch.int64),
               "numpy": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
               "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    meta = {"python": json.dumps([py_version, py_gauss]),
            "numpy": json.dumps([np_name, int(np_pos), int(np_has_gauss), float(np_gauss)])}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    py_version, py_gauss = json.loads(meta["python"])
    random.setstate((py_version, tuple(int(x) for x in tensors["python"].tolist()), py_gauss))
    np_name, np_pos, np_has_gauss, np_gauss = json.loads(meta["numpy"])
    np.random.set_state((np_name, tensors["numpy"].numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda")), key=lambda k: int(k[4:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


def save_rng(path: Path) -> None:
    tensors, meta = rng_state()
    save_file(tensors, str(path), metadata=meta)


def load_rng(path: Path) -> None:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    set_rng_state(tensors, meta)


def load_tensors(path: Path):
    """``torch.load`` restricted to tensors and plain containers; anything else is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"{path}: refused to load: the file holds Python objects other than tensors and plain "
            f"containers, and unpickling them could run code. Checkpoints written by this project "
            f"never do; do not load this file with weights_only=False unless you wrote it. ({e})") from None


# -- save / load ------------------------------------------------------------------------------
def save_rank_files(d: Path, rank: int) -> None:
    """Files every rank writes (its RNG states)."""
    save_rng(d / f"rng_rank{rank}.safetensors")


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
    # every file is checked before anything is applied: a refused file leaves the model untouched
    blobs = [load_tensors(d / name) for name in ("optimizer.pt", "scheduler.pt", "scaler.pt")]
    model.load_trainable_state_dict(load_file(str(d / "trainable.safetensors")))
    for target, blob in zip((optimizer, scheduler, scaler), blobs):
        target.load_state_dict(blob)
    rng = d / f"rng_rank{rank}.safetensors"
    if rng.exists():  # a larger world on resume: the new ranks keep their fresh RNG
        load_rng(rng)
    return load_state(d)
