"""Pre-training on Ray Train: ``run_training`` (driver) and ``train_loop_per_worker`` (each rank).

One optimizer step consumes exactly ``G = train.global_batch`` samples — the next G positions
of the epoch's seeded global order (:mod:`training.ingest`) — whatever the world size: the
step is split into accumulation rounds and per-rank micro-batches by
:func:`training.ingest.step_split` (at most ``batch_size`` per micro-batch). A rank scales its
micro-batch loss by ``n × world / G`` so the DDP-averaged gradient is the mean over the G
samples even when ranks hold different counts. The LR schedule counts optimizer steps.

Resume contract (tested in ``tests/training/test_resume_stage1.py`` and ``test_elastic.py``):
the checkpoint of step k stores how many samples of the epoch's order are consumed; a run
restarted from it (``blip2 train`` again with the same output and name, a worker failure under
``FailureConfig``, or an elastic resize) continues with exactly the next unseen sample, at any
world size, with the same augmentation. At the same world size the per-rank RNG states are
restored too, so losses match the uninterrupted run's; after a resize the ranks that had no
saved RNG (or whose stream is now another shard of the batch) draw dropout/hard negatives
from their restored-or-fresh stream: same samples, different dropout.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from pipelines.shardio import redact
from pipelines.storage import is_local, staged_output
from training.checkpoint import DataPosition, TrainState, load_into, save_rank_files, save_shared_files
from training.config import ModelConfig, TrainConfig
from training.hooks import Hooks
from training.ingest import IngestConfig, IngestSpec, ShardRows, iter_epoch, list_shards, step_samples, step_split
from training.metrics import MetricsLog
from training.optim import autocast, build_optimizer, grad_scaler, optimizer_step
from training.source_weights import SourceMix, check_weight_names
from training.trackers import TrackingConfig, open_trackers

DEFAULT_MODELS = {1: "training.stage1:Blip2Stage1", 2: "training.stage2:Blip2Stage2"}


@dataclass(frozen=True)
class WorkerConfig:
    """What every rank receives (picklable): the config sections as read, and the shard set the
    driver listed once."""
    model: ModelConfig
    train: TrainConfig
    ingest: IngestConfig
    tracking: TrackingConfig
    shards: tuple[ShardRows, ...]
    seed: int
    run_uri: str
    model_class: str = ""          # "module:Class" with the model interface; "": the stage's BLIP-2 model
    hooks: Hooks = field(default_factory=Hooks)

    def data(self) -> IngestSpec:
        return IngestSpec(self.ingest, self.shards, self.seed, self.model.image_size)

    def params(self) -> dict:
        """The run's parameters, as logged to the trackers and written into every checkpoint."""
        return redact({"seed": self.seed, "train": self.train.__dict__, "ingest": self.ingest.__dict__,
                       "tracking": self.tracking.__dict__, "model": self.model.__dict__})


