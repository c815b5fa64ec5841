"""Per-source sampling weights (``ingest.source_weights``) and the human-caption share
(``ingest.human_captions``): which source each row holds, how often each row group appears in
an epoch's order, and the realised mix.

Weights act on the unit the epoch order already shuffles: a chunk (one 256-row row group).
A chunk of a source of weight ``w`` appears ``floor(w)`` times in the epoch, plus once more with
probability ``frac(w)``; the draws of all chunks come from one RNG of (seed, epoch), indexed by
chunk id, so the weighted order stays a pure function of (seed, epoch, shard set, weights) and
does not depend on the world size. Weight 0 drops a source; a source the config does not name
has weight 1. A chunk holding rows of several sources is cut into one part per source (its rows
of that source), each weighted like a chunk of its own: every row follows its own source's
weight. The copies of a row in one epoch are augmented differently (the copy number is part of
the sample RNG's seed, :func:`training.ingest.sample_rng`).

Human rows (COCO, VG: one row per image holding all its captions) are trained at LAVIS' and
BLIP's share with ``human_captions: each``, the default: those datasets make one item per caption,
so an image with k captions appears k times per epoch (times its source's weight), each copy with
another of its captions (:func:`training.ingest.caption_for`). The rows are cut into parts by
(source, k) as they are by source, and a part's weight is the source's weight times k.

A shard's sources are read from its Parquet footer (row-group min/max statistics of ``source``);
only a shard with a row group that mixes sources has its ``source`` column read. Likewise only a
row group whose ``policy`` statistics admit ``human`` rows has its ``captions`` counted.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import numpy as np

from pipelines.schema import HUMAN
from pipelines.shardio import column_stats

SourceRuns = tuple[tuple[int, int, str], ...]   # (start, stop, source) runs of a shard's rows, in order
CaptionRuns = tuple[tuple[int, int, int], ...]  # (start, stop, k): human rows with k != 1 usable captions


# -- the sources a shard holds -----------------------------------------------------------------
def _merge(runs: list[tuple]) -> tuple:
    """Adjacent (start, stop, value) runs of one value joined."""
    out: list[tuple] = []
    for a, b, s in runs:
        if out and out[-1][2] == s and out[-1][1] == a:
            out[-1] = (out[-1][0], b, s)
        else:
            out.append((a, b, s))
    return tuple(out)


def _runs_from_column(pf) -> SourceRuns:
    values = pf.read(columns=["source"]).column("source").to_numpy(zero_copy_only=False)
    if not len(values):
        return ()
    cuts = [0, *(np.flatnonzero(values[1:] != values[:-1]) + 1).tolist(), len(values)]
    return tuple((a, b, str(values[a])) for a, b in zip(cuts, cuts[1:]))


def read_source_runs(pf) -> SourceRuns:
    """The source runs of one shard (a ``pyarrow.parquet.ParquetFile``): from the row-group
    statistics when each row group holds one source, else from the column itself."""
    runs, start = [], 0
    for rows, st in column_stats(pf, "source"):
        if rows == 0:
            continue
        if st is None or not st.has_min_max or st.min != st.max:
            return _runs_from_column(pf)
        runs.append((start, start + rows, str(st.min)))
        start += rows
    return _merge(runs)


def usable_captions(captions) -> int:
    """How many captions of a row a sample can be drawn from (empty ones never are; at least 1)."""
    return max(1, sum(1 for c in captions or () if c))


def read_caption_runs(pf) -> CaptionRuns:
    """The runs of human rows whose usable-caption count k is not 1, of one shard: only the row
    groups whose ``policy`` statistics admit a human row have their ``policy`` and ``captions`` read."""
    runs, start = [], 0
    for g, (rows, st) in enumerate(column_stats(pf, "policy")):
        if rows and not (st is not None and st.has_min_max and st.min == st.max != HUMAN):
            t = pf.read_row_group(g, columns=["policy", "captions"])
            ks = [usable_captions(c) if p == HUMAN else 1
                  for p, c in zip(t.column("policy").to_pylist(), t.column("captions").to_pylist())]
            runs += [(start + i, start + i + 1, k) for i, k in enumerate(ks) if k != 1]
        start += rows
    return _merge(runs)


def row_runs(shard) -> tuple[tuple[int, int, str, int], ...]:
    """(start, stop, source, k) runs of one shard: its source runs cut where the caption count
    changes (a walk over both run lists, which are sorted and, for sources, cover every row)."""
    caps = list(shard.captions)
    out: list[tuple[int, int, str, int]] = []
    j = 0
    for a, b, src in shard.sources:
        pos = a
        while pos < b:
            while j < len(caps) and caps[j][1] <= pos:
                j += 1
            if j < len(caps) and caps[j][0] <= pos:          # inside a run of k captions
                stop, k = min(b, caps[j][1]), caps[j][2]
            else:                                            # one caption up to the next run
                stop, k = min(b, caps[j][0]) if j < len(caps) else b, 1
            if out and out[-1][2:] == (src, k) and out[-1][1] == pos:
                out[-1] = (out[-1][0], stop, src, k)
            else:
                out.append((pos, stop, src, k))
            pos = stop
    return tuple(out)


def known_sources(shards) -> list[str]:
    return sorted({s for sh in shards for _, _, s in sh.sources})


def source_rows(shards, each_caption: bool = False) -> dict[str, int]:
    """Rows of each source in the shard set (the unweighted mix); with ``each_caption``, a human
    row counts once per usable caption (the samples an unweighted epoch holds)."""
    out: dict[str, int] = {}
    for sh in shards:
        for a, b, s, k in (row_runs(sh) if each_caption else ((a, b, s, 1) for a, b, s in sh.sources)):
            out[s] = out.get(s, 0) + (b - a) * k
    return dict(sorted(out.items()))


# -- config checks -------------------------------------------------------------------------------
def check_weight_values(weights: dict) -> None:
    """At config validation: every weight a finite number >= 0."""
    for name, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(f"ingest.source_weights.{name} must be a number >= 0, got {w!r}")


def check_weight_names(weights: dict, shards) -> None:
    """Once the shard set is known: every named source is one the shards hold."""
    known = known_sources(shards)
    unknown = sorted(set(weights) - set(known))
    if unknown:
        raise ValueError(f"ingest.source_weights names source(s) {unknown} that the shard set does not hold; "
                         f"its sources: {known}")


# -- the weighted chunk list of one epoch ---------------------------------------------------------
@dataclass(frozen=True)
class ChunkParts:
    """Every chunk of a shard set cut by (source, caption count k), as arrays (a paper-sized set
    has ~500k of them): part ``p`` holds rows ``starts[j]..stops[j]`` for ``j`` in
    ``offsets[p]..offsets[p+1]`` of shard ``shard[p]`` (one range, or several where a chunk mixes
    kinds), of source ``source[p]`` (an index into the sorted sources; -1 where none was listed)."""
    shard: np.ndarray
    source: np.ndarray
    k: np.ndarray
    offsets: np.ndarray
    starts: np.ndarray
    stops: np.ndarray

    def __len__(self) -> int:
        return len(self.shard)

    def sizes(self) -> np.ndarray:
        lengths = np.concatenate([[0], np.cumsum(self.stops - self.starts)])
        return lengths[self.offsets[1:]] - lengths[self.offsets[:-1]]


def chunk_parts(shards, chunk: int, sources: list[str], need_sources: bool) -> ChunkParts:
    """The chunks of ``shards`` in chunk order; a chunk of one kind is one part, a mixed chunk one
    part per kind (sorted by (source, k)). Runs of one-kind shards are cut in one numpy pass."""
    index = {s: j for j, s in enumerate(sources)}
    cols: dict[str, list] = {c: [] for c in ("shard", "source", "k", "ranges", "starts", "stops")}
    plain: list[tuple[int, int, int, int]] = []   # (shard index, rows, source index, k) of one-kind shards

    def flush() -> None:
        if not plain:
            return
        i, rows, src, k = (np.array(c, np.int64) for c in zip(*plain))
        n = -(-rows // chunk)
        first = np.repeat(np.cumsum(n) - n, n)
        starts = (np.arange(int(n.sum())) - first) * chunk
        cols["starts"].append(starts)
        cols["stops"].append(np.minimum(starts + chunk, np.repeat(rows, n)))
        for name, col in (("shard", i), ("source", src), ("k", k)):
            cols[name].append(np.repeat(col, n))
        cols["ranges"].append(np.ones(int(n.sum()), np.int64))
        plain.clear()

    for i, sh in enumerate(shards):
        if need_sources and sum(b - a for a, b, _ in sh.sources) != sh.rows:
            raise ValueError(f"{sh.url}: source weights need every row's source (list_shards(..., sources=True))")
        runs = row_runs(sh) if sh.sources else ((0, sh.rows, None, 1),)
        if len(runs) == 1:  # the usual shard: one source, one caption per sample
            plain.append((i, sh.rows, index.get(runs[0][2], -1), runs[0][3]))
            continue
        flush()
        ends = [b for _, b, _, _ in runs]
        for a in range(0, sh.rows, chunk):
            b = min(a + chunk, sh.rows)
            by_kind: dict[tuple[str, int], list[tuple[int, int]]] = {}
            for r0, r1, src, k in runs[bisect.bisect_right(ends, a):]:
                if r0 >= b:
                    break
                by_kind.setdefault((src, k), []).append((max(a, r0), min(b, r1)))
            for (src, k) in sorted(by_kind):
                ranges = by_kind[(src, k)]
                cols["shard"].append([i])
                cols["source"].append([index[src]])
                cols["k"].append([k])
                cols["ranges"].append([len(ranges)])
                cols["starts"].append([r[0] for r in ranges])
                cols["stops"].append([r[1] for r in ranges])
    flush()
    cat = {c: np.concatenate(v).astype(np.int64) if v else np.zeros(0, np.int64) for c, v in cols.items()}
    return ChunkParts(cat["shard"], cat["source"], cat["k"], np.concatenate([[0], np.cumsum(cat["ranges"])]),
                      cat["starts"], cat["stops"])


def part_copies(parts: ChunkParts, sources: list[str], weights: dict, rng: np.random.Generator,
                each_caption: bool = False) -> np.ndarray:
    """How many times each part appears: floor(w), plus one with probability frac(w), where w is
    its source's weight (times its k with ``each_caption``)."""
    by_source = np.array([float(weights.get(s, 1.0)) for s in sources] + [1.0])   # [-1]: no source
    w = by_source[parts.source] * (parts.k if each_caption else 1)
    base = np.floor(w)
    return (base + (rng.random(len(w)) < w - base)).astype(np.int64)


