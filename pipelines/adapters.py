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
unique number in their name take their place in name order; names starting with ``.`` or ``_``
are not shards), and a job writes its output shard *i* from it, so resume and determinism hold
as for our own shards. Keys are ``<source>/<the sample's own key>`` (a WebDataset key keeps its
folder; a key that repeats within a shard gets ``#2``, ``#3``, ...).

Inputs are hostile like URL lists: no read opens a path outside the folder, no member is read
past ``download.max_bytes`` (images) or ``MAX_TEXT_BYTES`` (txt/json), captions over
``download.max_caption_bytes`` are ``bad_caption``, and a bad sample is a row with a status. A
shard that cannot be read (on) yields the rows read before the problem, and the problem itself
under :data:`READ_ERROR` in the table's schema metadata (:func:`read_error`), so jobs count and
report it instead of failing.
"""
from __future__ import annotations

import io
import json
import re
import tarfile
import zlib
from dataclasses import dataclass

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.config import DownloadConfig
from pipelines.images import IMAGE_FORMATS
from pipelines.schema import DOWNLOAD, SchemaError, validate
from pipelines.shardio import COMMITS, ShardSet, shard_index, shard_name
from pipelines.sources import SOURCES, Limits, _convert, _text, decode_captions, decode_metadata

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")
_NUMBERED = re.compile(r"^(\d+)\.(tar|parquet)$")
_I2D_META = SOURCES["laion"]   # img2dataset keeps LAION's columns under their own names (--save_additional_columns)
TEXT_SUFFIXES = ("txt", "json")
MAX_TEXT_BYTES = 1 << 20        # a txt/json member; captions are then held to download.max_caption_bytes
READ_ERROR = b"read_error"      # schema metadata: why a shard could not be read (on)
_TAR_ERRORS = (tarfile.TarError, EOFError, zlib.error, OSError)
SIZES = ("width", "height", "original_width", "original_height")


def tar_samples(fileobj, max_bytes: int | None = None, max_text_bytes: int | None = MAX_TEXT_BYTES):
    """Samples of one WebDataset tar (``{"__key__": ..., "<ext>": bytes}``) under the webdataset
    package's key rules, read without trusting the tar: links and other non-regular members are
    skipped (as webdataset does), and a member that is sparse, over its cap or a second one of its
    extension in the sample is not read; its sample carries ``__error__`` = (status, reason). A tar
    that cannot be read on raises after the samples before the damage (the one it cut short
    carries an ``__error__``)."""
    from webdataset.tariterators import base_plus_ext

    current = None
    try:
        with tarfile.open(fileobj=fileobj, mode="r|*") as stream:
            for info in stream:
                if not info.isreg() or re.match(r"__[^/]*__($|/)", info.name):
                    continue
                prefix, suffix = base_plus_ext(info.name)
                if prefix is None:
                    continue
                suffix = suffix.lower()
                if current is None or prefix != current["__key__"]:
                    if current is not None:
                        yield current
                    current = {"__key__": prefix}
                text = suffix in TEXT_SUFFIXES
                cap = max_text_bytes if text else max_bytes
                problem = ("is sparse" if info.issparse() else
                           f"is {info.size} bytes, over {cap}" if cap is not None and info.size > cap else
                           "repeats an extension of its sample" if suffix in current else None)
                if problem:
                    status = "decode_error" if suffix in current else "bad_caption" if text else "too_large"
                    current.setdefault("__error__", (status, f"tar member {info.name} {problem}"))
                    continue
                current[suffix] = stream.extractfile(info).read()
                stream.members = []  # the stream reader would otherwise keep every header
    except _TAR_ERRORS:
        if current is not None:
            current.setdefault("__error__", ("decode_error", "the tar ends or breaks inside this sample"))
            yield current
        raise
    if current is not None:
        yield current


def read_error(table: pa.Table) -> str | None:
    """Why the shard ``table`` was read from could not be read (on), or None."""
    value = (table.schema.metadata or {}).get(READ_ERROR)
    return value.decode() if value else None


def _table(rows: list[dict], columns: list[str] | None, problem: str | None) -> pa.Table:
    out = pa.Table.from_pylist(rows, schema=DOWNLOAD.schema)
    if problem:
        out = out.replace_schema_metadata({**(out.schema.metadata or {}), READ_ERROR: problem[:1000].encode()})
    return out.select(columns) if columns else out


def _unique(key: str, seen: dict) -> str:
    """``key``, or ``key#N`` for its N-th appearance in the shard (keys are unique in a shard)."""
    seen[key] = seen.get(key, 0) + 1
    return key if seen[key] == 1 else f"{key}#{seen[key]}"


