"""Training ingest: CapFilt shards → augmented per-worker micro-batches (Ray Data).

The data position is a count of samples in one **global** order of the epoch, so a run
resumed at any world size continues with exactly the next unseen sample. Why each worker
builds its own pipeline instead of one ``streaming_split``: Ray Data's split hands blocks to
whichever worker asks first, so which rank consumed which sample would not be reproducible.

The epoch order (:class:`EpochOrder`) is a pure function of (seed, epoch, shard set, source
weights), a two-level shuffle in the spirit of MosaicML Streaming's py1b/py1br, but over Parquet
row groups instead of whole shards:

  1. every shard is cut into chunks of ``READ_CHUNK_ROWS`` rows (one row group each); with
     ``ingest.source_weights`` each chunk appears as often as its source's weight says, and a
     human image with k captions k times (``ingest.human_captions``, LAVIS' share; see
     :mod:`training.source_weights`), so the epoch's length is that of the weighted list;
  2. all chunks of the shard set are permuted (seed, epoch): a chunk's neighbours come
     from anywhere in the corpus;
  3. consecutive runs of ``window`` permuted chunks form a window; the samples inside a
     window are permuted (seed, epoch, window). The epoch order is the windows in turn.

So a global batch mixes ~``window`` row groups of different shards, and a reader holds one
window in memory and reads whole row groups (one ranged read each) — the read locality.
Optimizer step k consumes positions ``[k·G, (k+1)·G)`` of the order (G: the global batch),
split into accumulation rounds and per-rank shares by :func:`step_split`; inside a round the
ranks take its samples grouped by row group (:func:`rank_picks`), so each rank reads only about
``window / world`` row groups of a window. The ``N mod G`` samples at the end of each epoch's
order (random ones, new each epoch) are dropped, like ``drop_last``.

The plan is lazy (:class:`RankPlan`): a rank lists only the windows of its epoch; each Ray Data read
task, on its worker, works out which rounds of its window are the rank's and which rows they are,
from the epoch order the worker builds once. So what a rank plans before its first step is the
order's arrays, not the epoch's read tasks (0.7 s and ~0.1 GB at 129M samples, README).

Decode + random resized crop + flip + normalise + caption clean-up + caption draw run in CPU
``map_batches`` tasks, randomness seeded by (seed, epoch, key), so a resumed run replays
exactly the same pixels and captions whatever the world size.

A sample whose image does not decode is replaced by another valid sample of the same map
batch (and counted in ``replaced``), so batches never shrink and collectives never hang.
"""
from __future__ import annotations

import hashlib
import io
import random
import uuid
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
from PIL import Image

from pipelines.images import IMAGE_FORMATS
from pipelines.schema import CAPFILT, HUMAN, validate
from pipelines.shardio import ShardSet
from training.source_weights import (CaptionRuns, SourceRuns, check_weight_values, chunk_parts,
                                     known_sources, part_copies, read_caption_runs, read_source_runs)
from training.text import pre_caption

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
READ_CHUNK_ROWS = 256          # rows per Ray Data read task (one Parquet row group)
READ_COLUMNS = ("key", "policy", "image", "captions")   # what training reads of a CapFilt row
# Ray Data input blocks of a rank's epoch: one per window up to this, then several windows a block
# (16k windows as 16k blocks took Ray Data ~20 s to start; 256 take ~0.3 s)
MAX_READ_BLOCKS = 256