# -- the realised mix ---------------------------------------------------------------------------
def mix_line(epoch: int, planned: dict[str, int], rows: dict[str, int], weights: dict) -> str:
    """The epoch's planned mix beside the configured one (weight × rows, normalised)."""
    want = {s: weights.get(s, 1.0) * n for s, n in rows.items()}
    total_p, total_w = sum(planned.values()) or 1, sum(want.values()) or 1
    parts = [f"{s} {planned.get(s, 0)} = {100 * planned.get(s, 0) / total_p:.1f} % "
             f"(configured {100 * want[s] / total_w:.1f} %, weight {weights.get(s, 1.0):g})" for s in rows]
    return f"[blip2] epoch {epoch} source mix, planned samples: " + "; ".join(parts)


class SourceMix:
    """Rank 0's account of the per-source samples: each epoch's plan and the cumulative counts
    after any step, derived from the epoch orders alone (so a resumed run reports the same)."""

    def __init__(self, spec, global_batch: int):
        self.spec, self.global_batch = spec, global_batch
        self.weights = dict(spec.cfg.source_weights)
        self.rows = source_rows(spec.shards, spec.cfg.human_captions == "each")
        self.plans: dict[int, dict[str, int]] = {}
        self._order = None

    def _counts(self, order, hi: int) -> dict[str, int]:
        return dict(zip(order.sources, order.source_counts(hi).tolist()))

    def plan(self, epoch: int) -> dict[str, int]:
        """Samples of each source the epoch consumes (its drop-last tail excluded)."""
        if epoch not in self.plans:
            mine = self._order is not None and self._order.epoch == epoch
            order = self._order if mine else self.spec.order(epoch)
            self.plans[epoch] = self._counts(order, self.spec.epoch_stop(order, self.global_batch))
        return self.plans[epoch]

    def metrics(self, epoch: int, consumed: int) -> dict[str, int]:
        """``samples/<source>``: cumulative over the run; ``plan/<source>`` on an epoch's first step.
        The plan of each epoch this process enters is printed beside the configured mix."""
        if self._order is None or self._order.epoch != epoch:
            self._order = self.spec.order(epoch)
            print(mix_line(epoch, self.plan(epoch), self.rows, self.weights), flush=True)
        now = self._counts(self._order, consumed)
        out = {f"samples/{s}": sum(self.plan(e)[s] for e in range(epoch)) + now.get(s, 0) for s in self.rows}
        if consumed == self.global_batch:
            out.update({f"plan/{s}": n for s, n in self.plan(epoch).items()})
        return out
