"""One partition of the download job, run inside a Ray task: its rows → a committed shard.

Fetch threads take URLs from a :class:`HostQueue` (at most ``max_per_host`` fetches per host
in flight; a host that answered 429/503 is left alone for its ``Retry-After``) and hand
bodies to the task's main thread, which checks, resizes and encodes them
(``pipelines.images``). A semaphore bounds the bodies held at once to ``2 × threads``, each
at most ``max_bytes``. The partition itself has a wall-clock bound
(:func:`partition_seconds`); rows still unanswered then are ``timeout`` and the shard commits.
"""
from __future__ import annotations

import collections
import hashlib
import math
import queue
import threading
import time
from dataclasses import dataclass

import pyarrow as pa

from pipelines.config import DownloadConfig
from pipelines.fetch import Fetched, Fetcher, FetchLimits, host_of
from pipelines.images import ImageSpec, Rejected, store
from pipelines.netguard import Policy
from pipelines.schema import DOWNLOAD

RETRYABLE = ("timeout", "network_error")
HOST_STATS_TOP = 20     # hosts kept per status in a shard's stats


def per_url_seconds(cfg: DownloadConfig) -> float:
    """The longest one URL can take: every attempt at its deadline, every Retry-After waited."""
    attempts = 1 + cfg.retries + cfg.rate_limit_retries
    return attempts * cfg.deadline + cfg.rate_limit_retries * cfg.max_retry_after


def partition_seconds(cfg: DownloadConfig, fetches: int) -> float:
    """Wall-clock bound of one partition: its URLs at the per-URL bound, as parallel as the
    per-host cap allows when every URL is on one host (the worst case)."""
    if cfg.partition_timeout is not None:
        return cfg.partition_timeout
    lanes = max(1, min(cfg.threads, cfg.max_per_host))
    return math.ceil(max(fetches, 1) / lanes) * per_url_seconds(cfg) + 60.0


def empty_row(row: dict, status: str, error: str | None, **extra) -> dict:
    return {"key": row["key"], "source": row["source"], "policy": row["policy"], "url": row["url"],
            "caption": row["caption"], "captions": row["captions"] if status == "ok" else None,
            "duplicate_of": row.get("duplicate_of"), "meta": row.get("meta"), "image": None, "width": None, "height": None,
            "original_width": None, "original_height": None, "status": status, "error": error,
            "sha256": None, **extra}


@dataclass
class _Item:
    index: int
    url: str
    host: str
    attempts: int = 0          # retries used after timeouts / network errors / 5xx
    rate_attempts: int = 0     # retries used after 429 / 503


class HostQueue:
    """Hands out fetches so that no host has more than ``max_per_host`` in flight and a host
    that asked us to wait is left alone until then. Hosts take turns (round robin)."""

    def __init__(self, items: list[_Item], max_per_host: int):
        self.cap = max_per_host
        self.waiting: dict[str, collections.deque] = {}
        for item in items:
            self.waiting.setdefault(item.host, collections.deque()).append(item)
        self.turns = collections.deque(self.waiting)
        self.active: collections.Counter = collections.Counter()
        self.not_before: dict[str, float] = {}
        self.cond = threading.Condition()
        self.closed = False

    def take(self) -> _Item | None:
        """The next item to fetch; None when nothing is left to hand out (or the queue closed)."""
        with self.cond:
            while not self.closed and self.turns:
                now, wake = time.monotonic(), None
                for _ in range(len(self.turns)):
                    host = self.turns[0]
                    self.turns.rotate(-1)
                    later = self.not_before.get(host, 0.0)
                    if self.active[host] < self.cap and later <= now:
                        item = self.waiting[host].popleft()
                        if not self.waiting[host]:
                            del self.waiting[host]
                            self.turns.remove(host)
                        self.active[host] += 1
                        return item
                    if later > now:
                        wake = later if wake is None else min(wake, later)
                self.cond.wait(None if wake is None else wake - now)
            return None

    def done(self, item: _Item) -> None:
        with self.cond:
            self.active[item.host] -= 1
            self.cond.notify_all()

    def again(self, item: _Item, delay: float = 0.0) -> None:
        """Put ``item`` back; with a delay, its whole host waits (the server asked for it)."""
        with self.cond:
            self.active[item.host] -= 1
            if delay > 0:
                self.not_before[item.host] = max(self.not_before.get(item.host, 0.0), time.monotonic() + delay)
            if item.host not in self.waiting:
                self.waiting[item.host] = collections.deque()
                self.turns.append(item.host)
            self.waiting[item.host].appendleft(item)
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()


