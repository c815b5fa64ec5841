"""The download job: URL lists → Ray Data → img2dataset fetch/resize → download-contract shards.

    read the lists (driver, streaming)      pipelines.sources: checked before any work starts
    → fixed partitions of rows_per_shard    partition i = rows [i·R, (i+1)·R) in key order → shard i
    → mark duplicate URLs                   first occurrence downloads; later ones are `duplicate`
    → skip committed shards                 resume: a committed shard is never redone
    → Ray Data map_batches, one block per partition → pipelines.download_worker (one task each),
      in waves of partitions_per_wave partitions so downloads start before a huge list is read
    → shard committed atomically by the task; `_manifest.json` written last by the driver

Why Ray Data over img2dataset's own ``ray_distributor``: the latter submits one task per
shard for the whole list at once and reads img2dataset's own feather/parquet layout; a Ray
Data map gives backpressure, progress bars and task retries, and writes our contract
directly. ``benchmarks/download.py`` measures the two paths against raw img2dataset.

The partition plan (rows_per_shard + input files) is stored in ``_download_plan.json``;
resuming against a different plan is refused, since it would shift rows between shards.
"""
from __future__ import annotations

import dataclasses
import json
import time
from typing import Iterator

import numpy as np
import pyarrow as pa

from pipelines.config import DownloadConfig
from pipelines.download_dedup import DuplicateIndex
from pipelines.schema import DOWNLOAD, DOWNLOAD_STATUSES
from pipelines.shardio import ShardSet
from pipelines.sources import UrlLists, open_url_lists

PLAN = "_download_plan.json"
MARK_CHUNK_ROWS = 1 << 18  # rows marked for duplicates at a time (one sorted merge each)


def plan_partitions(lists: UrlLists, rows_per_shard: int) -> Iterator[tuple[int, pa.Table]]:
    """(index, table) of fixed-size partitions in key order, with ``duplicate_of``, ``partition``
    and ``partition_rows``.

    ``duplicate_of`` holds the key of an earlier row with the same URL (rows with a bad
    caption never count as an occurrence); see :class:`DuplicateIndex` for its memory cost.
    Rows are marked in chunks of ``MARK_CHUNK_ROWS``, then cut into partitions."""
    seen = DuplicateIndex()
    chunk: list[pa.Table] = []
    chunk_rows = 0
    pending: list[pa.Table] = []
    pending_rows, index = 0, 0

    def cut(table: pa.Table, i: int) -> pa.Table:
        # A compact copy: a slice would drag its whole chunk's buffers into the object store.
        table = table.take(np.arange(table.num_rows))
        n = table.num_rows  # carried along so a task can prove it holds the whole partition
        return (table.append_column("partition", pa.array([i] * n, pa.int64()))
                .append_column("partition_rows", pa.array([n] * n, pa.int64())))

    def marked_chunks() -> Iterator[pa.Table]:
        nonlocal chunk, chunk_rows
        for batch in lists.batches():
            chunk.append(batch)
            chunk_rows += batch.num_rows
            if chunk_rows >= MARK_CHUNK_ROWS:
                table = pa.concat_tables(chunk)
                chunk, chunk_rows = [], 0
                yield table.append_column("duplicate_of", seen.mark(table))
        if chunk_rows:
            table = pa.concat_tables(chunk)
            yield table.append_column("duplicate_of", seen.mark(table))

    for table in marked_chunks():
        pending.append(table)
        pending_rows += table.num_rows
        while pending_rows >= rows_per_shard:
            merged = pa.concat_tables(pending)
            yield index, cut(merged.slice(0, rows_per_shard), index)
            rest = merged.slice(rows_per_shard)
            pending, pending_rows, index = [rest], rest.num_rows, index + 1
    if pending_rows:
        yield index, cut(pa.concat_tables(pending), index)


def _check_plan(shards: ShardSet, lists: UrlLists, cfg: DownloadConfig) -> None:
    plan = {"rows_per_shard": cfg.rows_per_shard, "inputs": lists.fingerprint()}
    path = shards.path(PLAN)
    if shards.fs.exists(path):
        old = json.loads(shards.fs.cat(path))
        if old != plan:
            raise ValueError(f"{shards.uri} was written from a different input or rows_per_shard "
                             f"({old} != {plan}); resume needs the same plan — use a new output")
        return
    shards.fs.makedirs(shards.root, exist_ok=True)
    shards.fs.pipe(path, json.dumps(plan, indent=1).encode())