def model_class(stage: int, spec: str = ""):
    """The model class: ``spec`` ("module:Class") or the stage's BLIP-2 model."""
    spec = spec or DEFAULT_MODELS[stage]
    module, _, name = spec.partition(":") if ":" in spec else spec.rpartition(".")
    return getattr(importlib.import_module(module), name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def step_batches(spec: IngestSpec, pos: DataPosition, rank: int, split: list[list[int]]) -> Iterator[list[dict]]:
    """Endless stream of this rank's micro-batches per optimizer step (cut as ``split``, the
    :func:`step_split` of a step), starting at ``pos``; ``pos`` is advanced when a step's batches
    are handed out. (With source weights an epoch's length is that of its weighted order, so it
    is taken per epoch.)"""
    global_batch = step_samples(split)
    while True:
        order = spec.order(pos.epoch)
        stop = spec.epoch_stop(order, global_batch)
        if pos.consumed >= stop:
            pos.epoch, pos.consumed = pos.epoch + 1, 0
            order = spec.order(pos.epoch)
            stop = spec.epoch_stop(order, global_batch)
        stream = iter_epoch(spec, pos.epoch, rank, split, start=pos.consumed, order=order)
        while pos.consumed < stop:
            batches = [next(stream) for _ in split]
            pos.consumed += global_batch
            pos.samples_seen += global_batch
            yield batches


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
    model = model_class(train.stage, wc.model_class).from_config(wc.model).to(device)
    optimizer, scheduler = build_optimizer(model, train)
    scaler = grad_scaler(train.precision, device)
    global_batch = train.resolved_global_batch()
    state = TrainState(world_size=world, global_batch=global_batch)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = load_into(Path(d), rank, model, optimizer, scheduler, scaler)
        if state.world_size != world or state.global_batch not in (0, global_batch):
            print(f"[blip2] rank {rank}: resuming step {state.step} (epoch {state.data.epoch}, sample "
                  f"{state.data.consumed}) with {world} workers (saved with {state.world_size})", flush=True)
        state.world_size = world
    else:
        seed_everything(wc.seed * 1000 + rank)  # per-rank stream for dropout etc.

    ddp = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True}) \
        if world > 1 else model
    raw = model
    split = step_split(global_batch, train.batch_size, world)
    accum = len(split)
    log = MetricsLog(wc.run_uri, state.step, open_trackers(wc.run_uri, wc.tracking, state.step, wc.params())) \
        if rank == 0 else None
    state.global_batch = global_batch
    data = wc.data()
    stream = step_batches(data, state.data, rank, split)
    mix = SourceMix(data, global_batch) if rank == 0 and data.by_source else None
    trainable = [p for p in raw.parameters() if p.requires_grad]

    raw.train()
    target = min(train.steps, train.stop_after or train.steps)
    while state.step < target:
        t0 = time.perf_counter()
        losses, keys, texts, replaced = {}, [], [], 0
        tw = time.perf_counter()
        batches = next(stream)
        wait = time.perf_counter() - tw
        for i, batch in enumerate(batches):
            weight = len(batch["key"]) * world / global_batch  # DDP averages over ranks: mean over G
            keys += batch["key"]
            texts += batch["text"]
            replaced += batch["replaced"]
            sync = i == accum - 1 or world == 1
            with (contextlib.nullcontext() if sync else ddp.no_sync()):
                with autocast(train.precision, device):
                    out = ddp(batch["pixel_values"].to(device, non_blocking=True), batch["text"])
                scaler.scale(out["loss"].float() * weight).backward()
            for k, v in out.items():
                if k.startswith("loss"):
                    losses[k] = losses.get(k, 0.0) + float(v.detach()) * weight
        if train.grad_clip > 0:
            scaler.unscale_(optimizer)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, train.grad_clip))
        lr = scheduler.get_last_lr()[0]
        optimizer_step(optimizer, scheduler, scaler)
        state.step += 1
        wc.hooks.maybe_kill(state.step, rank, world)

        losses = _mean_across_ranks(losses, device)
        all_keys = _gather_keys(keys) if wc.hooks.log_keys else None
        dt = time.perf_counter() - t0
        row = {"step": state.step, "epoch": state.data.epoch, "lr": lr, **losses,
               "samples_per_s": global_batch / dt, "tokens_per_s": _count_tokens(raw, texts) * world / dt,
               "data_wait_s": wait, "step_time_s": dt, "samples_seen": state.data.samples_seen,
               "consumed_in_epoch": state.data.consumed, "global_batch": global_batch, "world_size": world,
               "accum": accum, "replaced": replaced, "time": time.time()}
        if train.grad_clip > 0:
            row["grad_norm"] = grad_norm
        if device.type == "cuda":
            row["gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        if all_keys is not None:
            row["keys"] = all_keys
        if mix is not None:
            row.update(mix.metrics(state.data.epoch, state.data.consumed))
        if log is not None:
            log.log(row)

        last = state.step == target
        # a node about to be pre-empted (Ray Core drains it): checkpoint now, then hold. The call
        # is a barrier over all ranks, hence only every log_every steps
        notice = not last and state.step % train.log_every == 0 and ray.train.get_preemption_info()
        if state.step % train.checkpoint_every == 0 or last or notice:
            _report_checkpoint(wc, raw, optimizer, scheduler, scaler, state, rank, row, log)
        elif state.step % train.log_every == 0:
            ray.train.report({k: v for k, v in row.items() if k != "keys"})
        if notice:
            _hold_for_reclaim(notice, rank, state.step)

    if rank == 0:
        log.close()
        if state.step >= train.steps:
            save_final(raw, f"{wc.run_uri}/final")


HOLD_PAST_DEADLINE_S = 60.0


def _hold_for_reclaim(info, rank: int, step: int) -> None:
    """After the pre-emption checkpoint, wait for the node to go instead of training on.

    Steps taken now would be redone from that checkpoint anyway, and a collective that loses
    its peer mid-step fails the surviving ranks, which Ray Train counts against ``max_failures``.
    Idle ranks let it see only the reclaimed node's workers die (a pre-emption, retried without
    limit) and restart the group at the deadline, from the checkpoint; the raise only bounds a
    controller that does not."""
    from ray.train.v2._internal.constants import DEFAULT_PREEMPTION_DEADLINE_S

    deadline = info.deadline_ms / 1000 if info.deadline_ms else time.time() + DEFAULT_PREEMPTION_DEADLINE_S
    print(f"[blip2] rank {rank}: pre-emption of {info.preempted_node_ids} (ranks {info.preempted_ranks}): "
          f"checkpointed step {step}, holding until the restart ({deadline - time.time():.0f} s to the deadline)",
          flush=True)
    while time.time() < deadline + HOLD_PAST_DEADLINE_S:
        time.sleep(0.5)
    raise RuntimeError(f"pre-emption deadline passed {HOLD_PAST_DEADLINE_S:.0f} s ago and Ray Train has not "
                       f"restarted the worker group; giving up (the run resumes from step {step})")


def _report_checkpoint(wc: WorkerConfig, model, optimizer, scheduler, scaler, state: TrainState, rank: int,
                       row: dict, log: MetricsLog | None) -> None:
    import ray.train

    with tempfile.TemporaryDirectory(prefix="blip2-ckpt-") as d:
        save_rank_files(Path(d), rank)
        if rank == 0:
            save_shared_files(Path(d), model.trainable_state_dict(), optimizer, scheduler, scaler, state,
                              config=wc.params())
            log.flush()
        metrics = {k: v for k, v in row.items() if k != "keys"}
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                         checkpoint_dir_name=f"checkpoint_{state.step:08d}")


