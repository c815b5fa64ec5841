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

import numpy as np

from pipelines.schema import HUMAN

SourceRuns = tuple[tuple[int, int, str], ...]   # (start, stop, source) runs of a shard's rows, in order
CaptionRuns = tuple[tuple[int, int, int], ...]  # (start, stop, k): human rows with k != 1 usable captions


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


def usable_captions(captions) -> int:
    """How many captions of a row a sample can be drawn from (empty ones never are; at least 1)."""
    return max(1, sum(1 for c in captions or () if c))


def read_caption_runs(pf) -> CaptionRuns:
    """The runs of human rows whose usable-caption count k is not 1, of one shard: only the row
    groups whose ``policy`` statistics admit a human row have their ``policy`` and ``captions`` read."""
    md = pf.metadata
    col = next(j for j in range(md.num_columns) if md.schema.column(j).path == "policy")
    runs, start = [], 0
    for g in range(md.num_row_groups):
        rg = md.row_group(g)
        st = rg.column(col).statistics
        if rg.num_rows and not (st is not None and st.has_min_max and st.min == st.max != HUMAN):
            t = pf.read_row_group(g, columns=["policy", "captions"])
            ks = [usable_captions(c) if p == HUMAN else 1
                  for p, c in zip(t.column("policy").to_pylist(), t.column("captions").to_pylist())]
            runs += [(start + i, start + i + 1, k) for i, k in enumerate(ks) if k != 1]
        start += rg.num_rows
    out: list[tuple[int, int, int]] = []
    for a, b, k in runs:
        if out and out[-1][2] == k and out[-1][1] == a:
            out[-1] = (out[-1][0], b, k)
        else:
            out.append((a, b, k))
    return tuple(out)


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
def chunk_parts(shards, chunk: int) -> list[tuple[int, tuple[tuple[int, int], ...], str, int]]:
    """Every chunk of the shard set cut by (source, caption count k): (shard index, row ranges,
    source, k) in chunk order; a chunk of one kind is one part (its kinds sorted otherwise)."""
    parts = []
    for i, sh in enumerate(shards):
        if sum(b - a for a, b, _ in sh.sources) != sh.rows:
            raise ValueError(f"{sh.url}: source weights need every row's source (list_shards(..., sources=True))")
        runs = row_runs(sh)
        if len(runs) == 1:  # the usual shard: one source, one caption per sample
            _, _, src, k = runs[0]
            parts += [(i, ((a, min(a + chunk, sh.rows)),), src, k) for a in range(0, sh.rows, chunk)]
            continue
        ends = [b for _, b, _, _ in runs]
        for a in range(0, sh.rows, chunk):
            b = min(a + chunk, sh.rows)
            by_kind: dict[tuple[str, int], list[tuple[int, int]]] = {}
            for r0, r1, src, k in runs[bisect.bisect_right(ends, a):]:
                if r0 >= b:
                    break
                by_kind.setdefault((src, k), []).append((max(a, r0), min(b, r1)))
            parts += [(i, tuple(by_kind[kind]), *kind) for kind in sorted(by_kind)]
    return parts


def part_copies(kinds: list[tuple[str, int]], weights: dict, rng: np.random.Generator,
                each_caption: bool = False) -> np.ndarray:
    """How many times each part of (source, k) appears: floor(w), plus one with probability
    frac(w), where w is the source's weight (times k with ``each_caption``)."""
    w = np.array([float(weights.get(s, 1.0)) * (k if each_caption else 1) for s, k in kinds])
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
