"""Training benchmarks, side by side in one run (CPU by default; tiny BLIP-2 stage-1 model).

(a) Loop overhead: the real ``training.loop.train_loop_per_worker`` (through ``run_training``:
    1 Ray Train worker, Ray Data ingest, metrics, checkpoint at the end) vs a bare torch loop
    stepping the same model and optimizer over the very batches ingest delivers (collected
    beforehand). Median ms/step of both and the ratio; target <= 1.05. The loop's time per step
    comes from its own metrics (``step_time_s``, which includes waiting for data, ``data_wait_s``).
(b) Ingest headroom: samples/s the Ray Data ingest (row-group reads, shuffle windows, decode, crop,
    flip, normalise, captions) delivers to one worker vs samples/s one train step consumes. Target >= 3.
(c) Shuffle quality: the share of sample pairs inside a global batch that come from the same shard,
    for the epoch order of ``training.ingest`` vs a uniform random permutation, on this benchmark's
    shard set and on a paper-sized one (129M samples in 10k-row shards, global batch 1680; the
    order is only computed, nothing is read).

    .venv/bin/python benchmarks/train.py [--steps 30] [--batch 16] [--images 512] [--image-size 64]

GPU figures (stage-1 samples/s and MFU with ViT-g-sized random weights, target >= 400 samples/s
per H100) come from ``benchmarks/gpu.py stage1`` on a CUDA machine.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def timed_steps(model, batches, train_cfg) -> list[float]:
    """One optimizer step per batch; returns seconds per step (first 3 are warm-up, dropped)."""
    import torch

    from training.optim import autocast, build_optimizer

    opt, sched = build_optimizer(model, train_cfg)
    model.train()
    times = []
    for pixels, texts in batches:
        t = time.perf_counter()
        with autocast(train_cfg.precision, torch.device("cpu")):
            loss = model(pixels, texts)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        times.append(time.perf_counter() - t)
    return times[3:]


def bare_in_ray_worker(model_cfg, batches, train_cfg, threads: int) -> list[float]:
    """Control: the bare loop in a plain Ray worker process (Ray starts its workers niced, which
    alone costs CPU share on a loaded machine; loop / control isolates what the loop adds)."""
    import torch

    from training.stage1 import Blip2Stage1

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    return timed_steps(Blip2Stage1.from_config(model_cfg), batches, train_cfg)


def write_shards(uri: str, corpus: Path, items, rows_per_shard: int) -> None:
    """The synthetic corpus as a committed CapFilt shard set (the training input CapFilt writes)."""
    import hashlib

    import pyarrow as pa

    from pipelines.schema import CAPFILT
    from pipelines.shardio import ShardSet

    shards = ShardSet(uri)
    for i, start in enumerate(range(0, len(items), rows_per_shard)):
        rows = items[start:start + rows_per_shard]
        images = [(corpus / it.file).read_bytes() for it in rows]
        shards.write_shard(i, pa.Table.from_pydict({
            "key": [f"{it.index:06d}" for it in rows], "source": ["synthetic"] * len(rows),
            "policy": ["web"] * len(rows), "url": [f"http://127.0.0.1:1/{it.file}" for it in rows],
            "sha256": [hashlib.sha256(b).hexdigest() for b in images], "meta": [None] * len(rows),
            "image": images, "captions": [[it.caption, f"a picture of {it.caption}"] for it in rows],
            "scores": [[0.3, 0.29] for _ in rows], "candidates": [None] * len(rows),
            "original_caption": [it.caption for it in rows]}, schema=CAPFILT.schema), CAPFILT)
    shards.write_manifest(CAPFILT)


def same_shard_share(shard_ids, batch: int, batches: int) -> float:
    """Share of same-shard pairs among all pairs inside each of the first ``batches`` global batches."""
    import numpy as np

    same = total = 0
    for b in range(batches):
        counts = np.unique(np.asarray(shard_ids[b * batch:(b + 1) * batch]), return_counts=True)[1]
        same += int((counts * (counts - 1) // 2).sum())
        total += int(counts.sum()) * (int(counts.sum()) - 1) // 2
    return same / total


def shuffle_quality(shards, batch: int, window: int, batches: int) -> tuple[float, float]:
    """Same-shard pair shares of (our epoch order, a uniform permutation)."""
    import numpy as np

    from training.ingest import EpochOrder

    ours = EpochOrder(tuple(shards), seed=0, epoch=0, window=window).positions(0, batch * batches)[0]
    total = sum(s.rows for s in shards)
    picked = np.random.default_rng(0).choice(total, batch * batches, replace=False)
    uniform = np.searchsorted(np.cumsum([s.rows for s in shards]), picked, side="right")
    return same_shard_share(ours, batch, batches), same_shard_share(uniform, batch, batches)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch threads in both loops (fair comparison)")
    args = ap.parse_args()
    # what Ray sets in its workers (OMP_NUM_THREADS = CPUs of the worker), so both loops match
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)


    import ray
    import torch

    from orchestration.tiny_models import build_tiny_models
    from pipelines.synthetic import make_corpus
    from training.config import ModelConfig, TrainConfig
    from training.ingest import IngestConfig, IngestSpec, ShardRows, iter_epoch, list_shards, step_split
    from training.loop import run_training
    from training.metrics import read_metrics
    from training.stage1 import Blip2Stage1

    work = Path(tempfile.mkdtemp(prefix="blip2-bench-train-"))
    models = build_tiny_models(work / "models", seed=0)
    mcfg = ModelConfig(vision="clip_vit_l", vision_path=str(models["vision"]), qformer_init=str(models["bert"]),
                       num_query_tokens=8, image_size=args.image_size, frozen_dtype="float32", embed_dim=32,
                       max_text_len=24)
    corpus = work / "corpus"
    items = make_corpus(corpus, n=args.images, seed=0, size=max(96, args.image_size + 32))
    write_shards(str(work / "capfilt"), corpus, items, rows_per_shard=64)
    tcfg = TrainConfig(input=str(work / "capfilt"), output=str(work / "runs"), name="bench", steps=args.steps,
                       warmup_steps=2, lr=1e-4, batch_size=args.batch, num_workers=1,
                       checkpoint_every=10**9, log_every=10, cpus_per_worker=args.threads)
    tcfg.validate()
    icfg = IngestConfig(map_batch_size=64)
    ray.init(address="local", num_cpus=max(2, args.threads + 1), include_dashboard=False, log_to_driver=False)
    # what run_training hands each worker: the same sections, the shard set, one rank's step split
    spec = IngestSpec(icfg, tuple(list_shards(tcfg.input)), seed=0, image_size=mcfg.image_size)
    split = step_split(tcfg.resolved_global_batch(), tcfg.batch_size, 1)

    # (b) ingest throughput to one worker; epoch 0 is also what the loop reads, so the bare loop
    # steps the same batches
    list(iter_epoch(spec, epoch=1, rank=0, split=split))  # warm-up: worker processes and imports
    t = time.perf_counter()
    delivered = list(iter_epoch(spec, epoch=0, rank=0, split=split))
    ingest = sum(len(b["key"]) for b in delivered) / (time.perf_counter() - t)
    if len(delivered) < args.steps:
        raise SystemExit(f"--images {args.images} gives {len(delivered)} steps per epoch: ask for <= that many --steps")
    batches = [(b["pixel_values"], b["text"]) for b in delivered[:args.steps]]

    # (a) the real loop vs the bare loop, bare before and after to bracket load drift
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    bare = timed_steps(Blip2Stage1.from_config(mcfg), batches, tcfg)
    t0 = time.perf_counter()
    result = run_training(mcfg, tcfg, icfg, seed=0)
    wall = time.perf_counter() - t0
    assert result.error is None, result.error
    rows = read_metrics(str(work / "runs" / "bench"))[3:-1]  # warm-up and the checkpointing last step off
    task = ray.get(ray.remote(num_cpus=args.threads)(bare_in_ray_worker).remote(mcfg, batches, tcfg, args.threads))
    torch.manual_seed(0)
    bare += timed_steps(Blip2Stage1.from_config(mcfg), batches, tcfg)
    ray.shutdown()
    task_ms = statistics.median(task) * 1e3
    bare_ms = statistics.median(bare) * 1e3
    loop_ms = statistics.median(r["step_time_s"] for r in rows) * 1e3
    compute_ms = statistics.median(r["step_time_s"] - r["data_wait_s"] for r in rows) * 1e3
    consume = args.batch / statistics.median(bare)

    # (c) shuffle quality
    here = shuffle_quality(spec.shards, batch=args.batch, window=icfg.shuffle_window, batches=len(delivered))
    paper = shuffle_quality([ShardRows(f"s{i}", 10_000) for i in range(12_900)], batch=1680,
                            window=icfg.shuffle_window, batches=20)

    print(f"(a) loop overhead        bare torch {bare_ms:.1f} ms/step   train_loop_per_worker {loop_ms:.1f} ms/step "
          f"(without data wait {compute_ms:.1f})   ratio {loop_ms / bare_ms:.3f} (target <= 1.05)   "
          f"[run_training wall incl. startup {wall:.1f} s for {args.steps} steps]")
    print(f"    control: bare loop in a plain Ray worker process {task_ms:.1f} ms/step -> loop / control "
          f"{loop_ms / task_ms:.3f} (what the loop adds over a Ray worker process)")
    print(f"(b) ingest headroom      Ray Data ingest {ingest:.0f} samples/s to one worker   train step consumes "
          f"{consume:.0f} samples/s   ratio {ingest / consume:.2f} (target >= 3)")
    print(f"(c) same-shard pairs in a global batch, ours vs uniform shuffle: here ({len(spec.shards)} shards of 64, "
          f"batch {args.batch}) {here[0]:.4f} vs {here[1]:.4f};  paper-sized (12.9k shards of 10k rows, batch 1680) "
          f"{paper[0]:.5f} vs {paper[1]:.5f}  [shuffle_window {icfg.shuffle_window} row groups of 256]")
    print(f"    model: tiny BLIP-2 stage 1 (CLIP-style vision, 8 queries), batch {args.batch}, "
          f"{args.image_size}px, {args.threads} torch thread(s), CPU, {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
