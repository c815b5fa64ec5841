"""URL lists in the formats the datasets are published in, read as uniform Arrow tables.

Each dataset is declared once as a :class:`Source`: file formats, URL and caption columns,
header or not, quoting, and its caption **policy** — ``human`` sources (COCO, VG) publish
one row per caption and keep every caption of an image; ``web`` sources (CC3M, CC12M, SBU,
LAION) have one alt-text per URL that CapFilt ranks against synthetic captions.

:func:`open_url_lists` resolves the input files and checks each one before any work starts:
the columns its source needs, their types, duplicate column names — each a
:class:`SchemaError` naming the file and the column. :func:`read_rows` then streams one
file as tables of :data:`URL_TABLE` in file order. **Every data row of the file becomes
exactly one table row**: a line that cannot be parsed is a ``malformed_row``, a bad URL an
``invalid_url``, a bad caption a ``bad_caption`` row, each with its reason; only blank
lines are skipped (and counted). Delimited files have one row per line: a quote never
continues a row onto the next line.
"""
from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from typing import Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.schema import METADATA, POLICIES, SchemaError
from pipelines.storage import is_local

URL_TABLE = pa.schema([
    pa.field("row", pa.int64(), nullable=False),   # data row index within the file
    pa.field("url", pa.string()),
    pa.field("caption", pa.string()),              # the row's first caption, as listed
    pa.field("captions", pa.list_(pa.string())),   # its usable captions (several in karpathy val/test json)
    pa.field("meta", METADATA),                    # the list's own metadata columns, when it has them
    pa.field("status", pa.string()),               # null: to download; else a download status of the row
    pa.field("error", pa.string()),
])
LAION_METADATA = (("similarity", "similarity"), ("punsafe", "punsafe"), ("pwatermark", "pwatermark"),
                  ("width", "WIDTH"), ("height", "HEIGHT"), ("license", "LICENSE"), ("nsfw", "NSFW"),
                  ("synthetic_captions", "all_captions"), ("synthetic_scores", "all_similarities"))
READ_BATCH_ROWS = 8192
BLOCK_BYTES = 1 << 22
SHOWN_CHARS = 200      # how much of a refused value a row keeps, so a 10 MB caption is not stored whole


@dataclass(frozen=True)
class Source:
    """How one dataset publishes its URL list.

    ``columns`` names the fields of header-less delimited files in order; ``url_prefix`` turns
    a relative image path (COCO, VG annotation files) into a URL; ``quoted`` delimited files
    follow RFC 4180 quoting within a line (generic CSV), the others are split on the delimiter
    only (the official CC3M/CC12M/SBU TSVs carry bare quotes inside captions).
    """

    name: str
    formats: tuple[str, ...]            # file extensions: parquet, tsv, csv, json, jsonl
    url_column: str
    caption_column: str
    policy: str = "web"                 # web | human (see the module docstring)
    header: bool = True
    columns: tuple[str, ...] = ()       # for header-less delimited files
    url_prefix: str = ""
    delimiter: str = "\t"
    metadata: tuple[tuple[str, str], ...] = ()   # (METADATA field, this source's column); optional in a file

    def quoted(self, path: str) -> bool:
        return _ext(path) == "csv"


SOURCES: dict[str, Source] = {s.name: s for s in (
    # LAVIS coco_karpathy_{train,val,test}.json: [{"image": "val2014/COCO_val2014_...jpg", "caption": ...}]
    Source("coco", ("json", "jsonl"), "image", "caption", policy="human",
           url_prefix="http://images.cocodataset.org/"),
    # LAVIS vg_caption.json: [{"image": "VG_100K/1.jpg", "caption": ..., "image_id": ...}]
    Source("vg", ("json", "jsonl"), "image", "caption", policy="human",
           url_prefix="https://cs.stanford.edu/people/rak248/"),
    # Google Conceptual Captions (GCC) official tsv: caption<TAB>url, no header
    Source("cc3m", ("tsv",), "url", "caption", header=False, columns=("caption", "url")),
    # CC12M official tsv: url<TAB>caption, no header
    Source("cc12m", ("tsv",), "url", "caption", header=False, columns=("url", "caption")),
    # SBU: LAVIS sbu.json ([{"url", "caption", ...}]) or a url<TAB>caption list
    Source("sbu", ("json", "jsonl", "tsv"), "url", "caption", header=False, columns=("url", "caption")),
    # LAION-400M/5B metadata parquet (its other columns travel as `meta`)
    Source("laion", ("parquet",), "URL", "TEXT", metadata=LAION_METADATA),
    # Anything else with url/caption columns (parquet, csv/tsv with header, json); LAION-style
    # metadata columns are carried when a file has them (img2dataset lists, DataComp, ...)
    Source("generic", ("parquet", "csv", "tsv", "json", "jsonl"), "url", "caption", delimiter=",",
           metadata=LAION_METADATA),
)}

