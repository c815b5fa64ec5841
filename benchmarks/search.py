"""Search at scale (CPU, local Ray): `blip2 shards search`'s index build (capfilt.search.update_index,
search.factory=auto) over N synthetic 768-d CLIP-like image embeddings, then recall@10 against exact
search, build time, index bytes, peak memory and p50/p99 single-query latency, for each --nprobe.

The set is a real CAPFILT shard set (1-byte images, 10k rows per shard) with clip-retrieval
``img_emb`` files (float16, as CapFilt writes them; no text_emb: search never reads it), written
by parallel Ray tasks. Embeddings: 4096 topics x 16 sub-topics, cosine ~0.88 within a sub-topic,
~0.59 within a topic, ~0 across (so a query's neighbours are a few dozen rows of near-equal score:
a hard case for quantised codes). Queries are fresh draws from the same distribution (not rows of
the set). Exact top-10 is brute force over every shard in parallel tasks (float32 of the stored
float16, as the index sees them).

    .venv/bin/python benchmarks/search.py --rows 5000000 --cpus 2 --memory-gb 16
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.curate import PeakMemory, start_ray  # noqa: E402
from capfilt.curate_config import SearchConfig  # noqa: E402
from capfilt.embeddings import EMBEDDINGS_DIR, embedding_paths, read_embeddings  # noqa: E402
from capfilt.search import choose_index, search, update_index  # noqa: E402
from capfilt.semdedup import normalized  # noqa: E402
from pipelines.schema import CAPFILT  # noqa: E402
from pipelines.shardio import ShardSet  # noqa: E402

DIM, PER_SHARD, TOPICS, SUBS = 768, 10_000, 4096, 16


def centres(seed: int = 0) -> np.ndarray:
    """[TOPICS * SUBS, DIM] sub-topic centres: topic + 0.7 x noise (float32)."""
    rng = np.random.default_rng([seed, 0])
    topics = rng.normal(size=(TOPICS, DIM)).astype(np.float32) / np.sqrt(DIM)
    subs = np.repeat(topics, SUBS, 0) + 0.7 * rng.normal(size=(TOPICS * SUBS, DIM)).astype(np.float32) / np.sqrt(DIM)
    return subs


def draw(n: int, seed: list[int], subs: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = subs[rng.integers(0, len(subs), n)] + 0.45 * rng.normal(size=(n, DIM)).astype(np.float32) / np.sqrt(DIM)
    return normalized(x)


def write_shard(uri: str, shard: int, subs) -> None:
    import io

    ss = ShardSet(uri)
    emb = draw(PER_SHARD, [1, shard], subs)
    cols = {"key": [f"{shard:05d}-{r:05d}" for r in range(PER_SHARD)], "source": ["bench"] * PER_SHARD,
            "image": [b"\0"] * PER_SHARD, "captions": [["a caption"]] * PER_SHARD, "scores": [[0.3]] * PER_SHARD,
            "original_caption": ["a caption"] * PER_SHARD, "policy": ["web"] * PER_SHARD}
    table = pa.table({f.name: cols.get(f.name, pa.nulls(PER_SHARD, f.type)) for f in CAPFILT.schema},
                     schema=CAPFILT.schema)
    ss.makedirs(f"{EMBEDDINGS_DIR}/img_emb")
    buf = io.BytesIO()
    np.save(buf, emb.astype(np.float16))
    ss.fs.pipe(ss.path(embedding_paths(shard)["img_emb"]), buf.getvalue())
    ss.write_shard(shard, table, CAPFILT)


def exact_topk(uri: str, shards: list[int], queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-k (scores, ids) of the queries over ``shards`` (id = shard x PER_SHARD + row)."""
    best_s = np.full((len(queries), k), -np.inf, np.float32)
    best_i = np.full((len(queries), k), -1, np.int64)
    for s in shards:
        e = normalized(read_embeddings(ShardSet(uri), s))
        sims = queries @ e.T
        part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        cand_s = np.concatenate([best_s, np.take_along_axis(sims, part, 1)], 1)
        cand_i = np.concatenate([best_i, s * PER_SHARD + part], 1)
        top = np.argsort(-cand_s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(cand_s, top, 1), np.take_along_axis(cand_i, top, 1)
    return best_s, best_i


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=5_000_000)
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray")
    ap.add_argument("--memory-gb", type=float, default=16.0, help="search.memory_gb")
    ap.add_argument("--nprobe", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--workdir", default=None, help="where the synthetic set goes (default: a temp dir; removed)")
    ap.add_argument("--keep", action="store_true", help="keep the set (a rerun with --workdir reuses it)")
    ap.add_argument("--reuse-index", action="store_true", help="query the kept index instead of building it")
    args = ap.parse_args()

    ray = start_ray(args.cpus)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-search-"))
    uri, shards = str(work / f"set_{args.rows}"), args.rows // PER_SHARD
    subs_ref = ray.put(centres())
    t = time.time()
    have = ShardSet(uri).committed_indices()
    ray.get([ray.remote(write_shard).remote(uri, s, subs_ref) for s in range(shards) if s not in have])
    print(f"  wrote {shards} shards ({shards * PER_SHARD} rows) in {time.time() - t:.0f} s", flush=True)

    cfg = SearchConfig(memory_gb=args.memory_gb, index=str(work / "index"))
    print(f"  auto picks: {choose_index(shards * PER_SHARD, DIM, cfg)}", flush=True)
    build, mem = None, None
    if not (args.reuse_index and os.path.exists(Path(cfg.index) / "index.json")):
        if os.path.exists(cfg.index):
            shutil.rmtree(cfg.index)
        with PeakMemory() as mem:
            t = time.time()
            _, _, stats = update_index(uri, cfg, log=lambda m: print(f"  {m}", flush=True))
            build = time.time() - t
        print(f"  built {stats['factory']} in {build:.1f} s ({stats['parts']} fill tasks), peak RSS: largest Ray "
              f"worker {mem.worker / 2**30:.2f} GB, all Ray + driver {mem.total / 2**30:.2f} GB", flush=True)
    index_bytes = sum(f.stat().st_size for f in Path(cfg.index).glob("index.faiss"))

    queries = draw(args.queries, [2, 0], ray.get(subs_ref))
    t = time.time()
    groups = np.array_split(np.arange(shards), args.cpus * 4)
    q_ref = ray.put(queries)
    parts = ray.get([ray.remote(exact_topk).remote(uri, g.tolist(), q_ref, 10) for g in groups if len(g)])
    cand_s = np.concatenate([p[0] for p in parts], 1)
    cand_i = np.concatenate([p[1] for p in parts], 1)
    exact = np.take_along_axis(cand_i, np.argsort(-cand_s, axis=1, kind="stable")[:, :10], 1)
    print(f"  exact top-10 by brute force in {time.time() - t:.0f} s", flush=True)

    import faiss

    index = faiss.read_index(str(Path(cfg.index) / "index.faiss"))
    state = json.loads((Path(cfg.index) / "index.json").read_text())
    rows = []
    for nprobe in args.nprobe:
        for rerank in sorted({1, cfg.rerank}):
            lat, recall = [], []
            for q, truth in zip(queries, exact):
                t = time.perf_counter()
                found = search(index, state, q, k=10, nprobe=nprobe, set_uri=uri, rerank=rerank)
                lat.append(time.perf_counter() - t)
                recall.append(len({i for i, _ in found} & set(truth.tolist())) / 10)
            rows.append((nprobe, rerank, np.mean(recall), 1000 * np.percentile(lat, 50), 1000 * np.percentile(lat, 99)))
    print(f"\nsearch over {index.ntotal} vectors (dim {DIM}, float16 stored), search.factory=auto, memory_gb "
          f"{args.memory_gb}: {state['built']}, trained once, filled by parallel Ray tasks, merged")
    if build is not None:
        print(f"  build {build:.1f} s, peak RSS largest worker {mem.worker / 2**30:.2f} GB, all processes "
              f"{mem.total / 2**30:.2f} GB")
    else:
        print("  build: not measured in this run (--reuse-index)")
    print(f"  index {index_bytes / 2**30:.2f} GB on disk")
    print(f"{'nprobe':>7} {'rerank':>6} {'recall@10':>10} {'p50 ms':>8} {'p99 ms':>8}   ({args.queries} single queries, "
          f"{faiss.omp_get_max_threads()} threads; rerank: x k candidates re-scored from the stored float16 rows)")
    for nprobe, rerank, rec, p50, p99 in rows:
        print(f"{nprobe:>7} {rerank:>6} {rec:>10.4f} {p50:>8.2f} {p99:>8.2f}")
    print(f"load after: {os.getloadavg()[0]:.2f} (1-min average)")
    ray.shutdown()
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
