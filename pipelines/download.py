"""The download job: URL lists → a plan → one Ray task per partition → download-contract shards.

    open and check the lists (driver)       pipelines.sources: schema errors before any work
    → plan (Ray tasks)                      pipelines.download_plan: partitions, duplicates, human captions
    → one task per pending partition        pipelines.download_worker: bounded fetches → shard i committed
      (a sliding window of tasks in flight; committed shards are skipped: resume)
    → per-shard stats merged → summary, `_manifest.json` last

Why plain Ray tasks and not a Ray Data map (or img2dataset's distributor): a web-scale job
must end whatever its input does, so the driver decides every retry. A task that dies
(out of memory, node lost) is run again at most ``download.task_retries`` times; then its
partition commits with ``task_failed`` rows. A task that outlives twice its partition's
bound is cancelled and counts as one such death. (Ray Data retries a dying map task
without end, and drops a block that exhausts ``max_errored_blocks``.)
"""
from __future__ import annotations

import collections
import dataclasses
import json
import time
from dataclasses import dataclass

import pyarrow as pa

from pipelines.config import DownloadConfig
from pipelines.download_plan import (KeyIndex, Partition, Plan, Unit, load_plan, make_plan, plan_data_present,
                                     plan_identity, read_plan, remove_plan_data, row_id, rows_path)
from pipelines.download_worker import PartitionDownloader, PartitionStats, empty_row, partition_seconds, to_table
from pipelines.schema import DOWNLOAD, DOWNLOAD_STATUSES
from pipelines.shardio import ShardSet, shard_name
from pipelines.sources import UrlLists, open_url_lists

STATS_DIR = "_download_stats"
BACKSTOP_GRACE_S = 120.0
TOP_HOSTS = 5               # hosts named per outcome in the summary
MAX_TRACKED_HOSTS = 10_000  # the driver's host counters are pruned to stay flat


# -- one partition ------------------------------------------------------------------------------
def partition_rows(part: Partition, unit: Unit, plan_rows: pa.Table, marks: pa.Table, keys: KeyIndex) -> list[dict]:
    """The partition's rows with their keys, and the plan's verdict on repeated URLs applied."""
    by_id = {m["id"]: m for m in marks.to_pylist()}
    base = row_id(unit.index, 0)
    rows = []
    for r in plan_rows.to_pylist():
        row = {"key": f"{unit.source}/{unit.key_offset + r['row']}", "source": unit.source, "policy": unit.policy,
               "url": r["url"], "caption": r["caption"], "captions": r["captions"], "duplicate_of": None,
               "meta": r["meta"], "status": r["status"], "error": r["error"]}
        mark = by_id.get(base | r["row"])
        if mark is not None and mark["kind"] == "owner":
            row["captions"] = mark["captions"]
        elif mark is not None:
            owner = keys.key(mark["owner"])
            row.update(duplicate_of=owner, status=mark["kind"],
                       error=f"duplicate of {owner}" if mark["kind"] == "duplicate" else f"caption kept with {owner}")
        rows.append(row)
    if len(rows) != part.rows:  # never commit part of a partition as its shard: rows would vanish
        raise RuntimeError(f"shard {part.index}: the plan holds {len(rows)} of its {part.rows} rows")
    return rows


def _commit(shards: ShardSet, part: Partition, rows: list[dict], stats: PartitionStats) -> dict:
    table = to_table(rows)
    stats.count(table)
    shards.makedirs(STATS_DIR)
    shards.fs.pipe(shards.path(f"{STATS_DIR}/{shard_name(part.index)}.json"), json.dumps(stats.to_dict()).encode())
    shards.write_shard(part.index, table, DOWNLOAD)
    return {"index": part.index, "rows": table.num_rows, "ok": stats.images.total()}


_DOWNLOADER: list = []   # (cfg, PartitionDownloader) of this worker process, reused across its tasks


def _downloader(cfg: DownloadConfig) -> PartitionDownloader:
    if not _DOWNLOADER or _DOWNLOADER[0] != cfg:
        _DOWNLOADER[:] = [cfg, PartitionDownloader(cfg)]
    return _DOWNLOADER[1]