def count_output(shards: ShardSet) -> dict:
    """Counts per status and per source over every committed shard (reads two small columns)."""
    by_status = {s: 0 for s in DOWNLOAD_STATUSES}
    by_source: dict[str, dict[str, int]] = {}
    rows = 0
    for _, batch in shards.iter_batches(DOWNLOAD, columns=["source", "status"], batch_size=65536):
        counts = pa.Table.from_batches([batch]).group_by(["source", "status"]).aggregate([("status", "count")])
        for source, status, n in zip(*(counts.column(c).to_pylist() for c in ("source", "status", "status_count"))):
            by_status[status] = by_status.get(status, 0) + n
            by_source.setdefault(source, {})
            by_source[source][status] = by_source[source].get(status, 0) + n
            rows += n
    return {"rows": rows, "by_status": by_status, "by_source": by_source}


def run_download(cfg: DownloadConfig, seed: int = 0, progress: bool = True,
                 lists: UrlLists | None = None) -> dict:
    """Download every URL of ``cfg.input`` into the shard set ``cfg.output``; returns the summary.

    Needs Ray initialised (the command calls ``ensure_ray``). Re-running after any crash
    finishes the job: committed shards are skipped and every input row ends up in exactly
    one shard row. ``seed`` is recorded only (the job has no randomness).
    """
    import ray
    from ray.data import DataContext

    from pipelines.download_worker import download_partitions

    start = time.time()
    if lists is None:
        lists = open_url_lists(cfg.input, cfg.source, cfg.url_prefix)  # raises on missing columns
    shards = ShardSet(cfg.output)
    _check_plan(shards, lists, cfg)
    done = shards.committed_indices()

    DataContext.get_current().enable_progress_bars = progress
    input_rows = skipped_rows = run_rows = run_ok = 0
    wave: list = []

    def run_wave() -> None:
        """One Ray Data job over a bounded number of partitions (object store and driver stay flat)."""
        nonlocal run_rows, run_ok
        ds = ray.data.from_arrow_refs(wave).map_batches(
            download_partitions, batch_size=None, batch_format="pyarrow",
            fn_kwargs={"cfg": cfg, "output": shards.uri}, num_cpus=cfg.task_cpus,
            concurrency=cfg.concurrency)
        for stats in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            run_rows += sum(stats.column("rows").to_pylist())
            run_ok += sum(stats.column("ok").to_pylist())
        wave.clear()

    for index, part in plan_partitions(lists, cfg.rows_per_shard):
        input_rows += part.num_rows
        if index in done:
            skipped_rows += part.num_rows
            continue
        wave.append(ray.put(part))
        if len(wave) >= cfg.partitions_per_wave:
            run_wave()
    if wave:
        run_wave()
    elapsed = time.time() - start

    shards.fs.invalidate_cache()  # s3fs caches listings: the tasks committed shards behind our back
    counts = count_output(shards)
    summary = {
        "input_rows": input_rows,
        "output_rows": counts["rows"],
        "complete": counts["rows"] == input_rows,
        "resumed_rows": skipped_rows,
        "this_run_rows": run_rows,
        "this_run_ok": run_ok,
        "elapsed_s": round(elapsed, 3),
        "images_per_s": round(run_ok / elapsed, 2) if elapsed > 0 else 0.0,
        "rows_per_s": round(run_rows / elapsed, 2) if elapsed > 0 else 0.0,
        "by_status": counts["by_status"],
        "by_source": counts["by_source"],
        "malformed_input_rows": lists.malformed_rows,
        "seed": seed,
    }
    shards.write_manifest(DOWNLOAD, config=dataclasses.asdict(cfg), summary=summary)
    return summary


def format_summary(summary: dict, output: str) -> str:
    """The one-screen summary the command prints."""
    lines = [f"download → {output}",
             f"  rows: {summary['output_rows']} in output / {summary['input_rows']} in input"
             f" ({'complete' if summary['complete'] else 'INCOMPLETE'});"
             f" this run {summary['this_run_rows']}, resumed {summary['resumed_rows']}",
             f"  time: {summary['elapsed_s']:.1f}s   {summary['images_per_s']:.1f} images/s"
             f"   {summary['rows_per_s']:.1f} rows/s (this run)",
             "  status:"]
    total = max(summary["output_rows"], 1)
    for status, n in summary["by_status"].items():
        if n:
            lines.append(f"    {status:<15}{n:>10}  {100 * n / total:5.1f}%")
    lines.append("  per source:")
    for source, counts in sorted(summary["by_source"].items()):
        n = sum(counts.values())
        detail = ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
        lines.append(f"    {source:<10}{n:>10}  ({detail})")
    for path, n in summary.get("malformed_input_rows", {}).items():
        lines.append(f"  skipped {n} malformed input rows in {path}")
    return "\n".join(lines)