_TEXT_TYPES = (pa.string(), pa.large_string(), pa.binary(), pa.large_binary())


def decode_metadata(record: dict, source: Source) -> dict | None:
    """The METADATA struct of one record, or None when the source carries none. A value that does
    not fit its field (a NaN size, a number where text belongs) becomes null, not an error."""
    if not source.metadata:
        return None
    out, found, columns = {}, False, dict(source.metadata)
    for field_ in METADATA:
        value = record.get(columns.get(field_.name, ""))
        found |= value is not None
        out[field_.name] = _convert(value, field_.type)
    return out if found else None


def _convert(value, tp):
    if value is None:
        return None
    if pa.types.is_list(tp):
        if not isinstance(value, (list, tuple)):
            return None
        items = [_convert(v, tp.value_type) for v in value]
        return None if any(v is None for v in items) else items
    try:
        if pa.types.is_floating(tp):
            value = float(value)
            return None if value != value else value
        if pa.types.is_integer(tp):
            value = float(value)
            return int(value) if value == value and abs(value) < 2**31 else None
        return value if isinstance(value, str) else (value.decode("utf-8", "replace") if isinstance(value, bytes)
                                                     else str(value))
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class Limits:
    """Longest URL and caption (UTF-8 bytes) a row may carry."""
    max_url_bytes: int = 8192
    max_caption_bytes: int = 4096


def _ext(path: str) -> str:
    name = path.rsplit("/", 1)[-1].lower()
    for compound in (".tsv.gz", ".csv.gz", ".jsonl.gz", ".json.gz"):
        if name.endswith(compound):
            return compound[1:].split(".")[0]
    return name.rsplit(".", 1)[-1] if "." in name else ""


def _compression(path: str) -> str | None:
    return "gzip" if path.lower().endswith(".gz") else None


def _delimiter(source: Source, path: str) -> str:
    return "\t" if _ext(path) == "tsv" else source.delimiter


def _shown(value) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "…"


