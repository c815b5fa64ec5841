"""Downloaded corpora users already hold, read as download-contract shards without a copy.

:func:`open_download_source` accepts, local or ``s3://``:

* our own download shard set (``part-NNNNN.parquet`` + ``_commits/``);
* an **img2dataset** output folder in any of its three formats — ``webdataset``
  (``NNNNN.tar`` + ``NNNNN.parquet``), ``parquet`` (``NNNNN.parquet`` with a ``jpg`` column)
  or ``files`` (``NNNNN/<key>.jpg`` + ``NNNNN.parquet``); its per-sample parquet gives every
  row, failed ones included, with its status (``success`` → ``ok``, failures mapped below);
* a generic **WebDataset** folder of ``.tar`` shards (an image member plus ``txt`` and/or
  ``json``, as DataComp and LAION publish).

Input shard *i* is the folder's shard number (``00042.tar`` → 42; generic shards without a
unique number in their name take their place in name order), and a job writes its output
shard *i* from it, so resume and determinism hold as for our own shards. Keys are
``<source>/<the sample's own key>``.
"""
from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.schema import DOWNLOAD, SchemaError, validate
from pipelines.shardio import COMMITS, ShardSet, shard_index, shard_name
from pipelines.sources import SOURCES, decode_metadata

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")
_NUMBERED = re.compile(r"^(\d+)\.(tar|parquet)$")
_I2D_META = SOURCES["laion"]   # img2dataset keeps LAION's columns under their own names (--save_additional_columns)


