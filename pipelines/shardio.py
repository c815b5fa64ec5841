"""Shard sets: a folder (local path, ``file://`` or ``s3://``) of ``part-NNNNN.parquet`` files.

Commit protocol, so every job can resume and nothing is half-written:
  1. a shard is serialised in memory, its sha256 taken;
  2. a commit record ``_commits/part-NNNNN.json`` (rows, bytes, sha256) is written;
  3. the shard is written under a temporary name and renamed to ``part-NNNNN.parquet``
     (on object stores a single PUT is already atomic, so it is written in place).
A shard exists iff it is committed. ``_manifest.json`` is written last, from the commit
records, by :meth:`ShardSet.write_manifest`.

Storage options come from the environment only (``AWS_ENDPOINT_URL``, the standard AWS
credential chain); nothing here accepts or records credentials.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.schema import Contract, SchemaError, conform, validate
from pipelines.storage import is_local

MANIFEST = "_manifest.json"
COMMITS = "_commits"
SHARD_RE = re.compile(r"^part-(\d{5,})\.parquet$")
ROW_GROUP_ROWS = 256  # small row groups keep inspection and streaming reads low-memory
# Keys whose values are credentials, matched as whole names (case and -/_ folded): a substring
# rule would also hide num_query_tokens, max_new_tokens or tokenizer.
SECRET_KEYS = frozenset({
    "password", "passwd", "secret", "token", "credential", "credentials", "api_key", "apikey", "auth",
    "authorization", "access_key", "secret_key", "access_key_id", "secret_access_key", "session_key",
    "session_token", "private_key", "client_secret", "aws_access_key_id", "aws_secret_access_key",
    "aws_session_token", "hf_token", "huggingface_token", "hugging_face_hub_token", "wandb_api_key",
    "mlflow_tracking_password", "mlflow_tracking_token", "github_token"})


def column_stats(pf: pq.ParquetFile, name: str) -> list[tuple[int, Any]]:
    """(rows, statistics or None) of each row group for the top-level column ``name``: what a
    footer alone says about it."""
    md = pf.metadata
    leaf = next(j for j in range(md.num_columns) if md.schema.column(j).path == name)
    return [(md.row_group(g).num_rows, md.row_group(g).column(leaf).statistics) for g in range(md.num_row_groups)]


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def shard_index(name: str) -> int:
    m = SHARD_RE.match(name.rsplit("/", 1)[-1])
    if not m:
        raise ValueError(f"not a shard name: {name!r}")
    return int(m.group(1))


_URL_PASSWORD = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^/\s:@]*):[^@/\s]*@", re.IGNORECASE)


def redact(obj: Any) -> Any:
    """Drop credentials before a config is written or printed: values of keys named as secrets
    (:data:`SECRET_KEYS`), and the password of any ``scheme://user:password@host`` value."""
    if isinstance(obj, dict):
        return {k: ("<redacted>" if str(k).lower().replace("-", "_") in SECRET_KEYS else redact(v))
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v) for v in obj]
    if isinstance(obj, str):
        return _URL_PASSWORD.sub(r"\1:<redacted>@", obj)
    return obj


@dataclass(frozen=True)
class ShardInfo:
    name: str
    rows: int
    bytes: int
    sha256: str