class PartitionDownloader:
    """Turns the rows of one partition (plan rows with their marks) into download-contract rows."""

    def __init__(self, cfg: DownloadConfig):
        import cv2

        cv2.setNumThreads(1)  # one task per CPU slot: OpenCV's own threads would oversubscribe it
        self.cfg = cfg
        self.fetcher = Fetcher(Policy(tuple(cfg.allow_hosts), cfg.max_redirects),
                               FetchLimits(cfg.timeout, cfg.deadline, cfg.max_bytes, cfg.user_agent_token))
        self.spec = ImageSpec(cfg.image_size, cfg.resize_mode, cfg.resize_only_if_bigger, cfg.encode_quality,
                              cfg.max_pixels, cfg.min_image_size)

    def _finish(self, row: dict, data: bytes, sha: str) -> dict:
        try:
            s = store(data, self.spec)
        except Rejected as r:
            return empty_row(row, r.status, str(r), sha256=sha)
        except Exception as e:  # noqa: BLE001 — one bad image never ends the partition
            return empty_row(row, "decode_error", f"{type(e).__name__}: {e}", sha256=sha)
        return {**empty_row(row, "ok", None, sha256=sha), "image": s.data, "width": s.width, "height": s.height,
                "original_width": s.original_width, "original_height": s.original_height}

    def _retry_delay(self, item: _Item, got: Fetched) -> float | None:
        """Seconds to wait before trying ``item`` again, or None to keep ``got`` as its outcome."""
        cfg = self.cfg
        if got.status == "rate_limited" and item.rate_attempts < cfg.rate_limit_retries:
            wait = got.retry_after if got.retry_after is not None else 2.0 ** item.rate_attempts
            if wait <= cfg.max_retry_after:
                item.rate_attempts += 1
                return wait
            return None
        retryable = got.status in RETRYABLE or (got.status == "http_error" and (got.kind or "").startswith("5"))
        if retryable and item.attempts < cfg.retries:
            item.attempts += 1
            return 0.0
        return None

    def download(self, rows: list[dict], stats: "PartitionStats | None" = None) -> list[dict]:
        """Download-contract rows for ``rows`` (dicts with key, source, policy, url, caption,
        captions, duplicate_of, status, error; status None = to fetch), in the same order."""
        out: list[dict | None] = [None] * len(rows)
        items = []
        for i, row in enumerate(rows):
            if row["status"] is not None:
                out[i] = empty_row(row, row["status"], row["error"])
            else:
                items.append(_Item(i, row["url"], host_of(row["url"])))
        deadline = time.monotonic() + partition_seconds(self.cfg, len(items))
        hosts = HostQueue(items, self.cfg.max_per_host)
        results: queue.Queue = queue.Queue()
        bodies = threading.Semaphore(2 * self.cfg.threads)

        def worker() -> None:
            while True:
                while not bodies.acquire(timeout=0.5):
                    if hosts.closed:
                        return
                item = hosts.take()
                if item is None:
                    bodies.release()
                    return
                try:
                    got = self.fetcher.fetch(item.url)
                    delay = self._retry_delay(item, got)
                except Exception as e:  # noqa: BLE001 — a raise must never cost a thread or its host slot
                    got, delay = Fetched("network_error", error=f"{type(e).__name__}: {e}"[:500]), None
                if delay is not None:
                    bodies.release()
                    hosts.again(item, delay)
                    continue
                hosts.done(item)
                # hashed here: hashlib releases the GIL, so it overlaps the main thread's image work
                results.put((item, got, hashlib.sha256(got.data).hexdigest() if got.data is not None else None))

        threads = [threading.Thread(target=worker, name=f"fetch-{t}", daemon=True)
                   for t in range(min(self.cfg.threads, len(items)))]
        for t in threads:
            t.start()
        pending = len(items)
        while pending:
            try:
                item, got, sha = results.get(timeout=max(0.01, min(1.0, deadline - time.monotonic())))
            except queue.Empty:
                if time.monotonic() >= deadline:
                    break
                continue
            try:
                row = rows[item.index]
                out[item.index] = (self._finish(row, got.data, sha) if got.status == "ok"
                                   else empty_row(row, got.status, got.error))
                if stats is not None:
                    stats.fetched(item.host, got)
            finally:
                bodies.release()
                pending -= 1
        hosts.close()  # after the partition deadline: threads still fetching are abandoned (daemons)
        for i, row in enumerate(rows):
            if out[i] is None:
                out[i] = empty_row(row, "timeout", f"partition deadline of {partition_seconds(self.cfg, len(items)):g} s "
                                                   "passed before this URL was answered")
        return out


class PartitionStats:
    """What one shard adds to the job summary: statuses per source, human images and captions,
    and for the politeness and refusal outcomes, which hosts and which address classes."""

    def __init__(self):
        self.by_source: dict[str, dict[str, int]] = {}
        self.images = collections.Counter()       # policy -> ok images
        self.captions = collections.Counter()     # policy -> captions of ok images
        self.hosts: dict[str, collections.Counter] = {}
        self.blocked_kinds = collections.Counter()

    def fetched(self, host: str, got: Fetched) -> None:
        if got.status != "ok":
            self.hosts.setdefault(got.status, collections.Counter())[host] += 1
        if got.status == "blocked":
            self.blocked_kinds[got.kind or "other"] += 1

    def count(self, table: pa.Table) -> None:
        for row in table.select(["source", "policy", "status", "captions"]).to_pylist():
            per = self.by_source.setdefault(row["source"], {})
            per[row["status"]] = per.get(row["status"], 0) + 1
            if row["status"] == "ok":
                self.images[row["policy"]] += 1
                self.captions[row["policy"]] += len(row["captions"] or ())

    def to_dict(self) -> dict:
        return {"by_source": self.by_source, "images": dict(self.images), "captions": dict(self.captions),
                "hosts": {s: dict(c.most_common(HOST_STATS_TOP)) for s, c in self.hosts.items()},
                "blocked_kinds": dict(self.blocked_kinds)}


def to_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=DOWNLOAD.schema)
