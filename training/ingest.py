"""Training ingest: CapFilt shards → augmented, fixed-size per-worker batches (Ray Data).

Why each worker builds its own pipeline per epoch instead of one ``streaming_split``:
exact mid-epoch resume needs to know *which* samples a rank has consumed. Ray Data's
streaming split hands blocks to whichever worker asks first, so the rank ↔ sample mapping
changes from run to run. Here the mapping is a pure function of (seed, epoch, world size):

  1. the epoch's shard order is a permutation of the committed shards seeded by seed+epoch;
  2. the concatenated rows form the epoch stream; it is cut into ``world`` contiguous,
     equal slices of whole micro-batches (the tail that does not fill one batch per rank
     is dropped, like ``drop_last``);
  3. rank r reads only its slice, from ``skip`` rows on (the resume position), as Ray Data
     read tasks over row ranges of the Parquet files (streaming, order preserved);
  4. decode + random resized crop + flip + normalise + caption clean-up + caption draw run
     in CPU ``map_batches`` tasks, randomness seeded by (seed, epoch, key) so a resumed run
     replays exactly the same pixels and captions.

A sample whose image does not decode is replaced by another valid sample of the same map
batch (and counted in ``replaced``), so batches never shrink and collectives never hang.
"""
from __future__ import annotations

import hashlib
import io
import random
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from PIL import Image

from pipelines.schema import CAPFILT, validate
from pipelines.shardio import ShardSet
from training.text import pre_caption

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
READ_CHUNK_ROWS = 256          # rows per Ray Data read task (one Parquet row group)


# -- pure per-sample transforms --------------------------------------------------------------
def sample_rng(seed: int, epoch: int, key: str) -> random.Random:
    """The per-sample RNG: same (seed, epoch, key), same crop, flip and caption choice."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{key}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


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
    # fall back to a centre crop (as torchvision does)
    side = min(w, h)
    x, y = (w - side) // 2, (h - side) // 2
    return img.resize((size, size), Image.BICUBIC, box=(x, y, x + side, y + side))


def augment_image(data: bytes, rng: random.Random, size: int, min_scale: float, hflip: bool = True) -> np.ndarray:
    """JPEG/PNG bytes → float32 [3, size, size], CLIP-normalised. Raises on undecodable bytes."""
    with Image.open(io.BytesIO(data)) as im:
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
    """
    seed: int
    epoch: int
    image_size: int
    min_scale: float
    max_words: int
    hflip: bool = True
    caption_pick: str = "random"   # random | first

    def __call__(self, batch: dict) -> dict:
        keys = [str(k) for k in batch["key"]]
        pixels: list[np.ndarray | None] = []
        texts, ok = [], []
        for key, image, captions in zip(keys, batch["image"], batch["captions"]):
            rng = sample_rng(self.seed, self.epoch, key)
            caps = [c for c in list(captions) if c] or [""]
            pick = rng.randrange(len(caps))  # drawn either way, so both modes replay the same pixels
            texts.append(pre_caption(caps[pick if self.caption_pick == "random" else 0], self.max_words))
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


# -- the epoch plan: which rows each rank reads -------------------------------------------------
@dataclass(frozen=True)
class ShardRows:
    url: str
    rows: int


def list_shards(uri: str) -> list[ShardRows]:
    """Committed CapFilt shards of ``uri`` with their row counts (schema checked once)."""
    shards = ShardSet(uri)
    shards.check_schema(CAPFILT)
    return [ShardRows(shards.url(n), shards.shard_info(n).rows) for n in shards.committed()]


def epoch_shard_order(shards: list[ShardRows], seed: int, epoch: int) -> list[ShardRows]:
    order = list(shards)
    random.Random(f"shards/{seed}/{epoch}").shuffle(order)
    return order


def batches_per_epoch(shards: list[ShardRows], world: int, batch_size: int) -> int:
    """Micro-batches every rank gets per epoch (equal on all ranks, drop_last)."""
    return sum(s.rows for s in shards) // (world * batch_size)