class ShardSet:
    """One shard set. Cheap to construct and picklable (Ray tasks carry it by URI)."""

    def __init__(self, uri: str):
        self.uri = uri.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.uri)
        self._local = is_local(self.fs)

    def __reduce__(self):
        return (ShardSet, (self.uri,))

    def __repr__(self) -> str:
        return f"ShardSet({self.uri!r})"

    # -- paths ---------------------------------------------------------------------------
    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def url(self, name: str) -> str:
        """Full URI of a member file (what Ray Data / pyarrow readers are given)."""
        return f"{self.uri}/{name}"

    # -- writing -------------------------------------------------------------------------
    def check_writable(self) -> None:
        """Refuse an object-store output whose bucket does not exist (a typo must not create one)."""
        if self._local:
            return
        bucket = self.root.split("/", 1)[0]
        self.fs.invalidate_cache()
        if not self.fs.exists(bucket):
            raise FileNotFoundError(f"bucket {bucket!r} of {self.uri} does not exist (or is not visible "
                                    "with these credentials); create it first")

    def makedirs(self, name: str = "") -> None:
        """Create a member folder: local only (object stores have no folders, and s3fs would
        create a missing bucket)."""
        if self._local:
            self.fs.makedirs(self.path(name) if name else self.root, exist_ok=True)

    def write_shard(self, index: int, table: pa.Table, contract: Contract) -> ShardInfo:
        table = conform(table, contract)
        buf = io.BytesIO()
        pq.write_table(table, buf, row_group_size=ROW_GROUP_ROWS, compression="zstd")
        data = buf.getvalue()
        name = shard_name(index)
        info = ShardInfo(name, table.num_rows, len(data), hashlib.sha256(data).hexdigest())
        self.makedirs(COMMITS)
        self.fs.pipe(self.path(f"{COMMITS}/{name}.json"), json.dumps(info.__dict__).encode())
        self.put(name, data)
        return info

    @property
    def is_local(self) -> bool:
        return self._local

    def _write_member(self, name: str, write) -> None:
        """``write(path)`` all or nothing: to a temporary name renamed into place locally (a rename
        is atomic), straight to the name on object stores (a single PUT is)."""
        path = self.path(name)
        if self._local:
            folder, _, base = path.rpartition("/")
            self.fs.makedirs(folder, exist_ok=True)
            tmp = f"{folder}/.{base}.tmp-{uuid.uuid4().hex}"
            write(tmp)
            self.fs.mv(tmp, path)
        else:
            write(path)

    def put(self, name: str, data: bytes) -> None:
        """Write member file ``name`` all or nothing."""
        self._write_member(name, lambda p: self.fs.pipe(p, data))

    def put_file(self, name: str, local_path: str) -> None:
        """Copy a local file in as member ``name``, all or nothing (streamed: never whole in memory)."""
        self._write_member(name, lambda p: self.fs.put_file(local_path, p))

    def write_manifest(self, contract: Contract, config: dict | None = None,
                       summary: dict | None = None) -> dict:
        """Write ``_manifest.json`` from the commit records of every committed shard."""
        shards = self.map_members(self.shard_info, self.committed())
        manifest = {
            "schema": contract.tag,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "num_shards": len(shards),
            "num_rows": sum(s.rows for s in shards),
            "shards": [s.__dict__ for s in shards],
            "config": redact(config or {}),
            "summary": summary or {},
        }
        self.fs.pipe(self.path(MANIFEST), json.dumps(manifest, indent=1).encode())
        return manifest

    # -- reading -------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.fs.exists(self.root)

    def committed(self) -> list[str]:
        """Names of committed shards, sorted (always a fresh listing: Ray tasks commit behind our back)."""
        return list(self.committed_sizes())

    def committed_sizes(self) -> dict[str, int]:
        """Committed shard name -> size in bytes, sorted by name, from one fresh listing."""
        self.fs.invalidate_cache(self.root)
        if not self.fs.exists(self.root):
            return {}
        sizes = {e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0)
                 for e in self.fs.ls(self.root, detail=True)}
        return {n: sizes[n] for n in sorted(sizes) if SHARD_RE.match(n)}

    def map_members(self, fn, names: list[str], threads: int = 32) -> list:
        """``[fn(name) for name in names]``, many at a time: object stores answer each small
        read in tens of milliseconds, so a set of 100k shards is read concurrently."""
        from concurrent.futures import ThreadPoolExecutor

        if len(names) < 2:
            return [fn(n) for n in names]
        with ThreadPoolExecutor(min(threads, len(names))) as pool:
            return list(pool.map(fn, names))

    def side_records(self, folder: str) -> list[dict]:
        """The JSON record ``folder/<shard>.json`` of every committed shard that has one (a job's
        per-shard counters), read concurrently, in shard order."""
        def read(name: str) -> dict | None:
            path = self.path(f"{folder}/{name}.json")
            return json.loads(self.fs.cat(path)) if self.fs.exists(path) else None

        return [r for r in self.map_members(read, self.committed()) if r is not None]

    def committed_indices(self) -> set[int]:
        return {shard_index(n) for n in self.committed()}

    def shard_info(self, name: str) -> ShardInfo:
        rec = self.path(f"{COMMITS}/{name}.json")
        if self.fs.exists(rec):
            return ShardInfo(**json.loads(self.fs.cat(rec)))
        # A shard written by something else: describe it from the file itself.
        data = self.fs.cat(self.path(name))
        rows = pq.read_metadata(io.BytesIO(data)).num_rows
        return ShardInfo(name, rows, len(data), hashlib.sha256(data).hexdigest())

    def read_manifest(self) -> dict | None:
        p = self.path(MANIFEST)
        return json.loads(self.fs.cat(p)) if self.fs.exists(p) else None

    def open_parquet(self, name: str) -> pq.ParquetFile:
        return pq.ParquetFile(self.fs.open(self.path(name), "rb"))

    def check_schema(self, contract: Contract) -> None:
        """Validate the first committed shard's schema (a cheap footer read) before a job starts."""
        names = self.committed()
        if not names:
            raise SchemaError(f"{self.uri} holds no committed shards (part-NNNNN.parquet)")
        validate(self.open_parquet(names[0]).schema_arrow, contract, where=f"{self.url(names[0])}")

    def read_table(self, name: str) -> pa.Table:
        """A member Parquet file that is not a shard (plans, side tables)."""
        with self.fs.open(self.path(name), "rb") as f:
            return pq.read_table(f)

    def read_shard(self, name: str, contract: Contract | None = None) -> pa.Table:
        table = self.open_parquet(name).read()
        if contract is not None:
            validate(table.schema, contract, where=self.url(name))
        return table

    def iter_batches(self, contract: Contract | None = None, columns: list[str] | None = None,
                     batch_size: int = ROW_GROUP_ROWS) -> Iterator[tuple[str, pa.RecordBatch]]:
        """Stream every committed shard's rows in bounded-memory batches."""
        for name in self.committed():
            pf = self.open_parquet(name)
            if contract is not None:
                validate(pf.schema_arrow, contract, where=self.url(name))
            for batch in pf.iter_batches(batch_size=batch_size, columns=columns):
                yield name, batch