def _caption(value, limits: Limits) -> tuple[str | None, str | None]:
    """(caption, problem) under the download rules (text, not empty, at most max_caption_bytes)."""
    good, shown, problem = decode_captions(value, limits)
    return (good[0] if good else shown), problem


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
                 policy: str = "web", limits: "InputLimits | None" = None):
        self.folder, self.fmt, self.numbers = folder, fmt, numbers
        self.uri, self.kind = folder.uri, f"img2dataset {fmt} folder"
        self.source, self.policy, self.limits = source, policy, limits or InputLimits()

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

    def _images(self, n: int, keys: list[str], table: pa.Table) -> tuple[dict, str | None]:
        """(key -> image bytes or (status, reason), the shard's read problem)."""
        fs, folder, cap = self.folder.fs, self.folder, self.limits.max_bytes
        if self.fmt == "parquet":
            col = next((c for c in IMAGE_SUFFIXES if c in table.column_names), None)
            return (dict(zip(table.column("key").to_pylist(), table.column(col).to_pylist())) if col else {}), None
        out = {}
        if self.fmt == "webdataset":
            try:
                with fs.open(folder.path(f"{n:05d}.tar"), "rb") as f:
                    for sample in tar_samples(f, cap):
                        image = sample.get("__error__") or next((sample[s] for s in IMAGE_SUFFIXES if s in sample), None)
                        if image is not None:
                            out[sample["__key__"].rsplit("/", 1)[-1]] = image
            except _TAR_ERRORS as e:
                return out, f"{n:05d}.tar: unreadable after {len(out)} samples ({type(e).__name__}: {e})"
            return out, None
        # "files": keys come from the parquet, so they are matched against a listing of the shard's
        # folder, never joined into a path (a key "../../x" would read outside the input).
        listed = {e["name"].rsplit("/", 1)[-1]: e for e in fs.ls(folder.path(f"{n:05d}"), detail=True)
                  if e.get("type") == "file" and not e.get("islink")}
        for key in keys:
            entry = next((listed[f"{key}.{s}"] for s in IMAGE_SUFFIXES if f"{key}.{s}" in listed), None)
            if entry is not None:
                out[key] = (("too_large", f"{entry['name']} is {entry['size']} bytes, over download.max_bytes {cap}")
                            if (entry.get("size") or 0) > cap else fs.cat(entry["name"]))
        return out, None

    def read(self, index: int, columns: list[str] | None = None) -> pa.Table:
        fs, folder = self.folder.fs, self.folder
        name = f"{index:05d}.parquet"
        try:
            with fs.open(folder.path(name), "rb") as f:
                table = pq.read_table(f)
            missing = [c for c in ("key", "url", "caption", "status") if c not in table.column_names]
            if missing:
                return _table([], columns, f"{name}: not an img2dataset shard (no {missing[0]!r} column)")
            records = table.drop([c for c in IMAGE_SUFFIXES if c in table.column_names]).to_pylist()
            keys = [_text(r["key"])[0] or f"row-{i}" for i, r in enumerate(records)]
            images, problem = self._images(index, [k for k, r in zip(keys, records) if r["status"] == "success"],
                                           table)
        except Exception as e:  # noqa: BLE001 - an unreadable shard is counted and reported, not fatal
            return _table([], columns, f"{name}: unreadable ({type(e).__name__}: {str(e)[:300]})")
        rows, seen = [], {}
        for key, r in zip(keys, records):
            status, error = img2dataset_status(_text(r["status"])[0], _text(r.get("error_message"))[0])
            caption, caption_problem = _caption(r["caption"], self.limits.captions)
            image = images.get(key)
            if isinstance(image, tuple):
                (status, error), image = image, None
            elif status == "ok" and image is None:
                status, error = "decode_error", f"img2dataset listed {key} as a success, but its image is missing"
            elif status == "ok" and not isinstance(image, bytes):
                status, error, image = "decode_error", "the image is not bytes", None
            elif status == "ok" and caption_problem:
                status, error = "bad_caption", caption_problem
            sizes = {k: _convert(r.get(k), pa.int32()) for k in SIZES}
            rows.append(_row(_unique(f"{self.source}/{key}", seen), self.source, self.policy, _text(r["url"])[0],
                             caption, status, error, image, sizes, _text(r.get("sha256"))[0],
                             decode_metadata(r, _I2D_META)))
        return _table(rows, columns, problem)


