"""Synthetic CLIP-like embeddings with planted near-duplicates, and a brute-force SemDeDup to check against."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from capfilt.embeddings import write_embeddings
from capfilt.semdedup import Candidates, normalized
from pipelines.schema import CAPFILT
from pipelines.shardio import ShardSet
from tests.helpers.shards import capfilt_row


def planted(n: int, dim: int, pairs: int, seed: int = 0, topics: int = 8, spread: float = 1.2,
            noise: float = 0.08) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings [n + pairs, dim] float32 unit rows, pairs [pairs, 2] (original, copy)).

    Rows are topic centres plus isotropic noise (within-topic cosine ~0.4, far from any dedup
    threshold); each copy is an original plus a little noise (cosine ~0.997 to it)."""
    rng = np.random.default_rng(seed)
    centres = normalized(rng.normal(size=(topics, dim)))
    x = centres[rng.integers(0, topics, n)] + spread * rng.normal(size=(n, dim)) / np.sqrt(dim)
    originals = rng.choice(n, size=pairs, replace=False)
    copies = x[originals] + noise * rng.normal(size=(pairs, dim)) / np.sqrt(dim)
    return normalized(np.concatenate([x, copies])), np.stack([originals, n + np.arange(pairs)], 1)


def brute_force(emb: np.ndarray, score: np.ndarray, key: np.ndarray, threshold: float) -> set[int]:
    """SemDeDup's rule over all pairs: row j goes when a better row (score, then key) is above threshold."""
    order = np.lexsort((key, -score))
    e = normalized(emb)[order]
    sims = e @ e.T
    removed = set()
    for pos in range(1, len(order)):
        if sims[pos, :pos].max() > threshold:
            removed.add(int(order[pos]))
    return removed


@dataclass
class ArrayLoader:
    """semdedup's loader over in-memory shards: shard -> (emb, score, key); every row a candidate."""
    shards: dict

    def __call__(self, shard: int) -> Candidates:
        emb, score, key = self.shards[shard]
        return Candidates(rows=np.arange(len(emb), dtype=np.int32), emb=emb, score=score, key=key)

    @classmethod
    def split(cls, emb, score, key, per_shard: int) -> "ArrayLoader":
        return cls({i: (emb[s:s + per_shard].astype(np.float16), score[s:s + per_shard], key[s:s + per_shard])
                    for i, s in enumerate(range(0, len(emb), per_shard))})


def write_embedding_set(uri: str, emb: np.ndarray, per_shard: int) -> list[str]:
    """A CAPFILT set whose image embeddings are ``emb`` (1-byte images), ``per_shard`` rows a shard; returns the keys."""
    ss, keys = ShardSet(uri), []
    for i, s in enumerate(range(0, len(emb), per_shard)):
        rows = [capfilt_row(f"emb/{s + r:06d}", bytes([r % 256]), ["a caption"], [0.3])
                for r in range(min(per_shard, len(emb) - s))]
        table = pa.Table.from_pylist(rows, schema=CAPFILT.arrow_schema())
        ss.write_shard(i, table, CAPFILT)
        write_embeddings(ss, i, table, emb[s:s + per_shard], emb[s:s + per_shard])
        keys += [r["key"] for r in rows]
    ss.write_manifest(CAPFILT)
    return keys
