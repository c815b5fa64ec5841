"""SemDeDup (Abbas et al., 2023) on Ray: near-duplicate images by their CLIP embeddings, memory bounded per task.

    sample   one task per shard: a seeded share of its rows
    k-means  one task: spherical k-means (faiss) on the sample
    assign   one task per shard: each row joins its ``probes`` nearest clusters and goes, with its
             priority, into one bucket file per *group* of clusters (a shuffle through storage)
    dedup    one task per group, in parallel: within each cluster, rows in priority order (higher
             score first, then key, shard, row); a row whose cosine to an earlier row is above the
             threshold is removed as that row's duplicate
    merge    the driver: a row removed in any of its clusters is removed

That is SemDeDup's rule, chains included (if b duplicates a and c duplicates b, both go), over
the pairs that share a cluster; with one cluster or ``probes`` = clusters it is exact all-pairs
dedup (tested). A pair above the threshold that a cluster boundary splits still meets in one
cluster when either row's second-nearest centroid is the other's nearest, hence ``probes=2``.
Groups pack clusters by their size as estimated on the sample, so one dedup task holds about
``rows_per_task`` rows; a cluster's similarities are computed in row blocks of bounded size.
"""
from __future__ import annotations

import heapq
import io
import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from capfilt.curate_config import SemDedupFilter
from pipelines.shardio import ShardSet

BLOCK_ELEMS = 1 << 24   # similarity entries per block (64 MB of float32)
MIN_PER_CLUSTER = 32    # sample rows per centroid below which k-means is not trained


@dataclass
class Candidates:
    """One shard's rows that take part in dedup."""
    rows: np.ndarray    # int32 [m]: row index in the shard
    emb: np.ndarray     # [m, d] image embeddings (float16 as stored is fine)
    score: np.ndarray   # float32 [m]: the higher, the more a row deserves to stay
    key: np.ndarray     # str [m]: breaks ties


Loader = Callable[[int], Candidates]   # shard index -> its candidates; picklable (runs in Ray tasks)


@dataclass
class Removed:
    """One shard's near duplicates: each row with the row kept in its place and their cosine."""
    rows: np.ndarray
    dup_shard: np.ndarray
    dup_row: np.ndarray
    dup_key: np.ndarray
    similarity: np.ndarray


