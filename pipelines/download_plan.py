"""The download plan: every input row placed in a partition, duplicates and human captions
resolved, all off the driver.

    input files ──► read task per file (parallel)        pipelines.sources.read_rows
        ├─ writes its partitions: _plan/rows/uUUUUU-pPPPPPP.parquet (rows_per_shard rows each)
        └─ hashes each valid URL (128-bit) into one of B buckets ─┐
    dedup task per bucket (parallel) ◄────────────────────────────┘
        └─ writes _plan/marks/bucket-BBBBB.parquet: for every repeated URL, which row owns it
    driver ── writes _plan/plan.json last (per file: rows, partitions, key and shard offsets)

The driver holds one small record per input file and object references while the tasks
run; rows, URLs and digests live in tasks, the object store and the plan folder.

A URL's **owner** is its first human-source row if it has any, else its first row (input
order). Other human rows of the URL are ``merged``: their captions join the owner's
``captions``, so an image is downloaded once and keeps every human caption; other web rows
are ``duplicate``. Rows refused while reading (malformed, invalid URL, bad caption) never
own a URL. Shard ``shard_offset(file) + p`` holds rows ``[p·R, (p+1)·R)`` of that file, and
key ``<source>/<i>`` numbers a source's rows across its files in input order, so the plan
is a pure function of the input and ``rows_per_shard``.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import asdict, dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.config import DownloadConfig
from pipelines.shardio import ShardSet
from pipelines.sources import Limits, ReadCounts, UrlFile, UrlLists, read_rows

PLAN_DIR = "_plan"
PLAN_FILE = f"{PLAN_DIR}/plan.json"
PLAN_VERSION = 1
ROWS_PER_BUCKET = 1 << 24      # URLs per dedup task: ~0.6 GB of digests and sort buffers
ROW_BITS = 40                  # a row id is (file index << ROW_BITS) | row within the file
MARK_ROW_GROUP = 1 << 16
BUCKET_SCHEMA = pa.schema([("d0", pa.uint64()), ("d1", pa.uint64()), ("id", pa.int64()), ("human", pa.bool_()),
                           ("captions", pa.list_(pa.string()))])
MARK_SCHEMA = pa.schema([("id", pa.int64()), ("kind", pa.string()), ("owner", pa.int64()),
                         ("captions", pa.list_(pa.string()))])


def row_id(unit: int, row: int) -> int:
    return (unit << ROW_BITS) | row


def rows_path(unit: int, part: int) -> str:
    return f"{PLAN_DIR}/rows/u{unit:05d}-p{part:06d}.parquet"


def marks_path(bucket: int) -> str:
    return f"{PLAN_DIR}/marks/bucket-{bucket:05d}.parquet"


def _pipe_parquet(shards: ShardSet, name: str, table: pa.Table, **kw) -> None:
    shards.makedirs(name.rsplit("/", 1)[0])
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", **kw)
    shards.fs.pipe(shards.path(name), buf.getvalue())


# -- tasks ------------------------------------------------------------------------------------
def plan_file(f: UrlFile, unit: int, human: bool, url_prefix: str, limits: Limits, rows_per_shard: int,
              buckets: int, output: str) -> list:
    """Read one input file: write its partitions, return [summary, bucket tables × ``buckets``]."""
    shards = ShardSet(output)
    counts = ReadCounts()
    pending: list[pa.Table] = []
    pending_rows, part = 0, 0
    d0s, d1s, ids, caps = [], [], [], []

    def flush(table: pa.Table) -> None:
        nonlocal part
        _pipe_parquet(shards, rows_path(unit, part), table)
        part += 1

    for batch in read_rows(f, url_prefix, limits, counts):
        valid = [i for i, s in enumerate(batch.column("status").to_pylist()) if s is None]
        urls = batch.column("url").to_pylist()
        rows = batch.column("row").to_pylist()
        batch_caps = batch.column("captions").to_pylist() if human else None
        for i in valid:
            digest = hashlib.blake2b(urls[i].encode("utf-8", "surrogatepass"), digest_size=16).digest()
            d0s.append(int.from_bytes(digest[:8], "little"))
            d1s.append(int.from_bytes(digest[8:], "little"))
            ids.append(row_id(unit, rows[i]))
            caps.append(batch_caps[i] if human else [])
        pending.append(batch)
        pending_rows += batch.num_rows
        while pending_rows >= rows_per_shard:
            merged = pa.concat_tables(pending)
            flush(merged.slice(0, rows_per_shard))
            rest = merged.slice(rows_per_shard)
            pending, pending_rows = [rest], rest.num_rows
    if pending_rows:
        flush(pa.concat_tables(pending))

    d0 = np.array(d0s, np.uint64)
    table = pa.table({"d0": d0, "d1": np.array(d1s, np.uint64), "id": np.array(ids, np.int64),
                      "human": np.full(len(ids), human), "captions": pa.array(caps, pa.list_(pa.string()))},
                     schema=BUCKET_SCHEMA)
    which = (d0 % np.uint64(buckets)).astype(np.int64)
    parts = [table.filter(pa.array(which == b)) for b in range(buckets)]
    summary = {"rows": counts.rows, "partitions": part, "blank_lines": counts.blank_lines,
               "statuses": counts.statuses, "valid": len(ids)}
    return [summary, *parts]


def find_owners(table: pa.Table) -> pa.Table:
    """Marks (MARK_SCHEMA, sorted by id) for every row whose URL another row also has."""
    d0, d1 = table.column("d0").to_numpy(), table.column("d1").to_numpy()
    ids, human = table.column("id").to_numpy(), table.column("human").to_numpy(zero_copy_only=False)
    if len(ids) == 0:
        return MARK_SCHEMA.empty_table()
    order = np.lexsort((ids, d1, d0))
    d0, d1, ids, human = d0[order], d1[order], ids[order], human[order]
    start = np.r_[True, (d0[1:] != d0[:-1]) | (d1[1:] != d1[:-1])]
    group = np.cumsum(start) - 1
    firsts = np.flatnonzero(start)
    size = np.diff(np.r_[firsts, len(ids)])
    big = len(ids)
    first_human = np.minimum.reduceat(np.where(human, np.arange(len(ids)), big), firsts)
    owner_pos = np.where(first_human < big, first_human, firsts)
    repeated = size[group] > 1
    pos = np.flatnonzero(repeated & (np.arange(len(ids)) != owner_pos[group]))
    kinds = np.where(human[pos] & human[owner_pos[group[pos]]], "merged", "duplicate")
    marks = {"id": ids[pos].tolist(), "kind": kinds.tolist(), "owner": ids[owner_pos[group[pos]]].tolist(),
             "captions": [None] * len(pos)}
    merged_groups = np.unique(group[pos[kinds == "merged"]])
    if len(merged_groups):
        captions = table.column("captions").take(pa.array(order)).to_pylist()
        for g in merged_groups.tolist():
            members = range(firsts[g], firsts[g] + size[g])
            owner = owner_pos[g]
            merged = list(captions[owner]) + [c for p in members if p != owner and human[p] for c in captions[p]]
            marks["id"].append(int(ids[owner]))
            marks["kind"].append("owner")
            marks["owner"].append(int(ids[owner]))
            marks["captions"].append(merged)
    out = pa.table(marks, schema=MARK_SCHEMA)
    return out.take(pc.sort_indices(out, [("id", "ascending")]))


def dedup_bucket(bucket: int, output: str, *tables: pa.Table) -> dict:
    """Resolve one bucket of URLs; write its marks file (always, so a complete plan has B files)."""
    marks = find_owners(pa.concat_tables(tables) if tables else BUCKET_SCHEMA.empty_table())
    _pipe_parquet(ShardSet(output), marks_path(bucket), marks, row_group_size=MARK_ROW_GROUP)
    kinds = marks.column("kind").to_pylist()
    return {"duplicate": kinds.count("duplicate"), "merged": kinds.count("merged")}


# -- the plan -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Unit:
    """One input file's place in the plan."""
    index: int
    path: str
    source: str
    policy: str
    rows: int
    partitions: int
    key_offset: int       # key of its row r: <source>/<key_offset + r>
    shard_offset: int     # its partition p is shard shard_offset + p
    blank_lines: int
    statuses: dict        # rows refused while reading, by status