def download_partition(part: Partition, unit: Unit, marks: pa.Table, keys: KeyIndex, cfg: DownloadConfig,
                       output: str) -> dict:
    """Ray task: download one partition and commit its shard; returns a small stats row."""
    shards = ShardSet(output)
    plan_rows = shards.read_table(rows_path(unit.index, part.part))
    rows = partition_rows(part, unit, plan_rows, marks, keys)
    stats = PartitionStats()
    return _commit(shards, part, _downloader(cfg).download(rows, stats), stats)


def commit_failed(shards: ShardSet, part: Partition, unit: Unit, marks: pa.Table, keys: KeyIndex, why: str) -> dict:
    """The shard of a partition whose task kept dying: rows it would have fetched are task_failed."""
    rows = partition_rows(part, unit, shards.read_table(rows_path(unit.index, part.part)), marks, keys)
    out = [empty_row(r, r["status"], r["error"]) if r["status"] else empty_row(r, "task_failed", why) for r in rows]
    return _commit(shards, part, out, PartitionStats())


# -- the driver ---------------------------------------------------------------------------------
def _plan(lists: UrlLists, cfg: DownloadConfig, shards: ShardSet, log) -> Plan:
    """The stored plan when it matches this input and is still usable, else a new one."""
    identity = plan_identity(lists, cfg)
    doc = read_plan(shards)
    if doc is None and shards.fs.exists(shards.path("_download_plan.json")):
        raise ValueError(f"{shards.uri} was written by an older version of blip2 download; use a new output")
    if doc is not None:
        stored = {k: doc.get(k) for k in identity}
        if stored != identity:
            raise ValueError(f"{shards.uri} was written from a different input or rows_per_shard "
                             f"({stored} != {identity}); resume needs the same plan — use a new output")
        plan = load_plan(doc, shards.uri)
        if len(shards.committed()) >= plan.shards or plan_data_present(shards, plan):
            return plan
        log("download: the stored plan's rows were removed after completion; planning again")
    elif shards.committed():
        raise ValueError(f"{shards.uri} holds shards but no download plan; use a new output")
    return make_plan(lists, cfg, shards, log)


@dataclass
class _Attempt:
    part: Partition
    marks: pa.Table
    attempt: int
    started: float


def _window(cfg: DownloadConfig) -> int:
    """Tasks in flight: 2 per CPU slot of the cluster as it is now (it may grow), or the config's."""
    import ray

    if cfg.concurrency:
        return cfg.concurrency
    return max(2, 2 * int(ray.cluster_resources().get("CPU", 1) / cfg.task_cpus))


def run_partitions(plan: Plan, cfg: DownloadConfig, shards: ShardSet, progress: bool, log) -> dict:
    """Run every uncommitted partition; returns this run's counters."""
    import ray
    from tqdm import tqdm

    done = shards.committed_indices()
    log(f"download: {plan.shards} shards, {len(done)} already committed, {plan.shards - len(done)} to run")
    todo = (p for p in plan.partitions() if p.index not in done)
    keys = plan.keys()
    keys_ref = ray.put(keys)
    task = ray.remote(download_partition)
    queued: collections.deque = collections.deque()
    in_flight: dict = {}
    run = {"rows": 0, "ok": 0, "failed_partitions": 0, "task_deaths": 0,
           "resumed": sum(p.rows for p in plan.partitions() if p.index in done)}
    bar = tqdm(total=plan.rows, initial=run["resumed"], unit="rows", desc="download", disable=not progress,
               mininterval=1.0)

    def refill() -> None:
        wave = [p for _, p in zip(range(cfg.partitions_per_wave), todo)]
        marks = plan.marks(wave)
        queued.extend((p, marks[p.index]) for p in wave)

    def submit(part: Partition, marks: pa.Table, attempt: int) -> None:
        ref = task.options(num_cpus=cfg.task_cpus, max_retries=0, name=f"download-{shard_name(part.index)}").remote(
            part, plan.units[part.unit], marks, keys_ref, cfg, shards.uri)
        in_flight[ref] = _Attempt(part, marks, attempt, time.monotonic())

    while True:
        window = _window(cfg)
        while len(in_flight) < window:
            if not queued:
                refill()
            if not queued:
                break
            submit(*queued.popleft(), attempt=0)
        if not in_flight:
            break
        ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=1.0)
        for ref in ready:
            a = in_flight.pop(ref)
            try:
                stats = ray.get(ref)
            except (ray.exceptions.RayError, RuntimeError) as e:
                run["task_deaths"] += 1
                if a.attempt < cfg.task_retries:
                    log(f"download: shard {a.part.index} failed ({type(e).__name__}); retry {a.attempt + 1} of "
                        f"{cfg.task_retries}")
                    submit(a.part, a.marks, a.attempt + 1)
                    continue
                why = f"the download task died {a.attempt + 1} times ({type(e).__name__})"
                stats = commit_failed(shards, a.part, plan.units[a.part.unit], a.marks, keys, why)
                run["failed_partitions"] += 1
                log(f"download: shard {a.part.index} committed as task_failed: {why}")
            run["rows"] += stats["rows"]
            run["ok"] += stats["ok"]
            bar.update(stats["rows"])
        now = time.monotonic()
        for ref, a in list(in_flight.items()):
            if now - a.started > 2 * partition_seconds(cfg, a.part.rows) + BACKSTOP_GRACE_S:
                ray.cancel(ref, force=True)  # ray.get then raises TaskCancelledError: one death
    bar.close()
    return run