def normalized(emb: np.ndarray) -> np.ndarray:
    """float32, L2-normalised rows (an all-zero row stays zero)."""
    x = np.asarray(emb, np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def auto_clusters(rows: int, probes: int, sample: int) -> int:
    """Balances assignment (rows x clusters) against pairwise work ((rows x probes)^2 / clusters),
    with at least MIN_PER_CLUSTER sample rows per centroid."""
    balanced = round(math.sqrt(rows * probes * probes / 2))
    return max(1, min(balanced, min(rows, sample) // MIN_PER_CLUSTER))


def allocate(counts: dict[int, int], total: int) -> dict[int, int]:
    """Split ``total`` sample rows over shards in proportion to their rows (largest remainder, deterministic)."""
    n = sum(counts.values())
    if n <= total:
        return dict(counts)
    exact = {s: total * c / n for s, c in counts.items()}
    out = {s: int(v) for s, v in exact.items()}
    for s in sorted(exact, key=lambda s: (-(exact[s] - out[s]), s))[:total - sum(out.values())]:
        out[s] += 1
    return out


def top_clusters(x: np.ndarray, centroids: np.ndarray, probes: int, block: int = 8192) -> np.ndarray:
    """[m, probes] nearest centroids of each normalised row by cosine, nearest first."""
    out = np.empty((len(x), probes), np.int32)
    for start in range(0, len(x), block):
        sims = x[start:start + block] @ centroids.T
        if probes == 1:
            out[start:start + block, 0] = sims.argmax(1)
            continue
        part = np.argpartition(-sims, probes - 1, axis=1)[:, :probes]
        order = np.argsort(-np.take_along_axis(sims, part, 1), axis=1, kind="stable")
        out[start:start + block] = np.take_along_axis(part, order, 1)
    return out


def pack_groups(sizes: np.ndarray, rows_per_task: int) -> np.ndarray:
    """Cluster -> group: largest cluster first onto the lightest group (ties by index)."""
    groups = max(1, min(len(sizes), math.ceil(sizes.sum() / rows_per_task)))
    heap = [(0, g) for g in range(groups)]
    group_of = np.empty(len(sizes), np.int32)
    for c in np.lexsort((np.arange(len(sizes)), -sizes)):
        load, g = heapq.heappop(heap)
        group_of[c] = g
        heapq.heappush(heap, (load + int(sizes[c]), g))
    return group_of


def earlier_max(e: np.ndarray, block_elems: int = BLOCK_ELEMS) -> tuple[np.ndarray, np.ndarray]:
    """For each row i of normalised ``e``: the highest cosine to a row j < i, and that j (-inf, -1 for row 0)."""
    m = len(e)
    best = np.full(m, -np.inf, np.float32)
    arg = np.full(m, -1, np.int64)
    step = max(1, min(m, block_elems // max(m, 1)))
    for i0 in range(1, m, step):
        i1 = min(m, i0 + step)
        sims = e[i0:i1] @ e[:i1].T                                   # [b, i1]
        sims[:, i0:i1][np.triu(np.ones((i1 - i0, i1 - i0), bool))] = -np.inf  # only earlier rows
        j = sims.argmax(1)
        arg[i0:i1] = j
        best[i0:i1] = sims[np.arange(i1 - i0), j]
    return best, arg


# -- the tasks --------------------------------------------------------------------------------
def _sample(loader: Loader, shard: int, n: int, seed: int) -> np.ndarray:
    c = loader(shard)
    rng = np.random.default_rng([seed, shard])
    return np.asarray(c.emb[np.sort(rng.choice(len(c.rows), size=min(n, len(c.rows)), replace=False))], np.float16)


def _kmeans(k: int, iterations: int, seed: int, threads: int, probes: int, *samples: np.ndarray):
    """(centroids [k, d] float32, estimated members per cluster on the sample [k])."""
    import faiss

    x = normalized(np.concatenate(samples))
    if k == 1:
        centroids = normalized(x.mean(0, keepdims=True))
    else:
        faiss.omp_set_num_threads(threads)
        km = faiss.Kmeans(x.shape[1], k, niter=iterations, seed=seed, spherical=True, verbose=False,
                          min_points_per_centroid=1, max_points_per_centroid=len(x))
        km.train(x)
        centroids = normalized(km.centroids)
    top = top_clusters(x, centroids, probes)
    return centroids, np.bincount(top.ravel(), minlength=k)


def _assign(loader: Loader, shard: int, centroids: np.ndarray, group_of: np.ndarray, probes: int,
            work_uri: str) -> np.ndarray:
    """Write shard's bucket files (one per group it has rows in); returns its entries per group."""
    c = loader(shard)
    counts = np.zeros(group_of.max() + 1, np.int64)
    if not len(c.rows):
        return counts
    top = top_clusters(normalized(c.emb), centroids, probes)
    member = np.repeat(np.arange(len(c.rows)), probes)
    cluster = top.ravel()
    group = group_of[cluster]
    work = ShardSet(work_uri)
    keys = np.asarray(c.key, dtype=str)
    for g in np.unique(group).tolist():
        sel = group == g
        rows = member[sel]
        counts[g] = len(rows)
        buf = io.BytesIO()
        np.savez(buf, cluster=cluster[sel], shard=np.full(len(rows), shard, np.int32),
                 row=np.asarray(c.rows, np.int32)[rows], score=np.asarray(c.score, np.float32)[rows],
                 key=keys[rows], emb=np.asarray(c.emb[rows], np.float16))
        work.put(f"buckets/g{g:05d}/s{shard:05d}.npz", buf.getvalue())
    return counts


def _dedup_group(work_uri: str, group: int, threshold: float) -> dict[str, np.ndarray]:
    """Near duplicates among one group's clusters (see the module docstring)."""
    work = ShardSet(work_uri)
    folder = work.path(f"buckets/g{group:05d}")
    files = sorted(work.fs.ls(folder, detail=False)) if work.fs.exists(folder) else []
    parts = [np.load(io.BytesIO(work.fs.cat(f))) for f in files]
    fields = ("cluster", "shard", "row", "score", "key", "emb")
    if not parts:
        return {f: np.empty(0) for f in ("shard", "row", "dup_shard", "dup_row", "dup_key", "similarity")}
    d = {f: np.concatenate([p[f] for p in parts]) for f in fields}
    order = np.lexsort((d["row"], d["shard"], d["key"], -d["score"], d["cluster"]))
    d = {f: v[order] for f, v in d.items()}
    out = {f: [] for f in ("shard", "row", "dup_shard", "dup_row", "dup_key", "similarity")}
    bounds = [0, *(np.flatnonzero(np.diff(d["cluster"])) + 1).tolist(), len(order)]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        best, arg = earlier_max(normalized(d["emb"][lo:hi]))
        dup = np.flatnonzero(best > threshold)
        if not dup.size:
            continue
        kept = lo + arg[dup]
        dup = lo + dup
        out["shard"].append(d["shard"][dup])
        out["row"].append(d["row"][dup])
        out["dup_shard"].append(d["shard"][kept])
        out["dup_row"].append(d["row"][kept])
        out["dup_key"].append(d["key"][kept])
        out["similarity"].append(best[dup - lo])
    return {f: (np.concatenate(v) if v else np.empty(0)) for f, v in out.items()}


def merge(results: list[dict[str, np.ndarray]]) -> dict[int, Removed]:
    """A row removed in several clusters keeps its most similar kept row (ties: smaller key, shard, row)."""
    results = [r for r in results if len(r["row"])]
    if not results:
        return {}
    d = {f: np.concatenate([r[f] for r in results]) for f in results[0]}
    order = np.lexsort((d["dup_row"], d["dup_shard"], d["dup_key"], -d["similarity"], d["row"], d["shard"]))
    d = {f: v[order] for f, v in d.items()}
    first = np.ones(len(order), bool)
    first[1:] = (np.diff(d["shard"]) != 0) | (np.diff(d["row"]) != 0)
    d = {f: v[first] for f, v in d.items()}
    out = {}
    for shard in np.unique(d["shard"]).tolist():
        sel = d["shard"] == shard
        out[int(shard)] = Removed(d["row"][sel].astype(np.int64), d["dup_shard"][sel].astype(np.int64),
                                  d["dup_row"][sel].astype(np.int64), d["dup_key"][sel].astype(str),
                                  d["similarity"][sel].astype(np.float32))
    return out


# -- the driver -------------------------------------------------------------------------------
def semdedup(loader: Loader, counts: dict[int, int], work_uri: str, cfg: SemDedupFilter, seed: int,
             log=print) -> tuple[dict[int, Removed], dict]:
    """Near duplicates among the candidates of every shard in ``counts`` (shard -> candidate rows).

    Needs Ray initialised. ``work_uri`` holds the bucket files while it runs (removed at the end).
    Returns (shard -> Removed, info: clusters, groups, seconds per phase).
    """
    import ray

    total = sum(counts.values())
    info = {"rows": total, "clusters": 0, "groups": 0, "sample": 0, "seconds": {}}
    if total < 2:
        return {}, info
    task = ray.remote(num_cpus=cfg.num_cpus)
    threads = max(1, int(cfg.num_cpus))
    loader_ref = ray.put(loader)
    shards = sorted(s for s, c in counts.items() if c)
    t = time.time()

    quota = allocate({s: counts[s] for s in shards}, cfg.sample)
    n_sample = sum(quota.values())
    k = min(cfg.clusters or auto_clusters(total, cfg.probes, n_sample), n_sample)
    probes = min(cfg.probes, k)
    samples = [task(_sample).remote(loader_ref, s, quota[s], seed) for s in shards if quota[s]]
    centroids, sizes = ray.get(task(_kmeans).remote(k, cfg.iterations, seed, threads, probes,
                                                                              *samples))
    info["seconds"]["kmeans"] = round(time.time() - t, 2)
    group_of = pack_groups(sizes * (total / n_sample), cfg.rows_per_task)
    info.update(clusters=k, probes=probes, groups=int(group_of.max()) + 1, sample=n_sample)
    log(f"semdedup: {total} rows, k-means on {n_sample} -> {k} clusters, {info['groups']} dedup tasks")

    work = ShardSet(work_uri)
    if work.fs.exists(work.path("buckets")):  # a crashed run's buckets: never mixed into this one
        work.fs.rm(work.path("buckets"), recursive=True)
    t = time.time()
    centroids_ref, group_ref = ray.put(centroids), ray.put(group_of)
    per_group = np.sum(ray.get([task(_assign).remote(loader_ref, s, centroids_ref, group_ref, probes, work_uri)
                                for s in shards]), axis=0)
    info["seconds"]["assign"] = round(time.time() - t, 2)
    info["largest_task_rows"] = int(per_group.max())
    t = time.time()
    results = ray.get([task(_dedup_group).remote(work_uri, g, cfg.threshold)
                       for g in range(info["groups"]) if per_group[g]])
    info["seconds"]["dedup"] = round(time.time() - t, 2)
    work.fs.rm(work.path("buckets"), recursive=True)
    removed = merge(results)
    info["removed"] = sum(len(r.rows) for r in removed.values())
    return removed, info