@dataclass
class IngestConfig:
    """The ``ingest.*`` section: how CapFilt rows become training samples. Workers receive it as
    it is; the step geometry (``train.batch_size``, ``train.global_batch``) stays in ``train``,
    which the optimizer and the LR schedule read, and is handed to the functions below."""
    shuffle_window: int = 32           # row groups (256 rows) mixed per shuffle window (1: chunk order only)
    # source → sampling weight per epoch, e.g. {laion: 0.5, coco: 2.0}; unnamed sources 1, 0 drops one
    # (a row group of weight w is read floor(w) times + once more with probability frac(w))
    source_weights: dict[str, float] = field(default_factory=dict)
    min_scale: float = 0.5             # random resized crop scale range (min, 1)
    max_words: int = 50
    hflip: bool = True                 # random horizontal flip (paper); off where captions say left/right
    caption_pick: str = "random"       # random: one of the kept captions per sample (paper) | first: the best
    # each: a human row (COCO, VG) with k captions is seen k times per epoch, each time with another
    # of them (LAVIS/BLIP: one item per caption) | one: once per epoch, one caption drawn at random
    human_captions: str = "each"
    map_batch_size: int = 32           # rows per decode/augment task batch
    cpus_per_task: float = 1.0         # CPU per read and decode/augment task

    def validate(self) -> None:
        if self.shuffle_window < 1:
            raise ValueError(f"shuffle_window must be >= 1, got {self.shuffle_window}")
        check_weight_values(self.source_weights)
        if not 0 < self.min_scale <= 1:
            raise ValueError(f"min_scale must be in (0, 1], got {self.min_scale}")
        if self.caption_pick not in ("random", "first"):
            raise ValueError(f"caption_pick must be random or first, got {self.caption_pick!r}")
        if self.human_captions not in ("each", "one"):
            raise ValueError(f"human_captions must be each or one, got {self.human_captions!r}")


# -- pure per-sample transforms --------------------------------------------------------------
def sample_rng(seed: int, epoch: int, key: str, copy: int = 0) -> random.Random:
    """The per-sample RNG: same (seed, epoch, key, copy), same crop, flip and caption choice.
    ``copy``: which appearance of an up-weighted row in the epoch (each gets its own view)."""
    name = f"{seed}/{epoch}/{key}" + (f"/{copy}" if copy else "")
    digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


def caption_for(seed: int, epoch: int, key: str, copy: int, k: int) -> int:
    """Which of a human row's k usable captions its copy ``copy`` trains on: a seeded permutation
    of them per (seed, epoch, key), so the k copies of an epoch see every caption once."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{key}/captions".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little")).sample(range(k), k)[copy % k]


def random_resized_crop(img: Image.Image, rng: random.Random, size: int, min_scale: float,
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Image.Image:
    """torchvision's RandomResizedCrop (area in [min_scale, 1], log-uniform aspect), bicubic."""
    w, h = img.size
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(min_scale, 1.0)
        aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
        cw, ch = int(round((target * aspect) ** 0.5)), int(round((target / aspect) ** 0.5))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
            return img.resize((size, size), Image.BICUBIC, box=(x, y, x + cw, y + ch))
    # torchvision's fallback after 10 misses: the centred crop of the whole image with its aspect
    # clamped to ``ratio``
    aspect = w / h
    cw, ch = (w, int(round(w / ratio[0]))) if aspect < ratio[0] else \
        (int(round(h * ratio[1])), h) if aspect > ratio[1] else (w, h)
    x, y = (w - cw) // 2, (h - ch) // 2
    return img.resize((size, size), Image.BICUBIC, box=(x, y, x + cw, y + ch))


