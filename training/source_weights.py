"""Per-source sampling weights (``ingest.source_weights``): which source each row holds, how
often each row group appears in an epoch's order, and the realised mix.

Weights act on the unit the epoch order already shuffles: a chunk (one 256-row row group).
A chunk of a source of weight ``w`` appears ``floor(w)`` times in the epoch, plus once more with
probability ``frac(w)``; the draws of all chunks come from one RNG of (seed, epoch), indexed by
chunk id, so the weighted order stays a pure function of (seed, epoch, shard set, weights) and
does not depend on the world size. Weight 0 drops a source; a source the config does not name
has weight 1. A chunk holding rows of several sources is cut into one part per source (its rows
of that source), each weighted like a chunk of its own: every row follows its own source's
weight. The copies of a row in one epoch are augmented differently (the copy number is part of
the sample RNG's seed, :func:`training.ingest.sample_rng`).

A shard's sources are read from its Parquet footer (row-group min/max statistics of ``source``);
only a shard with a row group that mixes sources has its ``source`` column read.
"""
from __future__ import annotations

import bisect
import math

import numpy as np

SourceRuns = tuple[tuple[int, int, str], ...]   # (start, stop, source) runs of a shard's rows, in order


# -- the sources a shard holds -----------------------------------------------------------------
def _merge(runs: list[tuple[int, int, str]]) -> SourceRuns:
    out: list[tuple[int, int, str]] = []
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
    md = pf.metadata
    col = next(j for j in range(md.num_columns) if md.schema.column(j).path == "source")
    runs, start = [], 0
    for g in range(md.num_row_groups):
        rg = md.row_group(g)
        if rg.num_rows == 0:
            continue
        st = rg.column(col).statistics
        if st is None or not st.has_min_max or st.min != st.max:
            return _runs_from_column(pf)
        runs.append((start, start + rg.num_rows, str(st.min)))
        start += rg.num_rows
    return _merge(runs)


def known_sources(shards) -> list[str]:
    return sorted({s for sh in shards for _, _, s in sh.sources})


def source_rows(shards) -> dict[str, int]:
    """Rows of each source in the shard set (the unweighted mix)."""
    out: dict[str, int] = {}
    for sh in shards:
        for a, b, s in sh.sources:
            out[s] = out.get(s, 0) + b - a
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
def chunk_parts(shards, chunk: int) -> list[tuple[int, tuple[tuple[int, int], ...], str]]:
    """Every chunk of the shard set cut by source: (shard index, row ranges, source) in chunk
    order; a chunk of one source is one part (its sources sorted by name otherwise)."""
    parts = []
    for i, sh in enumerate(shards):
        if sum(b - a for a, b, _ in sh.sources) != sh.rows:
            raise ValueError(f"{sh.url}: source weights need every row's source (list_shards(..., sources=True))")
        if len(sh.sources) == 1:  # the usual shard: one source
            src = sh.sources[0][2]
            parts += [(i, ((a, min(a + chunk, sh.rows)),), src) for a in range(0, sh.rows, chunk)]
            continue
        ends = [b for _, b, _ in sh.sources]
        for a in range(0, sh.rows, chunk):
            b = min(a + chunk, sh.rows)
            by_src: dict[str, list[tuple[int, int]]] = {}
            for r0, r1, src in sh.sources[bisect.bisect_right(ends, a):]:
                if r0 >= b:
                    break
                by_src.setdefault(src, []).append((max(a, r0), min(b, r1)))
            parts += [(i, tuple(by_src[s]), s) for s in sorted(by_src)]
    return parts


def part_copies(sources: list[str], weights: dict, rng: np.random.Generator) -> np.ndarray:
    """How many times each part appears: floor(w), plus one with probability frac(w)."""
    w = np.array([float(weights.get(s, 1.0)) for s in sources])
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
        self.rows = source_rows(spec.shards)
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