# -- delimited files: one row per line ------------------------------------------------------
def _lines(fs, path: str) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, line without its newline), streamed in blocks."""
    number, rest = 0, b""
    with fs.open(path, "rb", compression=_compression(path)) as f:
        while True:
            block = f.read(BLOCK_BYTES)
            if not block:
                break
            lines = (rest + block).split(b"\n")
            rest = lines.pop()
            for line in lines:
                number += 1
                yield number, line.rstrip(b"\r")
    if rest:
        yield number + 1, rest.rstrip(b"\r")


def _split(line: bytes, delimiter: str, quoted: bool) -> list:
    """Fields of one line: bytes when unquoted, str (surrogate-escaped) when quoted. Raises csv.Error."""
    if not quoted:
        return line.split(delimiter.encode())
    text = line.decode("utf-8", errors="surrogateescape")
    return next(csv.reader([text], delimiter=delimiter, strict=True))


def _header(source: Source, fs, path: str) -> list[str]:
    for _, line in _lines(fs, path):
        if line.strip():
            try:
                fields = _split(line, _delimiter(source, path), source.quoted(path))
            except csv.Error as e:
                raise SchemaError(f"{path}: the header line cannot be parsed ({e})") from None
            return [f.decode("utf-8", "replace") if isinstance(f, bytes) else f for f in fields]
    return []


def _delimited_records(source: Source, fs, path: str, counts: dict) -> Iterator[tuple[dict | None, str | None]]:
    """(record, None) per data line, or (None, why) for a line that cannot be parsed."""
    delimiter, quoted = _delimiter(source, path), source.quoted(path)
    names = None if source.header else list(source.columns)
    for number, line in _lines(fs, path):
        if not line.strip():
            counts["blank_lines"] += 1
            continue
        try:
            fields = _split(line, delimiter, quoted)
        except csv.Error as e:
            yield None, f"line {number}: {e}"
            continue
        if names is None:  # the header
            names = [f.decode("utf-8", "replace").strip() if isinstance(f, bytes) else f.strip() for f in fields]
            continue
        if len(fields) != len(names):
            yield None, f"line {number}: {len(fields)} fields, expected {len(names)}"
            continue
        yield dict(zip(names, fields)), None


# -- json and jsonl ---------------------------------------------------------------------------
def _no_duplicate_keys(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise SchemaError(f"duplicate column {k!r}")
        out[k] = v
    return out


def _loads(raw: bytes):
    """JSON from bytes; surrogateescape keeps invalid UTF-8 visible (as lone surrogates) instead of
    failing the file. Raises SchemaError on a duplicate key, ValueError on bad JSON."""
    return json.loads(raw.decode("utf-8", errors="surrogateescape"), object_pairs_hook=_no_duplicate_keys)


def _file_json(raw: bytes, path: str, what: str):
    try:
        return _loads(raw)
    except SchemaError as e:
        raise SchemaError(f"{path}: {e}") from None
    except ValueError as e:
        raise SchemaError(f"{path}: {what} is not valid json ({e})") from None


def _json_array(fs, path: str) -> list:
    """A json array, or a json object holding one (``{"images": [...]}``/``{"annotations": [...]}``)."""
    with fs.open(path, "rb", compression=_compression(path)) as f:
        data = _file_json(f.read(), path, "the file")
    if isinstance(data, dict):
        for k in ("annotations", "images", "data"):
            if isinstance(data.get(k), list):
                return data[k]
        raise SchemaError(f"{path}: json object without a list of records (annotations/images/data)")
    if not isinstance(data, list):
        raise SchemaError(f"{path}: expected a json list of records")
    return data


def _json_records(fs, path: str, counts: dict) -> Iterator[tuple[dict | None, str | None]]:
    if _ext(path) == "json":
        for i, record in enumerate(_json_array(fs, path)):
            yield (record, None) if isinstance(record, dict) else (None, f"record {i}: not an object")
        return
    for number, line in _lines(fs, path):
        if not line.strip():
            counts["blank_lines"] += 1
            continue
        try:
            record = _loads(line)
        except (ValueError, SchemaError) as e:
            yield None, f"line {number}: {e}"
            continue
        yield (record, None) if isinstance(record, dict) else (None, f"line {number}: not an object")


# -- checking a file before any work -------------------------------------------------------
def file_columns(source: Source, fs, path: str) -> list[str]:
    """Column names the file offers under ``source``'s reading rules (duplicates kept)."""
    ext = _ext(path)
    if ext == "parquet":
        return list(pq.ParquetFile(fs.open(path, "rb")).schema_arrow.names)
    if ext == "json":
        for record, _ in _json_records(fs, path, {"blank_lines": 0}):
            if record is not None:
                return list(record)
        return []
    if ext == "jsonl":
        first = next((line for _, line in _lines(fs, path) if line.strip()), None)
        record = None if first is None else _file_json(first, path, "the first line")
        return list(record) if isinstance(record, dict) else []
    if source.header:
        return _header(source, fs, path)
    for _, line in _lines(fs, path):
        if line.strip():
            return list(source.columns[: len(line.split(_delimiter(source, path).encode()))])
    return []


def _check_parquet_types(source: Source, fs, path: str) -> None:
    schema = pq.ParquetFile(fs.open(path, "rb")).schema_arrow
    for col, lists_ok in ((source.url_column, False), (source.caption_column, True)):
        tp = schema.field(col).type
        if pa.types.is_dictionary(tp):
            tp = tp.value_type
        if lists_ok and (pa.types.is_list(tp) or pa.types.is_large_list(tp)):
            tp = tp.value_type
        if not any(tp.equals(t) for t in _TEXT_TYPES):
            raise SchemaError(f"{path}: column {col!r} is {schema.field(col).type}, expected text "
                              f"(string or binary{', or a list of them' if lists_ok else ''})")


