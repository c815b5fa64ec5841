"""Pre-training on Ray Train: ``run_training`` (driver) and ``train_loop_per_worker`` (each rank).

One optimizer step = ``accum`` micro-batches of ``batch_size`` per rank, so the step's global
batch is ``batch_size × world × accum`` (= ``train.global_batch``). The data position is
counted in micro-batches per rank per epoch; with the deterministic rank slices of
:mod:`training.ingest` that number fully determines which samples every rank has consumed.

Resume contract (tested in ``tests/training/test_resume_stage1.py``): a run restarted from the
checkpoint of step k (``blip2 train`` again with the same output and name, or a worker
failure under ``FailureConfig``) sees exactly the samples an uninterrupted run sees after
step k, with the same augmentation, and the same RNG states, so its losses match the
uninterrupted run's up to float non-associativity. Caveats:
* with ``train.shuffle_buffer > 0`` the local shuffle buffer restarts empty, so samples
  within ±``shuffle_buffer`` of the resume point may be reordered, repeated or skipped;
* resuming with a different number of workers restarts at the next epoch boundary.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import random
import signal
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from pipelines.shardio import redact
from training.checkpoint import DataPosition, TrainState, load_into, save_rank_files, save_shared_files
from training.config import ModelConfig, TrainConfig
from training.ingest import IngestSpec, batches_per_epoch, epoch_shard_order, iter_epoch, list_shards
from training.metrics import MetricsLog
from training.optim import accumulation_steps, autocast, build_optimizer, grad_scaler
from training.trackers import open_trackers

DEFAULT_MODELS = {1: "training.stage1:Blip2Stage1", 2: "training.stage2:Blip2Stage2"}


@dataclass(frozen=True)
class WorkerConfig:
    """What every rank receives (picklable)."""
    model: ModelConfig
    train: TrainConfig
    seed: int
    ingest: IngestSpec
    run_uri: str


def model_class(train: TrainConfig):
    """The model class: ``train.model_class`` ("module:Class") or the stage's BLIP-2 model."""
    spec = train.model_class or DEFAULT_MODELS[train.stage]
    module, _, name = spec.partition(":") if ":" in spec else spec.rpartition(".")
    return getattr(importlib.import_module(module), name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def micro_batches(spec: IngestSpec, pos: DataPosition, rank: int, world: int) -> Iterator[dict]:
    """Endless micro-batch stream across epochs, starting at ``pos``; updates ``pos`` as it goes."""
    per_epoch = batches_per_epoch(list(spec.shards), world, spec.batch_size)
    if per_epoch == 0:
        raise ValueError(f"{sum(s.rows for s in spec.shards)} samples cannot give one batch of "
                         f"{spec.batch_size} to each of {world} workers")
    while True:
        pos.shard_order = [s.url.rsplit("/", 1)[-1] for s in epoch_shard_order(list(spec.shards), spec.seed, pos.epoch)]
        for batch in iter_epoch(spec, pos.epoch, rank, world, skip=pos.batches_in_epoch * spec.batch_size):
            pos.batches_in_epoch += 1
            pos.samples_seen += spec.batch_size * world
            yield batch
        pos.epoch, pos.batches_in_epoch = pos.epoch + 1, 0


def _mean_across_ranks(values: dict[str, float], device) -> dict[str, float]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, (t / dist.get_world_size()).tolist()))


def _gather_keys(keys: list[str]) -> list[str]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return keys
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, keys)
    return [k for rank_keys in out for k in rank_keys]


def _count_tokens(model, texts: list[str]) -> int:
    tok = getattr(model, "tokenizer", None)
    if tok is not None:
        try:
            return int(sum(len(ids) for ids in tok(texts)["input_ids"]))
        except Exception:  # noqa: BLE001 - metrics must never stop training
            pass
    return sum(len(t.split()) for t in texts)


