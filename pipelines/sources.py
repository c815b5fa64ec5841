"""URL lists in the formats the datasets are published in, read as uniform Arrow tables.

Each dataset is declared once as a :class:`Source` (file formats, URL and caption columns,
header or not). :func:`open_url_lists` resolves the input files and checks every one of them
for the columns its source needs — a missing column is a :class:`SchemaError` naming the
column and the file, raised before any download starts. :meth:`UrlLists.batches` then streams
tables with the columns of :data:`URL_TABLE`, in a fixed order, keyed
``<source>/<row index within that source>`` so keys are stable across runs.

Captions are read as bytes and decoded here: an undecodable caption keeps its text (bytes
replaced by U+FFFD) and gets a ``caption_error``, so the download can count it as
``bad_caption`` instead of crashing on it.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Iterator

import fsspec
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipelines.schema import SchemaError

URL_TABLE = pa.schema([
    pa.field("key", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("url", pa.string()),
    pa.field("caption", pa.string()),
    pa.field("caption_error", pa.string()),   # null, "empty caption" or "caption is not valid UTF-8"
])
READ_BATCH_ROWS = 8192


@dataclass(frozen=True)
class Source:
    """How one dataset publishes its URL list.

    ``columns`` names the fields of header-less delimited files in order; ``url_prefix`` turns
    a relative image path (COCO, VG annotation files) into a URL.
    """

    name: str
    formats: tuple[str, ...]            # file extensions: parquet, tsv, csv, json, jsonl
    url_column: str
    caption_column: str
    header: bool = True
    columns: tuple[str, ...] = ()       # for header-less delimited files
    url_prefix: str = ""
    delimiter: str = "\t"


SOURCES: dict[str, Source] = {s.name: s for s in (
    # LAVIS coco_karpathy_{train,val,test}.json: [{"image": "val2014/COCO_val2014_...jpg", "caption": ...}]
    Source("coco", ("json", "jsonl"), "image", "caption", url_prefix="http://images.cocodataset.org/"),
    # LAVIS vg_caption.json: [{"image": "VG_100K/1.jpg", "caption": ..., "image_id": ...}]
    Source("vg", ("json", "jsonl"), "image", "caption", url_prefix="https://cs.stanford.edu/people/rak248/"),
    # Google Conceptual Captions (GCC) official tsv: caption<TAB>url, no header
    Source("cc3m", ("tsv",), "url", "caption", header=False, columns=("caption", "url")),
    # CC12M official tsv: url<TAB>caption, no header
    Source("cc12m", ("tsv",), "url", "caption", header=False, columns=("url", "caption")),
    # SBU: LAVIS sbu.json ([{"url", "caption", ...}]) or a url<TAB>caption list
    Source("sbu", ("json", "jsonl", "tsv"), "url", "caption", header=False, columns=("url", "caption")),
    # LAION-400M/5B metadata parquet
    Source("laion", ("parquet",), "URL", "TEXT"),
    # Anything else with url/caption columns (parquet, csv/tsv with header, json)
    Source("generic", ("parquet", "csv", "tsv", "json", "jsonl"), "url", "caption", delimiter=","),
)}


def _ext(path: str) -> str:
    name = path.rsplit("/", 1)[-1].lower()
    for compound in (".tsv.gz", ".csv.gz", ".jsonl.gz", ".json.gz"):
        if name.endswith(compound):
            return compound[1:].split(".")[0]
    return name.rsplit(".", 1)[-1] if "." in name else ""


def _compression(path: str) -> str | None:
    return "gzip" if path.lower().endswith(".gz") else None


# -- peeking at a file's columns (cheap: parquet footer, first line, first record) ------------
def _delimiter(source: Source, path: str) -> str:
    return "\t" if _ext(path) == "tsv" else source.delimiter


def _first_line(fs, path: str) -> bytes:
    with fs.open(path, "rb", compression=_compression(path)) as f:
        return f.readline().rstrip(b"\r\n")


def _json_records(fs, path: str) -> list[dict]:
    """A json array, a json object holding one (``{"images": [...]}``/``{"annotations": [...]}``) or jsonl."""
    with fs.open(path, "rb", compression=_compression(path)) as f:
        raw = f.read()
    # surrogateescape keeps invalid UTF-8 bytes visible (as lone surrogates) instead of failing the file
    text = raw.decode("utf-8", errors="surrogateescape")
    if _ext(path) == "jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    data = json.loads(text)
    if isinstance(data, dict):
        for k in ("annotations", "images", "data"):
            if isinstance(data.get(k), list):
                return data[k]
        raise SchemaError(f"{path}: json object without a list of records (annotations/images/data)")
    if not isinstance(data, list):
        raise SchemaError(f"{path}: expected a json list of records")
    return data


def file_columns(source: Source, fs, path: str) -> list[str]:
    """Column names the file offers under ``source``'s reading rules."""
    ext = _ext(path)
    if ext == "parquet":
        return pq.ParquetFile(fs.open(path, "rb")).schema_arrow.names
    if ext in ("json", "jsonl"):
        records = _json_records(fs, path)
        return sorted(records[0]) if records and isinstance(records[0], dict) else []
    line = _first_line(fs, path)
    fields = line.decode("utf-8", errors="replace").split(_delimiter(source, path))
    if source.header:
        return [f.strip() for f in fields]
    return list(source.columns[: len(fields)]) if line else []