class SetCounts:
    """The whole set's counters, summed from the per-shard stats (host counters pruned to stay bounded)."""

    def __init__(self):
        self.rows = self.shards = 0
        self.by_status = dict.fromkeys(DOWNLOAD_STATUSES, 0)
        self.by_source: dict[str, dict[str, int]] = {}
        self.images, self.captions, self.kinds = collections.Counter(), collections.Counter(), collections.Counter()
        self.hosts: dict[str, collections.Counter] = {}

    def add(self, rows: int, s: dict) -> None:
        self.rows += rows
        self.shards += 1
        for source, counts in s["by_source"].items():
            per = self.by_source.setdefault(source, {})
            for status, n in counts.items():
                per[status] = per.get(status, 0) + n
                self.by_status[status] = self.by_status.get(status, 0) + n
        self.images.update(s["images"])
        self.captions.update(s["captions"])
        self.kinds.update(s["blocked_kinds"])
        for status, per_host in s["hosts"].items():
            c = self.hosts.setdefault(status, collections.Counter())
            c.update(per_host)
            if len(c) > MAX_TRACKED_HOSTS:
                self.hosts[status] = collections.Counter(dict(c.most_common(MAX_TRACKED_HOSTS // 2)))

    def to_dict(self) -> dict:
        return {"rows": self.rows, "shards": self.shards, "by_status": self.by_status, "by_source": self.by_source,
                "images": dict(self.images), "captions": dict(self.captions), "blocked_by_class": dict(self.kinds),
                "hosts": {s: {"rows": sum(c.values()), "hosts": len(c), "top": dict(c.most_common(TOP_HOSTS))}
                          for s, c in self.hosts.items()}}


def count_output(shards: ShardSet) -> dict:
    """Counters of every committed shard, read many at a time, a bounded batch in memory."""
    def read(name: str) -> tuple[int, dict]:
        return shards.shard_info(name).rows, json.loads(shards.fs.cat(shards.path(f"{STATS_DIR}/{name}.json")))

    counts, committed = SetCounts(), shards.committed()
    for start in range(0, len(committed), 4096):
        for rows, stats in shards.map_members(read, committed[start:start + 4096]):
            counts.add(rows, stats)
    return counts.to_dict()


def run_download(cfg: DownloadConfig, seed: int = 0, progress: bool = True, lists: UrlLists | None = None,
                 plan_only: bool = False, log=print) -> dict:
    """Download every URL of ``cfg.input`` into the shard set ``cfg.output``; returns the summary.

    Needs Ray initialised (the command calls ``ensure_ray``). Re-running after any crash
    finishes the job: committed shards are skipped and every input row ends up in exactly
    one shard row. ``seed`` is recorded only (the job has no randomness).
    """
    start = time.time()
    if lists is None:
        lists = open_url_lists(cfg.input, cfg.source, cfg.url_prefix, cfg.policy)  # raises on bad input
    shards = ShardSet(cfg.output)
    shards.check_writable()
    plan = _plan(lists, cfg, shards, log)
    files = {u.path: {"rows": u.rows, "blank_lines": u.blank_lines, **u.statuses} for u in plan.units}
    if plan_only:
        return {"plan_only": True, "input_rows": plan.rows, "shards": plan.shards, "duplicates": plan.duplicates,
                "merged": plan.merged, "files": files, "elapsed_s": round(time.time() - start, 3)}
    run = run_partitions(plan, cfg, shards, progress, log)
    elapsed = time.time() - start
    shards.fs.invalidate_cache()  # s3fs caches listings: the tasks committed shards behind our back
    counts = count_output(shards)
    statuses = sum(counts["by_status"].values())
    complete = counts["rows"] == plan.rows == statuses and counts["shards"] == plan.shards
    summary = {
        "input_rows": plan.rows, "output_rows": counts["rows"], "status_rows": statuses, "complete": complete,
        "shards": counts["shards"], "planned_shards": plan.shards,
        "resumed_rows": run["resumed"],
        "this_run_rows": run["rows"], "this_run_ok": run["ok"],
        "failed_partitions": run["failed_partitions"], "task_deaths": run["task_deaths"],
        "elapsed_s": round(elapsed, 3),
        "images_per_s": round(run["ok"] / elapsed, 2) if elapsed > 0 else 0.0,
        "rows_per_s": round(run["rows"] / elapsed, 2) if elapsed > 0 else 0.0,
        "by_status": counts["by_status"], "by_source": counts["by_source"],
        "images": counts["images"], "captions": counts["captions"],
        "blocked_by_class": counts["blocked_by_class"], "hosts": counts["hosts"],
        "files": files, "seed": seed,
    }
    shards.write_manifest(DOWNLOAD, config=dataclasses.asdict(cfg), summary=summary)
    if complete:
        remove_plan_data(shards)
    return summary


def format_summary(summary: dict, output: str) -> str:
    """The one-screen summary the command prints."""
    if summary.get("plan_only"):
        lines = [f"download plan → {output}",
                 f"  rows: {summary['input_rows']} in {len(summary['files'])} files → {summary['shards']} shards",
                 f"  duplicate URLs {summary['duplicates']}, human captions merged {summary['merged']}"]
        lines += [f"  {path}: {', '.join(f'{k} {v}' for k, v in counts.items() if v)}"
                  for path, counts in summary["files"].items()]
        return "\n".join(lines)
    s = summary
    proof = "= Σ statuses" if s["status_rows"] == s["output_rows"] else f"!= Σ statuses {s['status_rows']}"
    lines = [f"download → {output}",
             f"  rows: {s['input_rows']} in input, {s['output_rows']} in output {proof} "
             f"({'complete' if s['complete'] else 'INCOMPLETE: input rows != output rows'});"
             f" this run {s['this_run_rows']}, resumed {s['resumed_rows']}",
             f"  time: {s['elapsed_s']:.1f}s   {s['images_per_s']:.1f} images/s   {s['rows_per_s']:.1f} rows/s (this run)"]
    for policy, n in sorted(s["images"].items()):
        lines.append(f"  {policy} images: {n} with {s['captions'].get(policy, 0)} captions")
    lines.append("  status:")
    total = max(s["output_rows"], 1)
    for status, n in s["by_status"].items():
        if n:
            lines.append(f"    {status:<15}{n:>10}  {100 * n / total:5.1f}%")
    if s["blocked_by_class"]:
        lines.append("  blocked by class: " + ", ".join(f"{k} {v}" for k, v in sorted(s["blocked_by_class"].items())))
    for status, h in sorted(s["hosts"].items()):
        if status in ("rate_limited", "opted_out", "timeout", "too_large", "http_error", "network_error"):
            top = ", ".join(f"{host} {n}" for host, n in h["top"].items())
            lines.append(f"  {status}: {h['rows']} rows from {h['hosts']} hosts (top: {top})")
    lines.append("  per source:")
    for source, counts in sorted(s["by_source"].items()):
        n = sum(counts.values())
        detail = ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
        lines.append(f"    {source:<10}{n:>10}  ({detail})")
    for path, counts in s["files"].items():
        extra = {k: v for k, v in counts.items() if k in ("malformed_row", "blank_lines") and v}
        if extra:
            lines.append(f"  {path}: " + ", ".join(f"{k} {v}" for k, v in extra.items()))
    if s["failed_partitions"]:
        lines.append(f"  {s['failed_partitions']} partitions committed as task_failed after "
                     f"{s['task_deaths']} task deaths")
    return "\n".join(lines)