@dataclass(frozen=True)
class Partition:
    index: int            # shard index
    unit: int
    part: int
    rows: int


@dataclass
class Plan:
    output: str
    rows_per_shard: int
    buckets: int
    units: list[Unit]
    duplicates: int = 0
    merged: int = 0

    @property
    def rows(self) -> int:
        return sum(u.rows for u in self.units)

    @property
    def shards(self) -> int:
        return sum(u.partitions for u in self.units)

    def partitions(self) -> Iterator[Partition]:
        for u in self.units:
            for p in range(u.partitions):
                yield Partition(u.shard_offset + p, u.index, p, min(self.rows_per_shard, u.rows - p * self.rows_per_shard))

    def keys(self) -> "KeyIndex":
        return KeyIndex([(u.source, u.key_offset) for u in self.units])

    def marks(self, parts: list[Partition]) -> dict[int, pa.Table]:
        """The marks of ``parts`` (consecutive partitions), per shard index: one range read per bucket."""
        if not parts:
            return {}
        shards = ShardSet(self.output)
        lo = row_id(parts[0].unit, parts[0].part * self.rows_per_shard)
        hi = row_id(parts[-1].unit, parts[-1].part * self.rows_per_shard + parts[-1].rows)
        tables = []
        for b in range(self.buckets):
            tables.append(pq.read_table(shards.path(marks_path(b)), filesystem=shards.fs,
                                        filters=[("id", ">=", lo), ("id", "<", hi)], schema=MARK_SCHEMA))
        marks = pa.concat_tables(tables)
        ids = marks.column("id").to_numpy()
        unit = ids >> ROW_BITS
        part = (ids & ((1 << ROW_BITS) - 1)) // self.rows_per_shard
        out = {}
        for p in parts:
            sel = np.flatnonzero((unit == p.unit) & (part == p.part))
            out[p.index] = marks.take(pa.array(sel, pa.int64()))
        return out

    def to_json(self) -> dict:
        return {"version": PLAN_VERSION, "rows_per_shard": self.rows_per_shard, "buckets": self.buckets,
                "duplicates": self.duplicates, "merged": self.merged, "units": [asdict(u) for u in self.units]}