def check_file(source: Source, fs, path: str) -> None:
    """Raise SchemaError if the file lacks a column the source needs (before any work)."""
    ext = _ext(path)
    if ext not in source.formats:
        raise SchemaError(f"{path}: source {source.name!r} reads {', '.join(source.formats)} files, not {ext or 'this'}")
    have = file_columns(source, fs, path)
    for col in (source.url_column, source.caption_column):
        if col not in have:
            raise SchemaError(f"{path}: missing column {col!r} required by source {source.name!r} "
                              f"(found: {', '.join(have) or 'nothing'})")


def detect_source(fs, path: str) -> Source:
    """Guess a file's source from its extension, its name and its columns."""
    ext, name = _ext(path), path.rsplit("/", 1)[-1].lower()
    if ext == "tsv":
        fields = _first_line(fs, path).decode("utf-8", errors="replace").split("\t")
        looks_url = [bool(re.match(r"^[a-z][a-z0-9+.-]*://", f.strip(), re.I)) for f in fields]
        if len(fields) >= 2 and looks_url[1] and not looks_url[0]:
            return SOURCES["cc3m"]
        if len(fields) >= 2 and looks_url[0]:
            return SOURCES["sbu" if "sbu" in name else "cc12m"]
    candidates = [s for s in SOURCES.values() if ext in s.formats]
    for hint in ("coco", "vg", "sbu", "laion", "cc3m", "cc12m"):
        if hint in name and SOURCES[hint] in candidates:
            return SOURCES[hint]
    for s in candidates:
        try:
            check_file(s, fs, path)
            return s
        except SchemaError:
            continue
    raise SchemaError(f"{path}: cannot tell which source this is; pass --source "
                      f"({', '.join(SOURCES)}) — found columns: {', '.join(file_columns(SOURCES['generic'], fs, path))}")


# -- reading --------------------------------------------------------------------------------
def _decode_caption(value) -> tuple[str | None, str | None]:
    """(caption text, problem or None)."""
    if value is None:
        return None, "empty caption"
    if isinstance(value, list):  # karpathy val/test files: several captions per image; keep the first
        value = value[0] if value else None
        return _decode_caption(value)
    if isinstance(value, bytes):
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            return value.decode("utf-8", errors="replace"), "caption is not valid UTF-8"
    else:
        text = str(value)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates from surrogateescape / "\udcxx" escapes
            return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace"), "caption is not valid UTF-8"
    if not text.strip():
        return text, "empty caption"
    return text, None


