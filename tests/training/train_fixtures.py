"""Helpers for the training-loop tests: CapFilt shard sets made from the synthetic corpus, and
Ray Train checkpoint folders written from a model."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import pyarrow as pa

from pipelines.schema import CAPFILT
from pipelines.shardio import ShardSet

TOY = "tests.training.toy_model:ToyModel"
TOY_EPOCH_STEPS = 6  # the 48-sample corpus at global batch 8


def toy_train_config(root: Path, name: str, **kw):
    """The toy runs' TrainConfig: one epoch of ``root/capfilt`` at global batch 8 on 2 workers, a
    checkpoint every step, into ``root/runs/<name>``; ``kw`` overrides."""
    from training.config import TrainConfig

    base = dict(input=str(root / "capfilt"), output=str(root / "runs"), name=name, steps=TOY_EPOCH_STEPS,
                batch_size=4, global_batch=8, num_workers=2, checkpoint_every=1, log_every=1, warmup_steps=2,
                lr=1e-3, min_lr=1e-4)
    cfg = TrainConfig(**{**base, **kw})
    cfg.validate()
    return cfg


def capfilt_table(corpus_dir: Path, items, start: int, stop: int, bad: set[int] = frozenset(),
                  source: Callable[[int], str] = lambda index: "synthetic",
                  human: Callable[[int], list[str] | None] = lambda index: None) -> pa.Table:
    """Rows [start, stop) of the corpus as CapFilt rows; indices in ``bad`` get undecodable bytes;
    ``source(index)`` names each row's source; a row for which ``human(index)`` gives a caption
    list is a human row with those captions (scores null-free zeros, as CapFilt passes them)."""
    rows = items[start:stop]
    images = [b"not an image" if it.index in bad else (corpus_dir / it.file).read_bytes() for it in rows]
    humans = [human(it.index) for it in rows]
    return pa.Table.from_pydict({
        "key": [f"{it.index:06d}" for it in rows],
        "source": [source(it.index) for it in rows],
        "policy": ["web" if h is None else "human" for h in humans],
        "url": [f"http://127.0.0.1:1/{it.file}" for it in rows],
        "sha256": [hashlib.sha256(data).hexdigest() for data in images],
        "meta": [None] * len(rows),
        "image": images,
        "captions": [[it.caption, f"a picture of {it.caption}!"] if h is None else h for it, h in zip(rows, humans)],
        "scores": [[0.31, 0.29] if h is None else [0.0] * len(h) for h in humans],
        "candidates": [None] * len(rows),
        "original_caption": [it.caption for it in rows],
    }, schema=CAPFILT.schema)


def write_capfilt(uri: str, corpus, rows_per_shard: int = 12, bad: set[int] = frozenset(),
                  source: Callable[[int], str] = lambda index: "synthetic",
                  human: Callable[[int], list[str] | None] = lambda index: None) -> ShardSet:
    """The corpus as a committed CapFilt shard set at ``uri`` (local path or s3://)."""
    corpus_dir, items = corpus
    shards = ShardSet(uri)
    for i, start in enumerate(range(0, len(items), rows_per_shard)):
        shards.write_shard(i, capfilt_table(corpus_dir, items, start, start + rows_per_shard, bad, source, human),
                           CAPFILT)
    shards.write_manifest(CAPFILT)
    return shards


def write_trainer_checkpoint(ckpt: Path, model, step: int, stage: int) -> Path:
    """A ``checkpoint_*`` folder as the Ray Train loop writes it, holding ``model``'s trainable weights."""
    import dataclasses

    import torch

    from training.checkpoint import TrainState, save_shared_files

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    ckpt.mkdir(parents=True, exist_ok=True)
    save_shared_files(ckpt, model.trainable_state_dict(), optimizer, scheduler, torch.amp.GradScaler("cpu"),
                      TrainState(step=step), config={"seed": 0, "train": {"stage": stage},
                                                     "model": dataclasses.asdict(model.cfg)})
    return ckpt


def run_training_with_hooks(model, cfg, ingest=None, tracking=None, *, seed: int = 0, log_keys: bool = True,
                            kill: str = "", model_class: str = ""):
    """``run_training`` with the test-only hooks of :mod:`training.hooks` set in the environment
    (the driver reads them once): per-step sample keys in the metrics, and a worker SIGKILL
    (``kill="step=5,marker=/path"``)."""
    import pytest

    from training.loop import run_training

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BLIP2_LOG_KEYS", "1" if log_keys else "0")
        if kill:
            mp.setenv("BLIP2_FAULT_INJECT", kill)
        else:
            mp.delenv("BLIP2_FAULT_INJECT", raising=False)
        return run_training(model, cfg, ingest, tracking, seed=seed, model_class_spec=model_class)