def check_file(source: Source, fs, path: str) -> None:
    """Raise SchemaError if the file cannot be read as ``source``: wrong format, a missing or
    duplicated column, a column of the wrong type (parquet)."""
    ext = _ext(path)
    if ext not in source.formats:
        raise SchemaError(f"{path}: source {source.name!r} reads {', '.join(source.formats)} files, not {ext or 'this'}")
    have = file_columns(source, fs, path)
    dup = sorted({c for c in have if have.count(c) > 1})
    if dup:
        raise SchemaError(f"{path}: duplicate column name {dup[0]!r}")
    for col in (source.url_column, source.caption_column):
        if col not in have:
            raise SchemaError(f"{path}: missing column {col!r} required by source {source.name!r} "
                              f"(found: {', '.join(have) or 'nothing'})")
    if ext == "parquet":
        _check_parquet_types(source, fs, path)
    elif ext in ("json", "jsonl"):
        _check_json_types(source, fs, path)


def _check_json_types(source: Source, fs, path: str) -> None:
    """The first record's values must be text (a caption may be a list of texts)."""
    record = next((r for r, _ in _json_records(fs, path, {"blank_lines": 0}) if r is not None), None)
    if record is None:
        return
    url, caption = record.get(source.url_column), record.get(source.caption_column)
    if url is not None and not isinstance(url, str):
        raise SchemaError(f"{path}: column {source.url_column!r} holds {type(url).__name__} values, expected text")
    if caption is not None and not isinstance(caption, str) and not (
            isinstance(caption, list) and all(isinstance(c, str) for c in caption)):
        raise SchemaError(f"{path}: column {source.caption_column!r} holds {type(caption).__name__} values, "
                          "expected text or a list of texts")


def detect_source(fs, path: str) -> Source:
    """Guess a file's source from its extension, its name and its columns."""
    ext, name = _ext(path), path.rsplit("/", 1)[-1].lower()
    if ext == "tsv":
        first = next((line for _, line in _lines(fs, path) if line.strip()), b"")
        fields = first.decode("utf-8", errors="replace").split("\t")
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