def save_final(model, uri: str) -> str:
    """``model.save_pretrained`` to ``uri`` (local, or staged locally then copied to s3://)."""
    with staged_output(uri, prefix="blip2-final-") as d:
        model.save_pretrained(str(d))
    return uri


# -- driver side ------------------------------------------------------------------------------
def run_name(train: TrainConfig) -> str:
    return train.name or f"stage{train.stage}"


def storage(uri: str) -> tuple[str, object | None]:
    """(storage_path, storage_filesystem) for RunConfig: absolute local paths, s3 through fsspec."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(uri)
    if is_local(fs):
        return os.path.abspath(root), None
    import pyarrow.fs as pafs

    return root, pafs.PyFileSystem(pafs.FSSpecHandler(fs))  # honours AWS_ENDPOINT_URL like shardio


def run_uri(train: TrainConfig) -> str:
    path, fs = storage(train.output)
    return f"{train.output.rstrip('/')}/{run_name(train)}" if fs is not None else f"{path}/{run_name(train)}"


def run_training(model: ModelConfig, train: TrainConfig, ingest: IngestConfig | None = None,
                 tracking: TrackingConfig | None = None, *, seed: int = 0, model_class_spec: str = ""):
    """Fit with a ``TorchTrainer``; returns Ray's ``Result``. Re-running with the same output and
    name resumes from the newest checkpoint in storage (Ray Train restores the run's state).
    ``train.num_workers`` = n or [min, max] (elastic: Ray Train starts with as many workers as
    fit, restarts from the last checkpoint on failures and grows when resources appear)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ingest, tracking = ingest or IngestConfig(), tracking or TrackingConfig()
    tracking.check_installed()  # a backend asked for but not installed: name its package before any work
    shards = list_shards(train.input, sources=True)  # the per-source mix and each human row's captions
    check_weight_names(ingest.source_weights, shards)  # fail here, not in every retry
    wc = WorkerConfig(model=model, train=train, ingest=ingest, tracking=tracking, shards=tuple(shards),
                      seed=seed, run_uri=run_uri(train), model_class=model_class_spec, hooks=Hooks.from_env())
    data = wc.data()
    try:  # the workers' check, once here for epoch 0, so a too-small input fails before Ray Train starts
        data.epoch_stop(data.order(0), train.resolved_global_batch())
    except ValueError as e:
        raise ValueError(f"{train.input}: {e}") from None
    path, fs = storage(train.output)
    workers = train.num_workers if isinstance(train.num_workers, int) else tuple(train.num_workers)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"worker": wc},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=train.use_gpu,
                                     resources_per_worker={"CPU": train.cpus_per_worker,
                                                           **({"GPU": 1} if train.use_gpu else {})}),
        run_config=RunConfig(name=run_name(train), storage_path=path, storage_filesystem=fs,
                             failure_config=FailureConfig(max_failures=train.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=train.keep_checkpoints or None)),
    )
    return trainer.fit()
