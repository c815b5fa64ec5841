"""Training ingest's epoch plan at the paper's corpus size, per rank (nothing is read).

What a rank spends before its first step, at every epoch start and after every restart: the
epoch order (the seeded permutation of every row group's appearances, ``EpochOrder``), the list of
its read tasks (one per shuffle window) and the content of its first read task (which row groups
it reads and which rows it picks). Each case runs in a fresh process, so its peak RSS is its own.
Sizes: N and 10 N samples in 10k-row shards (``--samples``, default 12.9M and 129M: the paper's
12.9k shards), global batch 1680 over 16 ranks, shards listed with their sources (as
``run_training`` does) and, in a second line per size, 1 % human rows with 5 captions each.

    .venv/bin/python benchmarks/ingest_plan.py [--samples 12900000 129000000] [--ranks 16] [--batch 1680]

Target (issue 31): the first read task of rank 0 at 129M samples within 5 s and 300 MB. Before the
lazy plan (main at 99dbd0b) the rank built every read task of its epoch first: ~55 s, 0.71 GB.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROWS_PER_SHARD = 10_000


def shard_list(samples: int, human_share: float):
    from training.ingest import ShardRows

    n = samples // ROWS_PER_SHARD
    human = int(round(n * human_share))
    shards = [ShardRows(f"s3://bench/capfilt/part-{i:05d}.parquet", ROWS_PER_SHARD, ((0, ROWS_PER_SHARD, "laion"),))
              for i in range(n - human)]
    shards += [ShardRows(f"s3://bench/capfilt/part-{i:05d}.parquet", ROWS_PER_SHARD, ((0, ROWS_PER_SHARD, "coco"),),
                         ((0, ROWS_PER_SHARD, 5),)) for i in range(n - human, n)]
    return tuple(shards)


def one_case(samples: int, human_share: float, ranks: int, batch: int) -> dict:
    """In this process: rank 0 plans epoch 0 (its order and its window list, what runs before
    Ray Data starts), then a read worker builds its own copy of the order and its first task."""
    from training.ingest import IngestConfig, IngestSpec, RankPlan, step_samples, step_split

    shards = shard_list(samples, human_share)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    spec = IngestSpec(IngestConfig(), shards, seed=0, image_size=224)
    split = step_split(batch, -(-batch // ranks), ranks)
    order = spec.order(0)
    plan = RankPlan(spec, 0, 0, tuple(map(tuple, split)), 0, spec.epoch_stop(order, step_samples(split)))
    windows = plan.windows(order)
    t1 = time.perf_counter()
    task = next(t for t in (plan.task(plan.order(), w) for w in windows) if t is not None)
    t2 = time.perf_counter()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"samples": order.total, "windows": len(windows), "first_task_rows": len(task["offset"]),
            "rank_s": round(t1 - t0, 2), "worker_s": round(t2 - t1, 2), "seconds": round(t2 - t0, 2),
            "peak_rss_mb": round(rss / 1024, 1), "plan_mb": round((rss - rss0) / 1024, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, nargs="+", default=[12_900_000, 129_000_000])
    p.add_argument("--ranks", type=int, default=16)
    p.add_argument("--batch", type=int, default=1680)
    p.add_argument("--case", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.case:
        samples, human = json.loads(a.case)
        print(json.dumps(one_case(samples, human, a.ranks, a.batch)))
        return
    rows = []
    for samples in a.samples:
        for human in (0.0, 0.01):
            out = subprocess.run([sys.executable, __file__, "--case", json.dumps([samples, human]),
                                  "--ranks", str(a.ranks), "--batch", str(a.batch)],
                                 capture_output=True, text=True, check=True, env={**os.environ})
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append((samples, human, r))
            print(f"{samples:>11,} rows, {human:4.0%} human ×5: epoch order of {r['samples']:,} samples, "
                  f"{r['windows']:,} windows; rank 0's first read task ({r['first_task_rows']} rows) after "
                  f"{r['seconds']:.2f} s (rank {r['rank_s']:.2f} s + read worker {r['worker_s']:.2f} s), "
                  f"plan {r['plan_mb']:.0f} MB (peak RSS {r['peak_rss_mb']:.0f} MB)", flush=True)
    if len(a.samples) > 1:
        small, big = rows[0][2], rows[-2][2]
        print(f"ratio {a.samples[-1] // a.samples[0]}× samples: time {big['seconds'] / max(small['seconds'], 1e-3):.1f}×, "
              f"plan memory {big['plan_mb'] / max(small['plan_mb'], 1e-3):.1f}×")


if __name__ == "__main__":
    main()
