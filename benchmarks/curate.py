"""Curation benchmarks, side by side in one run (CPU, local Ray):

1. SemDeDup (capfilt.semdedup, the code `blip2 curate` runs) on N synthetic 768-d CLIP-like
   embeddings with planted near-duplicate pairs, for each N in --sizes: recall and precision of
   the planted pairs, wall time, peak memory (the largest Ray worker, and all Ray processes +
   this driver together), and how the time grows with N.
2. Search (capfilt.search): building the faiss index over the largest set with the code
   `blip2 shards search` runs, then p50/p99 latency of single queries, for each --factories
   (benchmarks/search.py measures search at millions of vectors).
3. Exact dedup (capfilt.curate.exact_duplicates, hash-partitioned) for each N in --exact-sizes, on
   synthetic score tables (_curate/scores, no images: the pass reads nothing else), 10k rows per
   shard, a --dup-share of each shard re-using the sha256 of a row 7 shards back: wall time,
   duplicates found vs planted, and the peak RSS of the largest Ray worker and of all processes,
   side by side (memory per task should stay flat as N grows: --exact-rows-per-task bounds it).

The embeddings are written as a real CAPFILT shard set (1-byte images) with clip-retrieval
embedding files, 10k rows per shard; topics (within-topic cosine ~0.4) make the k-means
meaningful; each planted copy is an original plus noise (cosine 0.96-0.995), placed in
another shard.

    .venv/bin/python benchmarks/curate.py --sizes 100000 300000 1000000 --cpus 2
    .venv/bin/python benchmarks/curate.py --sizes --exact-sizes 1000000 10000000 --cpus 2
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from capfilt.curate import Plan, exact_duplicates  # noqa: E402
from capfilt.curate_config import CurateConfig, SearchConfig, SemDedupFilter  # noqa: E402
from capfilt.embeddings import read_embeddings, write_embeddings  # noqa: E402
from capfilt.search import search, update_index  # noqa: E402
from capfilt.semdedup import Candidates, normalized, semdedup  # noqa: E402
from pipelines.curation import SCORES_DIR  # noqa: E402
from pipelines.schema import CAPFILT, CURATE_SCORES  # noqa: E402
from pipelines.shardio import ShardSet, shard_name  # noqa: E402

DIM, PER_SHARD, TOPICS, SHIFT = 768, 10_000, 2000, 7


def _base(shard: int, seed: int, centres: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng([seed, shard])
    topic = rng.integers(0, len(centres), PER_SHARD)
    return normalized(centres[topic] + 1.2 * rng.normal(size=(PER_SHARD, DIM)).astype(np.float32) / np.sqrt(DIM))


def make_set(uri: str, rows: int, dup_share: float, seed: int = 0) -> set[tuple[str, str]]:
    """Write the shard set; returns the planted pairs as (original key, copy key)."""
    shards = rows // PER_SHARD
    n_copies = int(PER_SHARD * dup_share)
    n_base = PER_SHARD - n_copies
    centres = normalized(np.random.default_rng(seed).normal(size=(TOPICS, DIM)).astype(np.float32))
    ss, planted = ShardSet(uri), set()
    for s in range(shards):
        src = (s - SHIFT) % shards                         # this shard holds copies of shard src's rows
        rng = np.random.default_rng([seed, src, 1])
        picks = rng.choice(n_base, n_copies, replace=False)
        noise = rng.uniform(0.1, 0.29, (n_copies, 1)).astype(np.float32)   # cosine 0.96-0.995
        copies = _base(src, seed, centres)[picks] + noise * rng.normal(size=(n_copies, DIM)).astype(np.float32) / np.sqrt(DIM)
        emb = np.concatenate([_base(s, seed, centres)[:n_base], normalized(copies)])
        keys = [f"{s:05d}-{r:05d}" for r in range(PER_SHARD)]
        planted |= {(f"{src:05d}-{p:05d}", keys[n_base + j]) for j, p in enumerate(picks.tolist())}
        score = np.random.default_rng([seed, s, 2]).uniform(0.15, 0.45, PER_SHARD).astype(np.float32)
        cols = {"key": keys, "source": ["bench"] * PER_SHARD, "policy": ["web"] * PER_SHARD,
                "image": [b"\0"] * PER_SHARD, "captions": [["a caption"]] * PER_SHARD,
                "scores": [[float(x)] for x in score], "original_caption": ["a caption"] * PER_SHARD}
        table = pa.table({f.name: cols.get(f.name, pa.nulls(PER_SHARD, f.type)) for f in CAPFILT.schema},
                         schema=CAPFILT.schema)
        ss.write_shard(s, table, CAPFILT)
        write_embeddings(ss, s, table, emb, emb)
    ss.write_manifest(CAPFILT)
    return planted


@dataclass
class SetLoader:
    """Every row of a CAPFILT set is a candidate; its first kept score decides who stays."""
    uri: str

    def __call__(self, shard: int) -> Candidates:
        ss = ShardSet(self.uri)
        t = ss.open_parquet(shard_name(shard)).read(columns=["key", "scores"])
        score = np.array([s[0] for s in t.column("scores").to_pylist()], np.float32)
        return Candidates(np.arange(t.num_rows, dtype=np.int32), read_embeddings(ss, shard), score,
                          np.asarray(t.column("key").to_pylist(), dtype=str))


class PeakMemory:
    """Samples RSS of this process and its descendants (the Ray it started: ``ray::`` workers,
    raylet, GCS; not other sessions' Ray) every 0.2 s."""

    def __init__(self):
        import psutil

        self.psutil, self.stop, self.total, self.worker = psutil, threading.Event(), 0, 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        me = self.psutil.Process()
        while not self.stop.is_set():
            total, worker = 0, 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    rss, cmd = p.memory_info().rss, " ".join(p.cmdline())
                except self.psutil.Error:   # ended meanwhile
                    continue
                total += rss
                if "ray::" in cmd:
                    worker = max(worker, rss)
            self.total, self.worker = max(self.total, total), max(self.worker, worker)
            self.stop.wait(0.2)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def start_ray(cpus: int):
    """A local Ray of ``cpus`` CPUs for a benchmark, after printing the machine's load."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    print(f"machine: {os.cpu_count()} cores; load before: {os.getloadavg()[0]:.2f} (1-min average)", flush=True)
    return ray


def bench_semdedup(uri: str, planted: set, rows: int, cfg: SemDedupFilter) -> dict:
    ss = ShardSet(uri)
    counts = {i: PER_SHARD for i in range(rows // PER_SHARD)}
    with PeakMemory() as mem:
        started = time.time()
        removed, info = semdedup(SetLoader(uri), counts, f"{uri}/_work", cfg, seed=0, log=lambda m: None)
        seconds = time.time() - started
    keys = {}
    found = set()
    for shard, rem in removed.items():
        if shard not in keys:
            keys[shard] = [f"{shard:05d}-{r:05d}" for r in range(PER_SHARD)]
        for row, dup_key in zip(rem.rows.tolist(), rem.dup_key.tolist()):
            found.add(frozenset((keys[shard][row], dup_key)))
    truth = {frozenset(p) for p in planted}
    hit = len(found & truth)
    del ss
    return {"rows": rows, "seconds": seconds, "recall": hit / len(truth), "precision": hit / max(len(found), 1),
            "removed": len(found), "planted": len(truth), "peak_worker_mb": mem.worker / 2**20,
            "peak_total_mb": mem.total / 2**20, **{k: info[k] for k in ("clusters", "groups", "largest_task_rows")},
            "phases": info["seconds"]}


def bench_search(uri: str, factory: str, queries: int, seed: int = 0) -> dict:
    import faiss

    cfg = SearchConfig(factory=factory, index=f"{uri}/_index_{factory.replace(',', '_')}", nprobe=16,
                       train_rows=100_000)
    started = time.time()
    index, state, stats = update_index(uri, cfg, log=lambda m: None)
    build = time.time() - started
    rng = np.random.default_rng(seed)
    shards = rng.integers(0, len(state["shards"]), queries)
    qs = []
    for s in shards:   # queries near stored rows, as a text/image query near its match would be
        e = read_embeddings(ShardSet(uri), int(s))[rng.integers(0, PER_SHARD)].astype(np.float32)
        qs.append(normalized((e + 0.5 * rng.normal(size=DIM).astype(np.float32) / np.sqrt(DIM))[None])[0])
    ivf = faiss.try_extract_index_ivf(index) is not None
    lat, agree = [], 0
    for q in qs:
        t = time.perf_counter()
        found = search(index, state, q, k=10, nprobe=cfg.nprobe)
        lat.append(time.perf_counter() - t)
        agree += (found[0][0] == search(index, state, q, k=1, nprobe=4096)[0][0]) if ivf else 1
    return {"factory": factory, "rows": stats["rows"], "build_s": build, "p50_ms": 1000 * np.percentile(lat, 50),
            "p99_ms": 1000 * np.percentile(lat, 99), "top1_same_as_all_lists": agree / queries,
            "index_mb": sum(f.stat().st_size for f in Path(cfg.index).glob("*")) / 2**20 if "://" not in uri else None}


def write_scores(uri: str, shard: int, shards: int, dup_share: float) -> None:
    """Score table ``shard``: sha256 of (shard, row), the first dup_share of rows copying shard - 7's."""
    import hashlib

    n_dup = int(PER_SHARD * dup_share)
    src = (shard - SHIFT) % shards
    sha = [hashlib.sha256(f"{src if r < n_dup else shard}/{r + (PER_SHARD // 2 if r < n_dup else 0)}".encode())
           .hexdigest() for r in range(PER_SHARD)]      # copies point at the other shard's 2nd half: unique originals
    score = np.random.default_rng([shard, 3]).uniform(0.15, 0.45, PER_SHARD).astype(np.float32)
    cols = {"row": pa.array(np.arange(PER_SHARD, dtype=np.int32)), "key": [f"{shard:05d}-{r:05d}" for r in range(PER_SHARD)],
            "source": ["bench"] * PER_SHARD, "sha256": sha, "policy": ["web"] * PER_SHARD, "clip_score": score}
    table = pa.table({f.name: cols.get(f.name, pa.nulls(PER_SHARD, f.type)) for f in CURATE_SCORES.schema},
                     schema=CURATE_SCORES.schema)
    ShardSet(f"{uri}/{SCORES_DIR}").write_shard(shard, table, CURATE_SCORES)


def bench_exact(work: Path, rows: int, dup_share: float, per_task: int) -> dict:
    import ray

    uri, shards = str(work / f"exact_{rows}"), rows // PER_SHARD
    have = ShardSet(f"{uri}/{SCORES_DIR}").committed_indices()
    ray.get([ray.remote(write_scores).remote(uri, s, shards, dup_share) for s in range(shards) if s not in have])
    cfg = CurateConfig(exact_rows_per_task=per_task)
    plan = Plan(cfg, None, f"{uri}/{SCORES_DIR}")
    with PeakMemory() as mem:
        started = time.time()
        marks, found = exact_duplicates(plan, {i: PER_SHARD for i in range(shards)}, uri)
        seconds = time.time() - started
    return {"rows": rows, "seconds": seconds, "found": found, "planted": shards * int(PER_SHARD * dup_share),
            "parts": marks.parts, "peak_worker_mb": mem.worker / 2**20, "peak_total_mb": mem.total / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="*", default=[100_000, 300_000, 1_000_000])
    ap.add_argument("--exact-sizes", type=int, nargs="*", default=[], help="rows for the exact-dedup benchmark")
    ap.add_argument("--exact-rows-per-task", type=int, default=CurateConfig.exact_rows_per_task)
    ap.add_argument("--dup-share", type=float, default=0.05, help="share of each shard that is a planted copy")
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray")
    ap.add_argument("--probes", type=int, nargs="+", default=[2], help="semdedup.probes values to compare")
    ap.add_argument("--factories", nargs="+", default=["Flat", "IVF1024,SQ8"])
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--workdir", default=None, help="where the synthetic sets go (default: a temp dir)")
    args = ap.parse_args()

    ray = start_ray(args.cpus)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-curate-"))
    results, largest = [], None
    for rows in sorted(args.sizes):
        uri = str(work / f"set_{rows}")
        t = time.time()
        planted = make_set(uri, rows, args.dup_share)
        print(f"  wrote {rows} rows ({len(planted)} planted pairs) in {time.time() - t:.0f} s", flush=True)
        for probes in args.probes:
            r = bench_semdedup(uri, planted, rows, SemDedupFilter(probes=probes))
            r["probes"] = probes
            results.append(r)
            print(f"  semdedup {rows} rows probes={probes}: {r['seconds']:.1f} s, recall {r['recall']:.4f}, "
                  f"precision {r['precision']:.4f}, phases {r['phases']}", flush=True)
        largest = (uri, rows)
    if results:
        print("\nSemDeDup (threshold 0.95, defaults: sample 100k, auto clusters, rows_per_task 250k)")
        print(f"{'rows':>9} {'probes':>6} {'clusters':>8} {'tasks':>5} {'seconds':>8} {'x time':>7} {'x rows':>7} "
              f"{'recall':>7} {'precision':>9} {'worker MB':>9} {'total MB':>8}")
    base = {p: next((r for r in results if r["probes"] == p), None) for p in args.probes}
    for r in results:
        b = base[r["probes"]]
        print(f"{r['rows']:>9} {r['probes']:>6} {r['clusters']:>8} {r['groups']:>5} {r['seconds']:>8.1f} "
              f"{r['seconds'] / b['seconds']:>7.2f} {r['rows'] / b['rows']:>7.1f} {r['recall']:>7.4f} "
              f"{r['precision']:>9.4f} {r['peak_worker_mb']:>9.0f} {r['peak_total_mb']:>8.0f}")
    exact = []
    for rows in sorted(args.exact_sizes):
        exact.append(bench_exact(work, rows, args.dup_share, args.exact_rows_per_task))
        print(f"  exact dedup {rows} rows: {exact[-1]}", flush=True)
    if exact:
        print(f"\nExact dedup (sha256, exact_rows_per_task {args.exact_rows_per_task}; score tables only)")
        print(f"{'rows':>10} {'parts':>5} {'seconds':>8} {'found':>9} {'planted':>9} {'worker MB':>9} "
              f"{'x worker':>8} {'total MB':>8}")
        for r in exact:
            print(f"{r['rows']:>10} {r['parts']:>5} {r['seconds']:>8.1f} {r['found']:>9} {r['planted']:>9} "
                  f"{r['peak_worker_mb']:>9.0f} {r['peak_worker_mb'] / exact[0]['peak_worker_mb']:>8.2f} "
                  f"{r['peak_total_mb']:>8.0f}")
    if largest is None:
        ray.shutdown()
        return
    uri, rows = largest
    print(f"\nsearch over {rows} vectors ({args.queries} single queries, k=10; IVF: nprobe 16)")
    print(f"{'factory':>14} {'build s':>8} {'p50 ms':>7} {'p99 ms':>7} {'index MB':>8} {'top-1 = all lists':>17}")
    for factory in args.factories:
        s = bench_search(uri, factory, args.queries)
        print(f"{s['factory']:>14} {s['build_s']:>8.1f} {s['p50_ms']:>7.2f} {s['p99_ms']:>7.2f} "
              f"{s['index_mb'] or 0:>8.0f} {s['top1_same_as_all_lists']:>17.3f}", flush=True)
    print(f"load after: {os.getloadavg()[0]:.2f} (1-min average)")
    ray.shutdown()


if __name__ == "__main__":
    main()