# -- values -----------------------------------------------------------------------------------
def _text(value) -> tuple[str | None, str | None]:
    """(text, problem): str as is, bytes decoded as UTF-8; any other type is a problem."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8"), None
        except UnicodeDecodeError:
            return value.decode("utf-8", errors="replace"), "not valid UTF-8"
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates from surrogateescape / "\udcxx" escapes
            return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace"), "not valid UTF-8"
        return value, None
    return None, f"a {type(value).__name__}, not text"


def decode_url(value, prefix: str, limits: Limits) -> tuple[str | None, str | None]:
    """(url, problem). Relative paths (COCO/VG annotation files) are joined to ``prefix``."""
    if value is None:
        return None, "empty URL"
    text, problem = _text(value)
    if problem:
        return _shown(text if text is not None else value), f"URL is {problem}"
    text = text.strip()
    if not text:
        return None, "empty URL"
    if len(text.encode()) > limits.max_url_bytes:
        return _shown(text), f"URL is {len(text.encode())} bytes, over download.max_url_bytes={limits.max_url_bytes}"
    if prefix and "://" not in text:
        text = prefix.rstrip("/") + "/" + text.lstrip("/")
    return text, None


def decode_captions(value, limits: Limits) -> tuple[list[str], str | None, str | None]:
    """(usable captions, the first caption for display, problem when none is usable)."""
    values = value if isinstance(value, list) else [value]
    good, shown, problem = [], None, None
    for v in values:
        if v is None:
            problem = problem or "empty caption"
            continue
        text, bad = _text(v)
        shown = shown if shown is not None else (_shown(text) if text is not None else _shown(v))
        if bad:
            problem = problem or f"caption is {bad}"
        elif not text.strip():
            problem = problem or "empty caption"
        elif len(text.encode()) > limits.max_caption_bytes:
            problem = problem or (f"caption is {len(text.encode())} bytes, over "
                                  f"download.max_caption_bytes={limits.max_caption_bytes}")
        else:
            good.append(text)
    if not values:
        problem = "empty caption"
    return good, (good[0] if good else shown), (None if good else problem)


# -- reading ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class UrlFile:
    path: str            # full URI
    source: Source


@dataclass
class ReadCounts:
    rows: int = 0
    blank_lines: int = 0
    statuses: dict = field(default_factory=dict)   # status -> rows refused while reading


def _records(source: Source, fs, path: str, counts: dict) -> Iterator[tuple[dict | None, str | None]]:
    ext = _ext(path)
    if ext == "parquet":
        pf = pq.ParquetFile(fs.open(path, "rb"))
        names = pf.schema_arrow.names
        cols = [source.url_column, source.caption_column] + [c for _, c in source.metadata if c in names]
        for b in pf.iter_batches(batch_size=READ_BATCH_ROWS, columns=cols):
            values = [b.column(c).to_pylist() for c in cols]
            for row in zip(*values):
                yield dict(zip(cols, row)), None
    elif ext in ("json", "jsonl"):
        yield from _json_records(fs, path, counts)
    else:
        yield from _delimited_records(source, fs, path, counts)


def read_rows(f: UrlFile, url_prefix: str = "", limits: Limits = Limits(),
              counts: ReadCounts | None = None) -> Iterator[pa.Table]:
    """Tables of :data:`URL_TABLE` covering every data row of ``f`` in order."""
    counts = counts if counts is not None else ReadCounts()
    fs, path = fsspec.core.url_to_fs(f.path)
    src = f.source
    prefix = url_prefix or src.url_prefix
    raw = {"blank_lines": 0}
    cols: dict[str, list] = {n: [] for n in URL_TABLE.names}

    def flush() -> pa.Table:
        table = pa.Table.from_pydict(cols, schema=URL_TABLE)
        for v in cols.values():
            v.clear()
        return table

    for record, malformed in _records(src, fs, path, raw):
        status = error = url = caption = meta = None
        captions: list[str] = []
        if malformed is not None:
            status, error = "malformed_row", malformed
        else:
            meta = decode_metadata(record, src)
            url, url_problem = decode_url(record.get(src.url_column), prefix, limits)
            captions, caption, cap_problem = decode_captions(record.get(src.caption_column), limits)
            if url_problem:
                status, error = "invalid_url", url_problem
            elif cap_problem:
                status, error = "bad_caption", cap_problem
        cols["row"].append(counts.rows)
        cols["url"].append(url)
        cols["caption"].append(caption)
        cols["captions"].append(captions)
        cols["meta"].append(meta)
        cols["status"].append(status)
        cols["error"].append(error)
        counts.rows += 1
        if status:
            counts.statuses[status] = counts.statuses.get(status, 0) + 1
        if len(cols["row"]) >= READ_BATCH_ROWS:
            yield flush()
    counts.blank_lines += raw["blank_lines"]
    if cols["row"]:
        yield flush()


class UrlLists:
    """The checked input files of one run, in a fixed order."""

    def __init__(self, files: list[UrlFile], url_prefix: str = "", policy: str = "auto"):
        self.files = files
        self.url_prefix = url_prefix
        self.policy = policy

    def policy_of(self, f: UrlFile) -> str:
        return f.source.policy if self.policy == "auto" else self.policy

    def fingerprint(self) -> list[dict]:
        """What identifies the input (a resume against a different input is refused)."""
        out = []
        for f in self.files:
            fs, p = fsspec.core.url_to_fs(f.path)
            info = fs.info(p)
            version = info.get("ETag") or info.get("mtime") or info.get("LastModified") or info.get("created")
            out.append({"path": f.path, "source": f.source.name, "policy": self.policy_of(f),
                        "bytes": info.get("size"), "version": str(version) if version is not None else None})
        return out


def resolve_files(spec: str) -> list[str]:
    """A file, a glob or a folder (local or s3://) → sorted list of file URIs."""
    fs, path = fsspec.core.url_to_fs(spec)
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
    if is_local(fs):
        return sorted(paths)
    protocol = fs.protocol[0] if isinstance(fs.protocol, tuple) else fs.protocol
    return [f"{protocol}://{p}" for p in sorted(paths)]


def open_url_lists(spec: str, source: str = "auto", url_prefix: str = "", policy: str = "auto") -> UrlLists:
    """Resolve and check every input file; raises SchemaError/ValueError before any work starts."""
    if source != "auto" and source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; known: auto, {', '.join(SOURCES)}")
    if policy != "auto" and policy not in POLICIES:
        raise ValueError(f"unknown caption policy {policy!r}; known: auto, {', '.join(POLICIES)}")
    files = []
    for uri in resolve_files(spec):
        fs, path = fsspec.core.url_to_fs(uri)
        src = detect_source(fs, path) if source == "auto" else SOURCES[source]
        check_file(src, fs, path)
        files.append(UrlFile(uri, src))
    return UrlLists(files, url_prefix, policy)