class WebDatasetFolder(DownloadSource):
    """Generic WebDataset ``.tar`` shards: an image member, ``txt`` and/or ``json`` per sample."""

    def __init__(self, folder: _Folder, names: list[str], source: str = "webdataset", policy: str = "web",
                 limits: "InputLimits | None" = None):
        self.folder, self.uri, self.kind = folder, folder.uri, "WebDataset folder"
        numbers = [int(m.group(1)) if (m := re.search(r"(\d+)\.tar$", n)) else None for n in names]
        unique = None not in numbers and len(set(numbers)) == len(numbers)
        self.by_index = dict(zip(numbers if unique else range(len(names)), names))
        self.source, self.policy, self.limits = source, policy, limits or InputLimits()

    def indices(self) -> list[int]:
        return sorted(self.by_index)

    def read(self, index: int, columns: list[str] | None = None) -> pa.Table:
        rows, seen, problem = [], {}, None
        name = self.by_index[index]
        try:
            with self.folder.fs.open(self.folder.path(name), "rb") as f:
                for sample in tar_samples(f, self.limits.max_bytes):
                    rows.append(self._sample_row(sample, seen))
        except Exception as e:  # noqa: BLE001 - the rows before the damage commit; the shard is reported
            problem = f"{name}: unreadable after {len(rows)} samples ({type(e).__name__}: {str(e)[:300]})"
        return _table(rows, columns, problem)

    def _sample_row(self, sample: dict, seen: dict) -> dict:
        from PIL import Image

        # the member's folder stays in the key (dir1/x and dir2/x differ); "..", "." and "/" go
        key = "/".join(p for p in sample["__key__"].split("/") if p not in ("", ".", ".."))
        key = _unique(f"{self.source}/{key}", seen)
        meta, status, error = {}, "ok", None
        sizes = dict.fromkeys(SIZES)
        try:
            if "json" in sample:
                try:
                    meta = json.loads(sample["json"])
                except (ValueError, RecursionError):
                    meta = {}
            meta = meta if isinstance(meta, dict) else {}
            raw = sample["txt"].decode("utf-8", "replace") if "txt" in sample else (
                meta.get("caption") if meta.get("caption") is not None else meta.get("text"))
            caption, caption_problem = _caption(raw, self.limits.captions)
            image = next((sample[s] for s in IMAGE_SUFFIXES if s in sample), None)
            if "__error__" in sample:
                (status, error), image = sample["__error__"], None
            elif image is None:
                status, error = "decode_error", "the sample has no image member"
            elif caption_problem:
                status, error = "bad_caption", f"the sample has no usable caption (txt or json caption/text): {caption_problem}"
            else:
                try:
                    with Image.open(io.BytesIO(image), formats=IMAGE_FORMATS) as im:
                        sizes = dict(zip(SIZES, im.size * 2))
                except Exception as e:  # noqa: BLE001 - any unreadable header is a counted outcome
                    status, error = "decode_error", f"{type(e).__name__}: {e}"
            return _row(key, self.source, self.policy, _text(meta.get("url"))[0], caption, status, error, image,
                        sizes, None, decode_metadata(meta, _I2D_META) if meta else None)
        except Exception as e:  # noqa: BLE001 - one bad sample is a row with a status
            return _row(key, self.source, self.policy, None, None, "decode_error", f"{type(e).__name__}: {e}"[:500],
                        None, dict.fromkeys(SIZES), None, None)


@dataclass(frozen=True)
class InputLimits:
    """What one input sample may hold: the download job's own caps (``download.max_bytes``,
    ``download.max_caption_bytes``), the run's values via :meth:`of`."""
    max_bytes: int = DownloadConfig.max_bytes
    captions: Limits = Limits(max_caption_bytes=DownloadConfig.max_caption_bytes)

    @classmethod
    def of(cls, download: DownloadConfig) -> "InputLimits":
        return cls(download.max_bytes, Limits(max_url_bytes=download.max_url_bytes,
                                              max_caption_bytes=download.max_caption_bytes))


def open_download_source(uri: str, policy: str = "web", limits: InputLimits | None = None) -> DownloadSource:
    """The download-contract view of ``uri``; SchemaError when it is none of the layouts above.
    ``limits``: the caps of an img2dataset / WebDataset sample (default: ``download.*``'s defaults)."""
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
        return Img2DatasetFolder(folder, fmt, numbered, policy=policy, limits=limits)
    tars = sorted(n for n in names if n.endswith(".tar") and not n.startswith((".", "_")))  # as resolve_files
    if tars:
        return WebDatasetFolder(folder, tars, policy=policy, limits=limits)
    raise SchemaError(f"{uri} holds no committed shards (part-NNNNN.parquet), img2dataset output or WebDataset "
                      "tar shards")