def _maybe_crash(train: TrainConfig, step: int, rank: int, world: int) -> None:
    """Test hook for the fault-tolerance test: die like a lost node (SIGKILL), once."""
    if train.crash_at_step and step == train.crash_at_step and rank == world - 1 and train.crash_marker:
        marker = Path(train.crash_marker)
        if not marker.exists():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(f"killed rank {rank} pid {os.getpid()} at step {step}\n")
            os.kill(os.getpid(), signal.SIGKILL)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point of every rank. ``config["worker"]`` is a :class:`WorkerConfig`."""
    import ray.train
    import ray.train.torch

    wc: WorkerConfig = config["worker"]
    train = wc.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()

    seed_everything(wc.seed)  # identical initial weights on every rank
    model = model_class(train).from_config(wc.model).to(device)
    optimizer, scheduler = build_optimizer(model, train)
    scaler = grad_scaler(train.precision, device)
    state = TrainState(world_size=world)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = load_into(Path(d), rank, model, optimizer, scheduler, scaler)
        if state.world_size != world and state.data.batches_in_epoch:
            state.data = replace(state.data, epoch=state.data.epoch + 1, batches_in_epoch=0)
        state.world_size = world
    else:
        seed_everything(wc.seed * 1000 + rank)  # per-rank stream for dropout etc.

    ddp = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True}) \
        if world > 1 else model
    raw = model
    accum = accumulation_steps(train, world)
    log = MetricsLog(wc.run_uri, state.step, open_trackers(
        wc.run_uri, train, state.step, redact({"seed": wc.seed, "train": train.__dict__, "model": wc.model.__dict__}))
    ) if rank == 0 else None
    stream = micro_batches(wc.ingest, state.data, rank, world)
    trainable = [p for p in raw.parameters() if p.requires_grad]

    raw.train()
    target = min(train.steps, train.stop_after or train.steps)
    while state.step < target:
        t0 = time.perf_counter()
        wait, losses, keys, texts, replaced = 0.0, {}, [], [], 0
        for i in range(accum):
            tw = time.perf_counter()
            batch = next(stream)
            wait += time.perf_counter() - tw
            keys += batch["key"]
            texts += batch["text"]
            replaced += batch["replaced"]
            sync = i == accum - 1 or world == 1
            with (contextlib.nullcontext() if sync else ddp.no_sync()):
                with autocast(train.precision, device):
                    out = ddp(batch["pixel_values"].to(device, non_blocking=True), batch["text"])
                scaler.scale(out["loss"].float() / accum).backward()
            for k, v in out.items():
                if k.startswith("loss"):
                    losses[k] = losses.get(k, 0.0) + float(v.detach()) / accum
        if train.grad_clip > 0:
            scaler.unscale_(optimizer)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, train.grad_clip))
        lr = scheduler.get_last_lr()[0]
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        state.step += 1
        _maybe_crash(train, state.step, rank, world)

        losses = _mean_across_ranks(losses, device)
        all_keys = _gather_keys(keys) if train.log_keys else None
        dt = time.perf_counter() - t0
        n_samples = len(keys) * world
        row = {"step": state.step, "epoch": state.data.epoch, "lr": lr, **losses,
               "samples_per_s": n_samples / dt, "tokens_per_s": _count_tokens(raw, texts) * world / dt,
               "data_wait_s": wait, "step_time_s": dt, "samples_seen": state.data.samples_seen,
               "replaced": replaced}
        if train.grad_clip > 0:
            row["grad_norm"] = grad_norm
        if device.type == "cuda":
            row["gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        if all_keys is not None:
            row["keys"] = all_keys
        if log is not None:
            log.log(row)

        last = state.step == target
        if state.step % train.checkpoint_every == 0 or last:
            _report_checkpoint(wc, raw, optimizer, scheduler, scaler, state, rank, row, log)
        elif state.step % train.log_every == 0:
            ray.train.report({k: v for k, v in row.items() if k != "keys"})

    if rank == 0:
        log.close()
        if state.step >= train.steps:
            save_final(raw, f"{wc.run_uri}/final")


def _report_checkpoint(wc: WorkerConfig, model, optimizer, scheduler, scaler, state: TrainState, rank: int,
                       row: dict, log: MetricsLog | None) -> None:
    import ray.train

    with tempfile.TemporaryDirectory(prefix="blip2-ckpt-") as d:
        save_rank_files(Path(d), rank)
        if rank == 0:
            save_shared_files(Path(d), model.trainable_state_dict(), optimizer, scheduler, scaler, state,
                              config=redact({"seed": wc.seed, "train": wc.train.__dict__, "model": wc.model.__dict__}))
            log.flush()
        metrics = {k: v for k, v in row.items() if k != "keys"}
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                         checkpoint_dir_name=f"checkpoint_{state.step:08d}")


def save_final(model, uri: str) -> str:
    """``model.save_pretrained`` to ``uri`` (local, or staged locally then copied to s3://)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(uri)
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        model.save_pretrained(root)
        return uri
    with tempfile.TemporaryDirectory(prefix="blip2-final-") as d:
        model.save_pretrained(d)
        fs.put(d.rstrip("/") + "/", root.rstrip("/") + "/", recursive=True)
    return uri


# -- driver side ------------------------------------------------------------------------------
def run_name(train: TrainConfig) -> str:
    return train.name or f"stage{train.stage}"


def storage(uri: str) -> tuple[str, object | None]:
    """(storage_path, storage_filesystem) for RunConfig: absolute local paths, s3 through fsspec."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(uri)
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        return os.path.abspath(root), None
    import pyarrow.fs as pafs

    return root, pafs.PyFileSystem(pafs.FSSpecHandler(fs))  # honours AWS_ENDPOINT_URL like shardio


def run_uri(train: TrainConfig) -> str:
    path, fs = storage(train.output)
    return f"{train.output.rstrip('/')}/{run_name(train)}" if fs is not None else f"{path}/{run_name(train)}"


def run_training(model: ModelConfig, train: TrainConfig, seed: int = 0):
    """Fit with a ``TorchTrainer``; returns Ray's ``Result``. Re-running with the same output and
    name resumes from the newest checkpoint in storage (Ray Train restores the run's state)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    shards = list_shards(train.input)
    if batches_per_epoch(shards, train.num_workers, train.batch_size) == 0:  # fail here, not in every retry
        raise ValueError(f"{train.input}: {sum(s.rows for s in shards)} samples cannot give one batch of "
                         f"{train.batch_size} to each of {train.num_workers} workers")
    spec = IngestSpec(tuple(shards), seed=seed, batch_size=train.batch_size, image_size=train.image_size,
                      min_scale=train.min_scale, max_words=train.max_words, hflip=train.hflip,
                      caption_pick=train.caption_pick,
                      map_batch_size=train.map_batch_size, ingest_cpus=train.ingest_cpus,
                      shuffle_buffer=train.shuffle_buffer)
    path, fs = storage(train.output)
    wc = WorkerConfig(model=model, train=train, seed=seed, ingest=spec, run_uri=run_uri(train))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"worker": wc},
        scaling_config=ScalingConfig(num_workers=train.num_workers, use_gpu=train.use_gpu,
                                     resources_per_worker={"CPU": train.cpus_per_worker,
                                                           **({"GPU": 1} if train.use_gpu else {})}),
        run_config=RunConfig(name=run_name(train), storage_path=path, storage_filesystem=fs,
                             failure_config=FailureConfig(max_failures=train.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=train.keep_checkpoints or None)),
    )
    return trainer.fit()