def rank_read_tasks(order: list[ShardRows], rank: int, world: int, batch_size: int, skip: int,
                    chunk: int = READ_CHUNK_ROWS) -> list[dict]:
    """Row ranges ``{url, start, stop}`` of rank ``rank``'s slice of the epoch stream, from ``skip`` on."""
    per_rank = batches_per_epoch(order, world, batch_size) * batch_size
    lo, hi = rank * per_rank + skip, (rank + 1) * per_rank
    tasks, offset = [], 0
    for shard in order:
        a, b = max(lo, offset), min(hi, offset + shard.rows)
        for start in range(a - offset, b - offset, chunk):  # empty when the shard is outside
            tasks.append({"url": shard.url, "start": start, "stop": min(start + chunk, b - offset)})
        offset += shard.rows
    return tasks


def read_rows(task: dict) -> dict:
    """One read task: rows [start, stop) of one shard (only the row groups that hold them)."""
    import fsspec
    import pyarrow as pa
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
        table = pf.read_row_groups(groups, columns=["key", "image", "captions"]) if groups else None
    if table is None:
        table = pa.table({"key": pa.array([], pa.string()), "image": pa.array([], pa.binary()),
                          "captions": pa.array([], pa.list_(pa.string()))})
    else:
        table = table.slice(task["start"] - first, task["stop"] - task["start"])
    return {c: table.column(c).to_pylist() for c in ("key", "image", "captions")}


@dataclass(frozen=True)
class IngestSpec:
    """Everything a worker needs to build its epoch pipeline (picklable)."""
    shards: tuple[ShardRows, ...]
    seed: int
    batch_size: int
    image_size: int
    min_scale: float
    max_words: int
    hflip: bool = True
    caption_pick: str = "random"
    map_batch_size: int = 32
    ingest_cpus: float = 1.0
    shuffle_buffer: int = 0


def build_epoch_dataset(spec: IngestSpec, epoch: int, rank: int, world: int, skip: int = 0):
    """Rank ``rank``'s Ray Dataset for ``epoch`` starting ``skip`` rows into its slice."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # the slice order is the resume contract
    ctx.enable_progress_bars = False
    order = epoch_shard_order(list(spec.shards), spec.seed, epoch)
    tasks = rank_read_tasks(order, rank, world, spec.batch_size, skip)
    if not tasks:
        return None
    augment = Augment(spec.seed, epoch, spec.image_size, spec.min_scale, spec.max_words, spec.hflip,
                      spec.caption_pick)
    ds = ray.data.from_items(tasks, override_num_blocks=len(tasks))
    ds = ds.flat_map(lambda t: _rows(read_rows(t)), num_cpus=spec.ingest_cpus)
    return ds.map_batches(augment, batch_size=spec.map_batch_size, batch_format="numpy",
                          num_cpus=spec.ingest_cpus)


def _rows(cols: dict) -> list[dict]:
    return [dict(zip(cols, vals)) for vals in zip(*cols.values())]


def collate(batch: dict) -> dict:
    """numpy batch → ``pixel_values`` FloatTensor [B,3,H,W]; ``text``/``key`` lists; ``replaced`` int."""
    import torch

    return {"pixel_values": torch.from_numpy(np.array(batch["pixel_values"], dtype=np.float32)),
            "text": [str(t) for t in batch["text"]], "key": [str(k) for k in batch["key"]],
            "replaced": int(np.asarray(batch["replaced"]).sum())}


def _collate_fn():
    from ray.data.collate_fn import NumpyBatchCollateFn

    class Collate(NumpyBatchCollateFn):
        def __call__(self, batch):
            return collate(batch)

    return Collate()


def iter_epoch(spec: IngestSpec, epoch: int, rank: int, world: int, skip: int = 0) -> Iterator[dict]:
    """Fixed-size batches of ``spec.batch_size`` (drop_last) for one rank and epoch."""
    ds = build_epoch_dataset(spec, epoch, rank, world, skip)
    if ds is None:
        return iter(())
    shuffle = {}
    if spec.shuffle_buffer:  # seeded, so a fresh run replays it (see the resume note in loop.py)
        shuffle = {"local_shuffle_buffer_size": spec.shuffle_buffer,
                   "local_shuffle_seed": spec.seed * 1000003 + epoch * 7919 + rank}
    return iter(ds.iter_torch_batches(batch_size=spec.batch_size, drop_last=True, collate_fn=_collate_fn(),
                                      **shuffle))