class KeyIndex:
    """Row id → key, for every input file (small: one entry per file)."""

    def __init__(self, units: list[tuple[str, int]]):
        self.units = units

    def key(self, rid: int) -> str:
        source, offset = self.units[rid >> ROW_BITS]
        return f"{source}/{offset + (rid & ((1 << ROW_BITS) - 1))}"


def plan_identity(lists: UrlLists, cfg: DownloadConfig) -> dict:
    """What a plan is a function of: a resume under a different identity is refused."""
    return {"rows_per_shard": cfg.rows_per_shard, "inputs": lists.fingerprint(), "url_prefix": cfg.url_prefix,
            "limits": asdict(Limits(cfg.max_url_bytes, cfg.max_caption_bytes))}


def read_plan(shards: ShardSet) -> dict | None:
    path = shards.path(PLAN_FILE)
    return json.loads(shards.fs.cat(path)) if shards.fs.exists(path) else None


def load_plan(doc: dict, output: str) -> Plan:
    return Plan(output, doc["rows_per_shard"], doc["buckets"], [Unit(**u) for u in doc["units"]],
                doc.get("duplicates", 0), doc.get("merged", 0))


def _estimated_rows(lists: UrlLists) -> int:
    """Rows to size the buckets by: exact for parquet (footer), from the size for text files."""
    import fsspec

    total = 0
    for f in lists.files:
        fs, path = fsspec.core.url_to_fs(f.path)
        if path.lower().endswith(".parquet"):
            total += pq.ParquetFile(fs.open(path, "rb")).metadata.num_rows
        else:
            total += fs.size(path) // 40 + 1
    return total


def make_plan(lists: UrlLists, cfg: DownloadConfig, shards: ShardSet, log=print) -> Plan:
    """Run the planning tasks (Ray must be initialised) and write ``_plan/plan.json`` last."""
    import ray

    buckets = max(1, math.ceil(_estimated_rows(lists) / ROWS_PER_BUCKET))
    limits = Limits(cfg.max_url_bytes, cfg.max_caption_bytes)
    read = ray.remote(plan_file).options(num_returns=1 + buckets, num_cpus=1, max_retries=cfg.task_retries)
    outs = [read.remote(f, u, lists.policy_of(f) == "human", lists.url_prefix, limits, cfg.rows_per_shard, buckets,
                        shards.uri) for u, f in enumerate(lists.files)]
    dedup = ray.remote(dedup_bucket).options(num_cpus=1, max_retries=cfg.task_retries)
    marks = [dedup.remote(b, shards.uri, *[o[1 + b] for o in outs]) for b in range(buckets)]
    summaries = ray.get([o[0] for o in outs])
    del outs
    counts = ray.get(marks)
    units, key_offsets, shard_offset = [], {}, 0
    for u, (f, s) in enumerate(zip(lists.files, summaries)):
        name = f.source.name
        units.append(Unit(u, f.path, name, lists.policy_of(f), s["rows"], s["partitions"], key_offsets.get(name, 0),
                          shard_offset, s["blank_lines"], s["statuses"]))
        key_offsets[name] = key_offsets.get(name, 0) + s["rows"]
        shard_offset += s["partitions"]
    plan = Plan(shards.uri, cfg.rows_per_shard, buckets, units,
                sum(c["duplicate"] for c in counts), sum(c["merged"] for c in counts))
    shards.makedirs(PLAN_DIR)
    shards.fs.pipe(shards.path(PLAN_FILE), json.dumps({**plan_identity(lists, cfg), **plan.to_json()}, indent=1).encode())
    log(f"download: planned {plan.rows} rows from {len(units)} files into {plan.shards} shards "
        f"({plan.duplicates} duplicate URLs, {plan.merged} human captions merged, {buckets} dedup buckets)")
    return plan


def remove_plan_data(shards: ShardSet) -> None:
    """Drop the planned rows and marks once every shard is committed (plan.json stays)."""
    for sub in ("rows", "marks"):
        path = shards.path(f"{PLAN_DIR}/{sub}")
        if shards.fs.exists(path):
            shards.fs.rm(path, recursive=True)


def plan_data_present(shards: ShardSet, plan: Plan) -> bool:
    return all(shards.fs.exists(shards.path(marks_path(b))) for b in range(plan.buckets))