def _decode_url(value, prefix: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    value = str(value).strip()
    if prefix and value and "://" not in value:
        value = prefix.rstrip("/") + "/" + value.lstrip("/")
    return value


def _raw_batches(source: Source, fs, path: str, malformed: list) -> Iterator[tuple[list, list]]:
    """(urls, captions) in file order, as raw Python values (bytes where the format allows).

    Delimited rows with the wrong number of fields cannot be keyed; they are counted in
    ``malformed`` (one entry per row) and reported in the summary."""
    ext = _ext(path)
    if ext == "parquet":
        pf = pq.ParquetFile(fs.open(path, "rb"))
        for b in pf.iter_batches(batch_size=READ_BATCH_ROWS, columns=[source.url_column, source.caption_column]):
            yield b.column(0).to_pylist(), b.column(1).to_pylist()
    elif ext in ("json", "jsonl"):
        records = _json_records(fs, path)
        for i in range(0, len(records), READ_BATCH_ROWS):
            chunk = records[i:i + READ_BATCH_ROWS]
            yield ([r.get(source.url_column) if isinstance(r, dict) else None for r in chunk],
                   [r.get(source.caption_column) if isinstance(r, dict) else None for r in chunk])
    else:
        names = None if source.header else list(source.columns)
        with fs.open(path, "rb", compression=_compression(path)) as f:
            reader = pacsv.open_csv(
                f,
                read_options=pacsv.ReadOptions(column_names=names, block_size=1 << 22),
                # Web captions carry stray quotes: the official tsv files are not quoted.
                parse_options=pacsv.ParseOptions(delimiter=_delimiter(source, path),
                                                 quote_char=False if _ext(path) == "tsv" else '"',
                                                 invalid_row_handler=lambda row: malformed.append(row.number) or "skip"),
                convert_options=pacsv.ConvertOptions(
                    include_columns=[source.url_column, source.caption_column],
                    column_types={source.url_column: pa.binary(), source.caption_column: pa.binary()}),
            )
            for b in reader:
                yield b.column(0).to_pylist(), b.column(1).to_pylist()


@dataclass(frozen=True)
class UrlFile:
    path: str            # full URI
    source: Source


class UrlLists:
    """The checked input files of one run, in a fixed order."""

    def __init__(self, files: list[UrlFile], url_prefix: str = ""):
        self.files = files
        self.url_prefix = url_prefix
        self.malformed_rows: dict[str, int] = {}   # file -> delimited rows skipped (wrong field count)

    def fingerprint(self) -> list[dict]:
        """What identifies the input (for refusing a resume against a different input)."""
        out = []
        for f in self.files:
            fs, p = fsspec.core.url_to_fs(f.path)
            out.append({"path": f.path, "source": f.source.name, "bytes": fs.size(p)})
        return out

    def batches(self) -> Iterator[pa.Table]:
        """Tables with the URL_TABLE columns; keys count rows per source across its files."""
        counters: dict[str, int] = {}
        for f in self.files:
            fs, path = fsspec.core.url_to_fs(f.path)
            src = f.source
            prefix = self.url_prefix or src.url_prefix
            malformed: list = []
            for urls, captions in _raw_batches(src, fs, path, malformed):
                start = counters.get(src.name, 0)
                counters[src.name] = start + len(urls)
                decoded = [_decode_caption(c) for c in captions]
                yield pa.Table.from_pydict({
                    "key": [f"{src.name}/{start + i}" for i in range(len(urls))],
                    "source": [src.name] * len(urls),
                    "url": [_decode_url(u, prefix) for u in urls],
                    "caption": [c for c, _ in decoded],
                    "caption_error": [e for _, e in decoded],
                }, schema=URL_TABLE)
            if malformed:
                self.malformed_rows[f.path] = len(malformed)


def resolve_files(spec: str) -> list[str]:
    """A file, a glob or a folder (local or s3://) → sorted list of file URIs."""
    fs, path = fsspec.core.url_to_fs(spec)
    protocol = fs.protocol[0] if isinstance(fs.protocol, tuple) else fs.protocol
    if any(ch in path for ch in "*?["):
        paths = fs.glob(path)
    elif fs.isdir(path):
        paths = [p for p in fs.find(path) if not p.rsplit("/", 1)[-1].startswith((".", "_"))]
    elif fs.exists(path):
        paths = [path]
    else:
        raise FileNotFoundError(f"URL list {spec!r} does not exist")
    if not paths:
        raise FileNotFoundError(f"URL list {spec!r} matches no files")
    return [p if protocol in ("file", "local") else f"{protocol}://{p}" for p in sorted(paths)]


def open_url_lists(spec: str, source: str = "auto", url_prefix: str = "") -> UrlLists:
    """Resolve and check every input file; raises SchemaError/ValueError before any work starts."""
    if source != "auto" and source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; known: auto, {', '.join(SOURCES)}")
    files = []
    for uri in resolve_files(spec):
        fs, path = fsspec.core.url_to_fs(uri)
        src = detect_source(fs, path) if source == "auto" else SOURCES[source]
        check_file(src, fs, path)
        files.append(UrlFile(uri, src))
    return UrlLists(files, url_prefix)
