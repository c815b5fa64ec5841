"""A CapFilt shard set (real images, embeddings in clip-retrieval's layout) with known curation outcomes."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from capfilt.embeddings import write_embeddings
from capfilt.semdedup import normalized
from pipelines.schema import CAPFILT
from pipelines.shardio import ShardSet

BASE = 40
EXACT = {5: 0.222, 17: 0.60, 30: 0.24}          # original item -> its re-posted copy's score
NEAR = {8: 0.23, 21: 0.61, 33: 0.23, 38: 0.25}  # original item -> a near-duplicate's score


@dataclass
class CurationInput:
    uri: str
    keys: list[str]                             # in shard order
    shards: list[list[str]]
    removed: dict[str, set[str]] = field(default_factory=dict)   # reason -> keys, for the default filters
    duplicate_of: dict[str, str] = field(default_factory=dict)
    embeddings: dict[str, np.ndarray] = field(default_factory=dict)


def _score(i: int) -> float:
    return round(0.20 + 0.005 * i, 4)


def write_curation_input(uri: str, corpus, dim: int = 32, per_shard: int = 12, laion_columns: bool = False,
                         seed: int = 0) -> CurationInput:
    """47 rows over 4 shards: 40 distinct images, 3 re-posts of some of them (same bytes), 4 near
    duplicates (other images whose embedding is a copy's plus a little noise). The 4 lowest scores
    are base items 0-3 (the default 10 % quantile removes exactly those)."""
    root, items = corpus
    rng = np.random.default_rng(seed)
    base_emb = normalized(rng.normal(size=(BASE, dim)))
    rows, emb = [], []
    for i in range(BASE):
        data = (root / items[i].file).read_bytes()
        rows.append(_row(f"syn/{i:04d}", "synthetic", data, items[i].caption, _score(i)))
        emb.append(base_emb[i])
    for orig, score in EXACT.items():
        data = (root / items[orig].file).read_bytes()
        rows.append(_row(f"repost/{orig:04d}", "web", data, items[orig].caption, score))
        emb.append(base_emb[orig])
    for j, (orig, score) in enumerate(NEAR.items()):
        data = (root / items[BASE + j].file).read_bytes()
        rows.append(_row(f"near/{orig:04d}", "web", data, items[BASE + j].caption, score))
        emb.append(normalized((base_emb[orig] + 0.02 * rng.normal(size=dim))[None])[0])
    order = np.random.default_rng(seed + 1).permutation(len(rows))   # duplicates land in other shards
    rows, emb = [rows[i] for i in order], np.stack(emb)[order]
    if laion_columns:  # LAION's own columns, as a LAION list carries them into the shards (meta)
        for k, r in enumerate(rows):
            r["meta"] = {"punsafe": 0.9 if k % 10 == 3 else (None if k % 10 == 4 else 0.1),
                         "pwatermark": 0.95 if k % 10 == 6 else 0.2}
            r["policy"] = "human" if r["key"] in ("syn/0000", "syn/0001") else "web"
    ss = ShardSet(uri)
    shards = []
    for s, start in enumerate(range(0, len(rows), per_shard)):
        part = rows[start:start + per_shard]
        table = pa.Table.from_pylist(part, schema=CAPFILT.arrow_schema())
        ss.write_shard(s, table, CAPFILT)
        write_embeddings(ss, s, table, emb[start:start + per_shard], emb[start:start + per_shard])
        shards.append([r["key"] for r in part])
    ss.write_manifest(CAPFILT, config={"test": True})
    out = CurationInput(uri, [r["key"] for r in rows], shards,
                        embeddings={r["key"]: e for r, e in zip(rows, emb)})
    out.removed = {"clip_score": {f"syn/{i:04d}" for i in range(4)},
                   "exact_duplicate": {f"repost/{o:04d}" for o in EXACT if EXACT[o] < _score(o)}
                   | {f"syn/{o:04d}" for o in EXACT if EXACT[o] > _score(o)},
                   "near_duplicate": {f"near/{o:04d}" for o in NEAR if NEAR[o] < _score(o)}
                   | {f"syn/{o:04d}" for o in NEAR if NEAR[o] > _score(o)}}
    for table_, kind in ((EXACT, "repost"), (NEAR, "near")):
        for o, score in table_.items():
            copy, orig = f"{kind}/{o:04d}", f"syn/{o:04d}"
            out.duplicate_of.update({copy: orig} if score < _score(o) else {orig: copy})
    return out


def _row(key: str, source: str, image: bytes, caption: str, score: float) -> dict:
    return dict(key=key, source=source, policy="web", url=f"http://127.0.0.1/{key}", meta=None,
                sha256=hashlib.sha256(image).hexdigest(),
                image=image, captions=[caption, f"a picture of {caption.split()[1]}"], scores=[score, score - 0.05],
                candidates=None, original_caption=caption)