def tar_samples(fileobj):
    """Samples of one WebDataset tar (``{"__key__": ..., "<ext>": bytes}``), through the
    webdataset package's own tar reader and key rules."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    return group_by_keys({**f, "__url__": None} for f in tar_file_iterator(fileobj))


def img2dataset_status(status: str | None, error: str | None) -> tuple[str, str | None]:
    """img2dataset's (status, error_message) as a download-contract status. Its errors are text
    (``str(exception)``), so this reads them as img2dataset writes them."""
    if status == "success":
        return "ok", None
    msg = error or status or "img2dataset gave no reason"
    low = msg.lower()
    if status == "failed_to_resize":
        return ("too_small" if "too small" in low else "too_large" if "too large" in low else "decode_error"), msg
    if msg.startswith("HTTP Error"):
        code = msg.split(":", 1)[0].removeprefix("HTTP Error").strip()
        return ("rate_limited" if code in ("429", "503") else "http_error"), msg
    if "timed out" in low or "timeout" in low:
        return "timeout", msg
    if "x-robots-tag" in low:
        return "opted_out", msg
    return "network_error", msg


def _row(key: str, source: str, policy: str, url, caption, status: str, error, image, sizes, sha256, meta) -> dict:
    ok = status == "ok"
    return {"key": key, "source": source, "policy": policy, "url": url, "caption": caption,
            "captions": [caption] if ok and caption else ([] if ok else None), "duplicate_of": None, "meta": meta,
            "image": image if ok else None, **sizes, "status": status, "error": error, "sha256": sha256}


class DownloadSource:
    """A folder of download-contract shards: ``indices()`` and ``read(i)`` (validated tables)."""

    uri: str
    kind: str

    def indices(self) -> list[int]:
        raise NotImplementedError

    def read(self, index: int, columns: list[str] | None = None) -> pa.Table:
        raise NotImplementedError

    def check(self) -> list[int]:
        """Validate what can be checked cheaply before any model loads; the shard indices."""
        return self.indices()


class OwnShards(DownloadSource):
    kind = "download shard set"

    def __init__(self, uri: str):
        self.shards = ShardSet(uri)
        self.uri = self.shards.uri

    def indices(self) -> list[int]:
        return sorted(self.shards.committed_indices())

    def check(self) -> list[int]:
        names = self.shards.committed()
        if not names:
            self.shards.check_schema(DOWNLOAD)  # raises the "no committed shards" SchemaError
        self.shards.map_members(lambda n: validate(self.shards.open_parquet(n).schema_arrow, DOWNLOAD,
                                                   where=self.shards.url(n)), names)
        return sorted(shard_index(n) for n in names)

    def read(self, index: int, columns: list[str] | None = None) -> pa.Table:
        table = self.shards.read_shard(shard_name(index), DOWNLOAD)
        return table.select(columns) if columns else table


@dataclass
class _Folder:
    uri: str
    fs: object
    root: str

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"


class Img2DatasetFolder(DownloadSource):
    """img2dataset output in its ``webdataset``, ``parquet`` or ``files`` format."""

    def __init__(self, folder: _Folder, fmt: str, numbers: list[int], source: str = "img2dataset",
                 policy: str = "web"):
        self.folder, self.fmt, self.numbers = folder, fmt, numbers
        self.uri, self.kind = folder.uri, f"img2dataset {fmt} folder"
        self.source, self.policy = source, policy

    def __getstate__(self):  # tasks read shards by number: the driver's listing does not travel with them
        return {**self.__dict__, "numbers": []}

    def indices(self) -> list[int]:
        return list(self.numbers)

    def check(self) -> list[int]:
        for n in self.numbers[:1]:
            names = pq.ParquetFile(self.folder.fs.open(self.folder.path(f"{n:05d}.parquet"), "rb")).schema_arrow.names
            missing = [c for c in ("key", "url", "caption", "status") if c not in names]
            if missing:
                raise SchemaError(f"{self.folder.uri}/{n:05d}.parquet: not an img2dataset shard (no {missing[0]!r})")
        return self.indices()

    def _images(self, n: int, keys: list[str], table: pa.Table) -> dict[str, bytes]:
        fs, folder = self.folder.fs, self.folder
        if self.fmt == "parquet":
            col = next((c for c in IMAGE_SUFFIXES if c in table.column_names), None)
            return dict(zip(table.column("key").to_pylist(), table.column(col).to_pylist())) if col else {}
        if self.fmt == "webdataset":
            out = {}
            with fs.open(folder.path(f"{n:05d}.tar"), "rb") as f:
                for sample in tar_samples(f):
                    image = next((sample[s] for s in IMAGE_SUFFIXES if s in sample), None)
                    if image is not None:
                        out[sample["__key__"].rsplit("/", 1)[-1]] = image
            return out
        out = {}
        for key in keys:
            for suffix in IMAGE_SUFFIXES:
                path = folder.path(f"{n:05d}/{key}.{suffix}")
                if fs.exists(path):
                    out[key] = fs.cat(path)
                    break
        return out

    def read(self, index: int, columns: list[str] | None = None) -> pa.Table:
        fs, folder = self.folder.fs, self.folder
        with fs.open(folder.path(f"{index:05d}.parquet"), "rb") as f:
            table = pq.read_table(f)
        records = table.drop([c for c in IMAGE_SUFFIXES if c in table.column_names]).to_pylist()
        ok_keys = [r["key"] for r in records if r.get("status") == "success"]
        images = self._images(index, ok_keys, table)
        rows = []
        for r in records:
            status, error = img2dataset_status(r.get("status"), r.get("error_message"))
            image = images.get(r["key"])
            if status == "ok" and image is None:
                status, error = "decode_error", f"img2dataset listed {r['key']} as a success, but its image is missing"
            sizes = {k: r.get(k) for k in ("width", "height", "original_width", "original_height")}
            rows.append(_row(f"{self.source}/{r['key']}", self.source, self.policy, r.get("url"), r.get("caption"),
                             status, error, image, sizes, r.get("sha256"), decode_metadata(r, _I2D_META)))
        out = pa.Table.from_pylist(rows, schema=DOWNLOAD.schema)
        return out.select(columns) if columns else out


class WebDatasetFolder(DownloadSource):
    """Generic WebDataset ``.tar`` shards: an image member, ``txt`` and/or ``json`` per sample."""

    def __init__(self, folder: _Folder, names: list[str], source: str = "webdataset", policy: str = "web"):
        self.folder, self.uri, self.kind = folder, folder.uri, "WebDataset folder"
        numbers = [int(m.group(1)) if (m := re.search(r"(\d+)\.tar$", n)) else None for n in names]
        unique = None not in numbers and len(set(numbers)) == len(numbers)
        self.by_index = dict(zip(numbers if unique else range(len(names)), names))
        self.source, self.policy = source, policy

    def indices(self) -> list[int]:
        return sorted(self.by_index)

    def read(self, index: int, columns: list[str] | None = None) -> pa.Table:
        from PIL import Image

        rows = []
        with self.folder.fs.open(self.folder.path(self.by_index[index]), "rb") as f:
            for sample in tar_samples(f):
                key = sample["__key__"].rsplit("/", 1)[-1]
                meta = {}
                if "json" in sample:
                    try:
                        meta = json.loads(sample["json"])
                    except ValueError:
                        meta = {}
                caption = sample["txt"].decode("utf-8", "replace") if "txt" in sample else (
                    meta.get("caption") or meta.get("text") if isinstance(meta, dict) else None)
                image = next((sample[s] for s in IMAGE_SUFFIXES if s in sample), None)
                sizes = dict.fromkeys(("width", "height", "original_width", "original_height"))
                status, error = "ok", None
                if image is None:
                    status, error = "decode_error", "the sample has no image member"
                elif not caption or not str(caption).strip():
                    status, error = "bad_caption", "the sample has no caption (txt or json caption/text)"
                else:
                    try:
                        with Image.open(io.BytesIO(image)) as im:
                            sizes = dict(zip(("width", "height", "original_width", "original_height"), im.size * 2))
                    except Exception as e:  # noqa: BLE001 - any unreadable header is a counted outcome
                        status, error = "decode_error", f"{type(e).__name__}: {e}"
                rows.append(_row(f"{self.source}/{key}", self.source, self.policy,
                                 meta.get("url") if isinstance(meta, dict) else None, caption, status, error, image,
                                 sizes, None, decode_metadata(meta, _I2D_META) if isinstance(meta, dict) else None))
        out = pa.Table.from_pylist(rows, schema=DOWNLOAD.schema)
        return out.select(columns) if columns else out


def open_download_source(uri: str, policy: str = "web") -> DownloadSource:
    """The download-contract view of ``uri``; SchemaError when it is none of the layouts above."""
    fs, root = fsspec.core.url_to_fs(uri)
    root = root.rstrip("/")
    folder = _Folder(uri.rstrip("/"), fs, root)
    fs.invalidate_cache(root)
    if not fs.exists(root):
        raise SchemaError(f"{uri} does not exist")
    entries = fs.ls(root, detail=True)
    names = {e["name"].rsplit("/", 1)[-1]: e["type"] for e in entries}
    if any(n.startswith("part-") and n.endswith(".parquet") for n in names) or COMMITS in names:
        return OwnShards(uri)
    numbered = sorted({int(m.group(1)) for n in names if (m := _NUMBERED.match(n))})
    if numbered and any(n.endswith("_stats.json") for n in names):
        fmt = ("webdataset" if any(n.endswith(".tar") for n in names) else
               "files" if any(t == "directory" and n.isdigit() for n, t in names.items()) else "parquet")
        return Img2DatasetFolder(folder, fmt, numbered, policy=policy)
    tars = sorted(n for n in names if n.endswith(".tar"))
    if tars:
        return WebDatasetFolder(folder, tars, policy=policy)
    raise SchemaError(f"{uri} holds no committed shards (part-NNNNN.parquet), img2dataset output or WebDataset "
                      "tar shards")