def augment_image(data: bytes, rng: random.Random, size: int, min_scale: float, hflip: bool = True) -> np.ndarray:
    """JPEG/PNG bytes → float32 [3, size, size], CLIP-normalised. Raises on undecodable bytes."""
    with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as im:  # the corpus formats only
        img = im.convert("RGB")
    img = random_resized_crop(img, rng, size, min_scale)
    if rng.random() < 0.5 and hflip:  # the draw happens either way: same RNG stream for other draws
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    arr = (np.asarray(img, dtype=np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


@dataclass(frozen=True)
class Augment:
    """The CPU ``map_batches`` callable: raw CapFilt rows → model-ready rows.

    Output columns: ``pixel_values`` float32 [n, 3, size, size], ``text`` (str), ``key`` (str),
    ``replaced`` (bool: the image was undecodable and another sample of the batch stands in).
    With ``human_captions="each"`` a human row's copies take its captions in turn (:func:`caption_for`).
    """
    seed: int
    epoch: int
    image_size: int
    min_scale: float
    max_words: int
    hflip: bool = True
    caption_pick: str = "random"   # random | first
    human_captions: str = "each"   # each | one

    def __call__(self, batch: dict) -> dict:
        keys = [str(k) for k in batch["key"]]
        copies = batch["copy"] if "copy" in batch else [0] * len(keys)
        policies = batch["policy"] if "policy" in batch else ["web"] * len(keys)
        pixels: list[np.ndarray | None] = []
        texts, ok = [], []
        for key, copy, policy, image, captions in zip(keys, copies, policies, batch["image"], batch["captions"]):
            rng = sample_rng(self.seed, self.epoch, key, int(copy))
            caps = [c for c in list(captions) if c] or [""]
            pick = rng.randrange(len(caps))  # drawn either way, so all modes replay the same pixels
            if policy == HUMAN and self.human_captions == "each":
                pick = caption_for(self.seed, self.epoch, key, int(copy), len(caps))
            elif self.caption_pick == "first":
                pick = 0
            texts.append(pre_caption(caps[pick], self.max_words))
            try:
                pixels.append(augment_image(bytes(image), rng, self.image_size, self.min_scale, self.hflip))
                ok.append(True)
            except Exception:  # noqa: BLE001 - any decode failure is a counted, replaced sample
                pixels.append(None)
                ok.append(False)
        valid = [i for i, good in enumerate(ok) if good]
        replaced = []
        for i in range(len(keys)):
            if ok[i]:
                replaced.append(False)
                continue
            replaced.append(True)
            if valid:  # stand-in: the next valid sample of this batch (deterministic)
                j = min(valid, key=lambda v: (v - i) % len(keys))
                pixels[i], texts[i] = pixels[j], texts[j]
            else:  # nothing decodable in the whole batch: a mean-grey image keeps the shape
                pixels[i] = np.zeros((3, self.image_size, self.image_size), np.float32)
        return {"pixel_values": np.stack(pixels), "text": np.array(texts, dtype=object),
                "key": np.array(keys, dtype=object), "replaced": np.array(replaced)}


# -- the epoch plan: the global sample order and who reads what --------------------------------
@dataclass(frozen=True)
class ShardRows:
    url: str
    rows: int
    sources: SourceRuns = ()       # (start, stop, source) runs; read with list_shards(..., sources=True)
    captions: CaptionRuns = ()     # (start, stop, k) runs of human rows with k != 1 captions; read likewise


def list_shards(uri: str, sources: bool = False) -> list[ShardRows]:
    """Committed CapFilt shards of ``uri`` with their row counts (schema checked once) and, with
    ``sources``, which source each row holds and how many captions each human row has (a footer
    read per shard, plus the ``captions`` of row groups that hold human rows)."""
    import pyarrow.parquet as pq

    shards = ShardSet(uri)
    shards.check_schema(CAPFILT)

    def describe(name: str) -> ShardRows:
        rows = shards.shard_info(name).rows
        if not sources:
            return ShardRows(shards.url(name), rows)
        with shards.fs.open(shards.path(name), "rb") as f:
            pf = pq.ParquetFile(f)
            return ShardRows(shards.url(name), rows, read_source_runs(pf), read_caption_runs(pf))

    return shards.map_members(describe, shards.committed())


def _rng(seed: int, *words: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([abs(int(seed)), *words]))


class EpochOrder:
    """The seeded global sample order of one epoch (see the module doc).

    Positions map to (shard index, row); windows are materialised lazily, one at a time. Shards
    listed with their sources give the weighted chunk list (``weights``: source → weight, and
    with ``each_caption`` a human row's caption count): a chunk may appear several times, and each
    position also has a source index (into ``sources``) and a copy number. The chunk list is held
    as arrays (:class:`training.source_weights.ChunkParts`): a few MB at the paper's 500k chunks."""

    def __init__(self, shards: tuple[ShardRows, ...] | list[ShardRows], seed: int, epoch: int, window: int,
                 chunk: int = READ_CHUNK_ROWS, weights: dict | tuple = (), each_caption: bool = False):
        self.shards, self.seed, self.epoch, self.window = tuple(shards), seed, epoch, max(1, window)
        self.weights, self.each_caption = dict(weights), each_caption
        self.weighted = bool(self.weights) or any(s.sources for s in self.shards)
        self.sources = known_sources(self.shards)
        self.parts = chunk_parts(self.shards, chunk, self.sources, self.weighted)
        if self.weighted:  # every appearance of a part: copies in a row, numbered 0..n-1
            copies = part_copies(self.parts, self.sources, self.weights, _rng(seed, epoch, 3), each_caption)
            entry_part = np.repeat(np.arange(len(self.parts)), copies)
            entry_copy = np.arange(len(entry_part)) - np.repeat(np.cumsum(copies) - copies, copies)
        else:
            entry_part, entry_copy = np.arange(len(self.parts)), np.zeros(len(self.parts), np.int64)
        perm = _rng(seed, epoch, 1).permutation(len(entry_part))
        self.entry_part, self.entry_copy = entry_part[perm], entry_copy[perm]   # the permuted chunk list
        self.sizes = self.parts.sizes()[self.entry_part]
        ends = np.cumsum(self.sizes)
        n_win = -(-len(self.entry_part) // self.window)
        self.window_ends = ends[np.minimum(len(ends), (np.arange(n_win) + 1) * self.window) - 1].astype(np.int64)
        self.total = int(ends[-1]) if len(ends) else 0
        self._cache: tuple | None = None
        self._window_counts: np.ndarray | None = None

    def window_start(self, w: int) -> int:
        return int(self.window_ends[w - 1]) if w else 0

    def window_of(self, pos: int) -> int:
        return int(np.searchsorted(self.window_ends, pos, side="right"))

    def window_rows(self, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(shard index, row, source index, copy) of every position of window ``w``, in epoch order."""
        if self._cache is None or self._cache[0] != w:
            lo, hi = w * self.window, (w + 1) * self.window
            parts, sizes, p = self.entry_part[lo:hi], self.sizes[lo:hi], self.parts
            shard = np.repeat(p.shard[parts], sizes)
            row = np.concatenate([np.arange(p.starts[j], p.stops[j], dtype=np.int64)
                                  for q in parts.tolist() for j in range(p.offsets[q], p.offsets[q + 1])])
            src = np.repeat(p.source[parts], sizes)
            copy = np.repeat(self.entry_copy[lo:hi], sizes)
            perm = _rng(self.seed, self.epoch, 2, w).permutation(len(row))
            self._cache = (w, shard[perm], row[perm], src[perm], copy[perm])
        return self._cache[1:]

    def take(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(shard index, row, source index, copy) of positions ``[lo, hi)``."""
        cols: list[list[np.ndarray]] = [[], [], [], []]
        while lo < hi:
            w = self.window_of(lo)
            a, b = lo - self.window_start(w), min(hi, int(self.window_ends[w])) - self.window_start(w)
            for col, arr in zip(cols, self.window_rows(w)):
                col.append(arr[a:b])
            lo += b - a
        return tuple(np.concatenate(c) for c in cols) if cols[0] else (np.zeros(0, np.int64),) * 4

    def positions(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard index, row) of positions ``[lo, hi)``."""
        return self.take(lo, hi)[:2]

    def copies_at(self, pos: np.ndarray) -> np.ndarray:
        """The copy number of each given position (any order)."""
        pos = np.asarray(pos, np.int64)
        out = np.zeros(len(pos), np.int64)
        if not self.weighted:
            return out
        win = np.searchsorted(self.window_ends, pos, side="right")
        for w in np.unique(win).tolist():
            m = win == w
            out[m] = self.window_rows(w)[3][pos[m] - self.window_start(w)]
        return out

    def source_counts(self, hi: int) -> np.ndarray:
        """Samples of each source (in ``sources`` order) among the first ``hi`` positions (weighted orders)."""
        if not self.weighted:
            raise ValueError("source counts need a weighted order (shards listed with their sources)")
        if self._window_counts is None:
            per = np.zeros((len(self.window_ends), len(self.sources)), np.int64)
            entries = np.arange(len(self.entry_part))
            np.add.at(per, (entries // self.window, self.parts.source[self.entry_part]), self.sizes)
            self._window_counts = np.cumsum(per, axis=0)
        w = self.window_of(hi)
        out = self._window_counts[w - 1].copy() if w else np.zeros(len(self.sources), np.int64)
        if w < len(self.window_ends) and hi > self.window_start(w):
            out += np.bincount(self.window_rows(w)[2][:hi - self.window_start(w)], minlength=len(self.sources))
        return out


def step_split(global_batch: int, batch_size: int, world: int) -> list[list[int]]:
    """Samples of each rank in each accumulation round of one optimizer step.

    The rule for any world size: ``accum = ceil(G / (batch_size × world))`` rounds; the G samples
    are spread over the rounds as evenly as possible (earlier rounds take the remainder), and each
    round's samples over the ranks likewise (lower ranks take the remainder). So no micro-batch
    exceeds ``batch_size`` and the step always holds exactly G samples; when ``batch_size × world
    × accum == G`` every micro-batch is exactly ``batch_size``."""
    if world > global_batch:
        raise ValueError(f"a global batch of {global_batch} cannot give one sample to each of {world} workers")
    accum = -(-global_batch // (batch_size * world))
    rounds = [global_batch // accum + (i < global_batch % accum) for i in range(accum)]
    return [[n // world + (r < n % world) for r in range(world)] for n in rounds]


def step_samples(split: list[list[int]]) -> int:
    """Samples of one optimizer step (the global batch) of a :func:`step_split`."""
    return sum(map(sum, split))


def steps_per_epoch(order: EpochOrder | list[ShardRows], global_batch: int) -> int:
    """Optimizer steps of an epoch (the ``N mod G`` tail of its order is dropped). An unweighted
    order is as long as its shard set, so the shard list stands for it."""
    n = order.total if isinstance(order, EpochOrder) else sum(s.rows for s in order)
    return n // global_batch


def _round_pick(order: EpochOrder, lo: int, sizes: list[int], rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(positions, shard index, row) of rank ``rank``'s share of the round ``[lo, lo + Σ sizes)``."""
    shard, row = order.positions(lo, lo + sum(sizes))
    idx = np.argsort(shard * (1 << 40) + row // READ_CHUNK_ROWS, kind="stable")
    mine = idx[sum(sizes[:rank]):sum(sizes[:rank + 1])]
    return lo + mine, shard[mine], row[mine]


def _rounds(split: list[list[int]], start: int, stop: int) -> Iterator[tuple[int, list[int]]]:
    """(first position, per-rank sizes) of each accumulation round of the steps in ``[start, stop)``."""
    for step0 in range(start, stop, step_samples(split)):
        lo = step0
        for sizes in split:
            yield lo, sizes
            lo += sum(sizes)


def rank_picks(order: EpochOrder, split: list[list[int]], rank: int, start: int,
               stop: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(positions, shard index, row) of what rank ``rank`` consumes in each accumulation round of
    the steps from ``start`` to ``stop`` (multiples of the global batch), in order; ``split``: the
    :func:`step_split` of a step.

    A round is the next contiguous run of positions (a random sample of the current window); its
    samples are handed to the ranks grouped by row group (stable sort by chunk), so each rank
    reads ~``window / world`` of a window's row groups rather than all of them. Which rank gets
    which sample of a step does not change what the step trains on (the losses gather across
    ranks), and every split covers the step's positions exactly once."""
    for lo, sizes in _rounds(split, start, stop):
        yield _round_pick(order, lo, sizes, rank)


def _read_task(order: EpochOrder, picks: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> dict:
    """The read task of some rounds' picks: the row groups they need and which rows, in order."""
    shard = np.concatenate([s for _, s, _ in picks])
    row = np.concatenate([r for _, _, r in picks])
    copies = np.concatenate([order.copies_at(pos) for pos, _, _ in picks])
    base = row - row % READ_CHUNK_ROWS
    needed = sorted(set(zip(shard.tolist(), base.tolist())))
    index = {c: j for j, c in enumerate(needed)}
    return {"urls": [order.shards[s].url for s, _ in needed], "starts": [a for _, a in needed],
            "stops": [min(a + READ_CHUNK_ROWS, order.shards[s].rows) for s, a in needed],
            "chunk": [index[c] for c in zip(shard.tolist(), base.tolist())],
            "offset": (row % READ_CHUNK_ROWS).tolist(), "copy": copies.tolist()}


def rank_read_tasks(order: EpochOrder, picks) -> list[dict]:
    """One read task per window (by the window of each round's first sample for this rank), all
    at once: the eager form of :class:`RankPlan`, which makes the same tasks one window at a time."""
    groups: list[tuple[int, list]] = []
    for pick in picks:
        if not len(pick[0]):
            continue
        w = order.window_of(int(pick[0].min()))
        if not groups or groups[-1][0] != w:
            groups.append((w, []))
        groups[-1][1].append(pick)
    return [_read_task(order, g) for _, g in groups]


_PLAN_ORDERS: dict[str, EpochOrder] = {}   # per process: the order of the plans its read tasks serve


@dataclass(frozen=True)
class RankPlan:
    """What one rank reads of one epoch from position ``start`` to ``stop``, produced lazily: the
    rank only lists the windows its rounds can touch, and each read task (one per window, on a Ray
    Data worker) works out its own rounds and rows from the epoch order, which a worker process
    builds once per plan. So nothing of size O(epoch) is planned before the first step, and the
    tasks are exactly those of :func:`rank_read_tasks` (tested)."""
    spec: "IngestSpec"
    epoch: int
    rank: int
    split: tuple
    start: int
    stop: int
    key: str = field(default_factory=lambda: uuid.uuid4().hex)

    def order(self) -> EpochOrder:
        if self.key not in _PLAN_ORDERS:
            while len(_PLAN_ORDERS) >= 2:  # the current plan and the previous one at most
                _PLAN_ORDERS.pop(next(iter(_PLAN_ORDERS)))
            _PLAN_ORDERS[self.key] = self.spec.order(self.epoch)
        return _PLAN_ORDERS[self.key]

    def windows(self, order: EpochOrder) -> list[int]:
        """Every window a round of ``[start, stop)`` can be filed under (some may get none)."""
        if self.stop <= self.start:
            return []
        return list(range(order.window_of(self.start), order.window_of(self.stop - 1) + 1))

    def task(self, order: EpochOrder, w: int) -> dict | None:
        """Window ``w``'s read task: the rounds overlapping the window whose first sample for this
        rank lies in it (None if there are none)."""
        ws, we = order.window_start(w), int(order.window_ends[w])
        g = step_samples([list(s) for s in self.split])
        first = self.start + max(0, (ws - self.start) // g - 1) * g
        last = min(self.stop, self.start + -(-(we - self.start) // g) * g)
        picks = []
        for lo, sizes in _rounds([list(s) for s in self.split], first, last):
            if lo >= we or lo + sum(sizes) <= ws:
                continue
            pick = _round_pick(order, lo, list(sizes), self.rank)
            if len(pick[0]) and ws <= int(pick[0].min()) < we:
                picks.append(pick)
        return _read_task(order, picks) if picks else None

    def rows(self, item: dict) -> list[dict]:
        """The Ray Data ``flat_map`` of one window: its task's rows, in consumption order."""
        task = self.task(self.order(), int(item["window"]))
        return _rows(read_window(task)) if task else []


def read_window(task: dict) -> dict:
    """One read task: whole row-group reads of the needed chunks, then the picked rows in order."""
    chunks = [read_rows({"url": u, "start": a, "stop": b})
              for u, a, b in zip(task["urls"], task["starts"], task["stops"])]
    rows = {c: [chunks[j][c][o] for j, o in zip(task["chunk"], task["offset"])] for c in READ_COLUMNS}
    return {**rows, "copy": task["copy"]}


def read_rows(task: dict) -> dict:
    """One read task: rows [start, stop) of one shard (only the row groups that hold them)."""
    import fsspec
    import pyarrow.parquet as pq

    fs, path = fsspec.core.url_to_fs(task["url"])
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        validate(pf.schema_arrow, CAPFILT, where=task["url"])
        groups, first, seen = [], None, 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if seen + n > task["start"] and seen < task["stop"]:
                groups.append(g)
                first = seen if first is None else first
            seen += n
        table = pf.read_row_groups(groups, columns=list(READ_COLUMNS)) if groups else None
    if table is None:
        table = CAPFILT.schema.empty_table().select(list(READ_COLUMNS))
    else:
        table = table.slice(task["start"] - first, task["stop"] - task["start"])
    return {c: table.column(c).to_pylist() for c in READ_COLUMNS}


@dataclass(frozen=True)
class IngestSpec:
    """What a rank reads (picklable): the ingest section, the shard set the driver listed once,
    the seed and the model's input resolution (``model.image_size``)."""
    cfg: IngestConfig
    shards: tuple[ShardRows, ...]
    seed: int
    image_size: int

    @property
    def by_source(self) -> bool:
        """The shards were listed with their sources: the order is weighted, its mix countable."""
        return any(s.sources for s in self.shards)

    def order(self, epoch: int) -> EpochOrder:
        return EpochOrder(self.shards, self.seed, epoch, self.cfg.shuffle_window, weights=self.cfg.source_weights,
                          each_caption=self.cfg.human_captions == "each")

    def epoch_stop(self, order: EpochOrder, global_batch: int) -> int:
        """Positions of ``order`` the epoch consumes: whole global batches (at least one)."""
        stop = steps_per_epoch(order, global_batch) * global_batch
        if stop == 0:
            raise ValueError(f"{order.total} samples cannot fill one global batch of {global_batch}"
                             + (f" (epoch {order.epoch}, weighted by source)" if order.weighted else ""))
        return stop


def build_epoch_dataset(spec: IngestSpec, epoch: int, rank: int, split: list[list[int]], start: int = 0,
                        order: EpochOrder | None = None):
    """Rank ``rank``'s Ray Dataset for ``epoch`` from global position ``start`` to the epoch's end,
    each step cut as ``split`` (:func:`step_split`) says; one read task per window (:class:`RankPlan`)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # the consumption order is the resume contract
    ctx.enable_progress_bars = False
    order = order or spec.order(epoch)
    plan = RankPlan(spec, epoch, rank, tuple(map(tuple, split)), start, spec.epoch_stop(order, step_samples(split)))
    windows = plan.windows(order)
    if not windows:
        return None
    cfg = spec.cfg
    augment = Augment(spec.seed, epoch, spec.image_size, cfg.min_scale, cfg.max_words, cfg.hflip, cfg.caption_pick,
                      cfg.human_captions)
    blocks = min(len(windows), MAX_READ_BLOCKS)
    ds = ray.data.from_items([{"window": w} for w in windows], override_num_blocks=blocks)
    ds = ds.flat_map(plan.rows, num_cpus=cfg.cpus_per_task)
    return ds.map_batches(augment, batch_size=cfg.map_batch_size, batch_format="numpy",
                          num_cpus=cfg.cpus_per_task)


def _rows(cols: dict) -> list[dict]:
    return [dict(zip(cols, vals)) for vals in zip(*cols.values())]


def collate(batch: dict) -> dict:
    """numpy batch → ``pixel_values`` FloatTensor [B,3,H,W]; ``text``/``key`` lists; ``replaced`` int."""
    import torch

    return {"pixel_values": torch.from_numpy(np.array(batch["pixel_values"], dtype=np.float32)),
            "text": [str(t) for t in batch["text"]], "key": [str(k) for k in batch["key"]],
            "replaced": int(np.asarray(batch["replaced"]).sum())}


def _cut(rows: Iterator[dict], sizes: Iterator[int]) -> Iterator[dict]:
    """Re-chunk a stream of numpy batches into batches of the given sizes, in order."""
    buf: dict[str, list] = {}
    have = 0
    for n in sizes:
        while have < n:
            try:
                block = next(rows)
            except StopIteration:
                return
            for k, v in block.items():
                buf.setdefault(k, []).extend(list(v))
            have += len(block["key"])
        yield collate({k: v[:n] for k, v in buf.items()})
        buf = {k: v[n:] for k, v in buf.items()}
        have -= n


def iter_epoch(spec: IngestSpec, epoch: int, rank: int, split: list[list[int]], start: int = 0,
               order: EpochOrder | None = None) -> Iterator[dict]:
    """Rank ``rank``'s micro-batches of ``epoch`` from global position ``start`` (a step boundary):
    per step, one batch per accumulation round, sized by ``split`` (:func:`step_split`).
    ``order``: the epoch's order when the caller has it already."""
    order = order or spec.order(epoch)
    ds = build_epoch_dataset(spec, epoch, rank, split, start, order)
    if ds is None:
        return iter(())
    g = step_samples(split)
    steps = spec.epoch_stop(order, g) // g - start // g
    sizes = (split[i][rank] for _ in range(steps) for i in range(len(split)))
    return _cut(iter(ds.iter_batches(batch_size=spec.cfg.map_batch_size, batch_format="numpy")), sizes)
