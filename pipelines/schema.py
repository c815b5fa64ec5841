"""The Parquet data contracts, declared once.

Every shard carries its contract name and version in the Parquet schema metadata
(``blip2.schema`` = ``"<name>/<version>"``); readers call :func:`validate` before using a
table so a wrong or stale file fails with a message that names what is wrong.
"""
from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

SCHEMA_KEY = b"blip2.schema"

# Status values of the download contract: every input row ends in exactly one of them.
# Anything other than "ok" has image == null.
DOWNLOAD_STATUSES = (
    "ok",
    "blocked",          # address guard refused the URL (scheme, private/loopback/link-local target)
    "invalid_url",      # not a URL: wrong type, empty, undecodable, too long, no host
    "http_error",       # 4xx / 5xx
    "rate_limited",     # 429 / 503 still after the Retry-After retries
    "opted_out",        # X-Robots-Tag forbids the use (noai, noimageai, ...)
    "timeout",          # the per-URL deadline (connect + headers + body + redirects) passed
    "redirect_error",   # redirect loop / too many redirects
    "network_error",    # DNS failure, connection refused/reset, body shorter than announced
    "decode_error",     # corrupt / truncated / not an image
    "too_large",        # body over download.max_bytes, or over the pixel limit (decompression bomb)
    "too_small",        # a side under download.min_image_size (tracking pixels)
    "bad_caption",      # empty, undecodable, not text, or too long
    "duplicate",        # URL already seen earlier in the input (web sources)
    "merged",           # a human caption of an image another row downloads: kept in that row's captions
    "malformed_row",    # an input line that cannot be parsed (wrong field count, stray quote)
    "task_failed",      # the partition's task died download.task_retries + 1 times (e.g. out of memory)
)
# How a source's captions are treated (pipelines.sources declares each source's policy).
WEB, HUMAN = "web", "human"
POLICIES = (WEB, HUMAN)

# Per-image metadata some lists publish (LAION: CLIP similarity, NSFW and watermark probabilities,
# original size, license), typed; null where the list has no such column. Sources map their own
# column names onto these fields (pipelines.sources); curation and inspection read them.
METADATA = pa.struct([
    pa.field("similarity", pa.float32()),   # LAION: CLIP ViT-B/32 image-text cosine of the alt text
    pa.field("punsafe", pa.float32()),      # probability the image is unsafe
    pa.field("pwatermark", pa.float32()),   # probability the image carries a watermark
    pa.field("width", pa.int32()),          # the list's stated original size
    pa.field("height", pa.int32()),
    pa.field("license", pa.string()),
    pa.field("nsfw", pa.string()),          # LAION's tag: UNLIKELY, UNSURE, NSFW
    # LAION-COCO: BLIP captions with their CLIP ViT-L/14 scores, precomputed (capfilt.precomputed)
    pa.field("synthetic_captions", pa.list_(pa.string())),
    pa.field("synthetic_scores", pa.list_(pa.float32())),
])


@dataclass(frozen=True)
class Contract:
    name: str
    version: int
    schema: pa.Schema

    @property
    def tag(self) -> str:
        return f"{self.name}/{self.version}"

    def arrow_schema(self) -> pa.Schema:
        return self.schema.with_metadata({SCHEMA_KEY: self.tag.encode()})


DOWNLOAD = Contract(
    "download",
    2,
    pa.schema(
        [
            pa.field("key", pa.string(), nullable=False),
            pa.field("source", pa.string(), nullable=False),
            pa.field("policy", pa.string(), nullable=False),    # web | human
            pa.field("url", pa.string()),
            pa.field("caption", pa.string()),                   # the row's own caption, as listed
            # ok rows: every caption of the image (human: all rows of the same image merged,
            # in input order; web: the row's own caption)
            pa.field("captions", pa.list_(pa.string())),
            pa.field("duplicate_of", pa.string()),              # duplicate/merged: the key that holds the image
            pa.field("meta", METADATA),                         # the list's per-image metadata
            pa.field("image", pa.binary()),
            pa.field("width", pa.int32()),
            pa.field("height", pa.int32()),
            pa.field("original_width", pa.int32()),
            pa.field("original_height", pa.int32()),
            pa.field("status", pa.string(), nullable=False),
            pa.field("error", pa.string()),
            pa.field("sha256", pa.string()),
        ]
    ),
)

CANDIDATE = pa.struct([pa.field("caption", pa.string()), pa.field("score", pa.float32()),
                       pa.field("synthetic", pa.bool_())])

CAPFILT = Contract(
    "capfilt",
    2,
    pa.schema(
        [
            pa.field("key", pa.string(), nullable=False),
            pa.field("source", pa.string(), nullable=False),
            pa.field("policy", pa.string(), nullable=False),    # web | human
            pa.field("url", pa.string()),
            pa.field("sha256", pa.string()),                    # of the downloaded original
            pa.field("meta", METADATA),                         # the list's per-image metadata
            pa.field("image", pa.binary(), nullable=False),
            # web: the kept `keep` of the 10 + 1 ranked candidates, best first;
            # human: every human caption of the image, in input order (passed through)
            pa.field("captions", pa.list_(pa.string()), nullable=False),
            pa.field("scores", pa.list_(pa.float32()), nullable=False),    # CLIP cosine of each
            pa.field("candidates", pa.list_(CANDIDATE)),                   # web: all 11, optional
            pa.field("original_caption", pa.string()),
        ]
    ),
)

# `blip2 curate` (pipelines/curation.py names the folders). Every input row gets one SCORES row;
# every row it removes is kept whole in the REMOVED side table, with its reasons and scores.
_CURATION_SCORES = [
    pa.field("clip_score", pa.float32()),     # of the kept caption(s), as curate.clip_score.use says
    pa.field("aesthetic", pa.float32()),      # aesthetic head (null: no head)
    pa.field("nsfw", pa.float32()),           # NSFW head, probability unsafe (null: no head)
    pa.field("punsafe", pa.float32()),        # LAION's own columns, when the shard carries them
    pa.field("pwatermark", pa.float32()),
]

CURATE_SCORES = Contract(
    "curate_scores",
    2,
    pa.schema(
        [
            pa.field("row", pa.int32(), nullable=False),       # row index in the input shard
            pa.field("key", pa.string(), nullable=False),
            pa.field("source", pa.string(), nullable=False),
            pa.field("sha256", pa.string()),                   # the shard's, else hashed from the image
            pa.field("policy", pa.string()),                   # "human" rows skip the CLIP-score filter
            *_CURATION_SCORES,
            pa.field("defect", pa.string()),                   # no_image | bad_embedding (null: usable)
        ]
    ),
)

REMOVED = Contract(
    "curate_removed",
    1,
    pa.schema(
        [
            *CAPFILT.schema,
            pa.field("row", pa.int32(), nullable=False),
            pa.field("reasons", pa.list_(pa.string()), nullable=False),
            *_CURATION_SCORES,
            pa.field("duplicate_of", pa.string()),             # key of the row kept in its place
            pa.field("similarity", pa.float32()),              # cosine to it (1.0 for an exact duplicate)
        ]
    ),
)

CONTRACTS = {c.name: c for c in (DOWNLOAD, CAPFILT, CURATE_SCORES, REMOVED)}


class SchemaError(ValueError):
    """A table or file does not match the contract it is read as."""


def contract_of(schema: pa.Schema) -> Contract | None:
    """The contract a file declares in its metadata, or None if it declares none."""
    tag = (schema.metadata or {}).get(SCHEMA_KEY)
    if not tag:
        return None
    name, _, version = tag.decode().partition("/")
    c = CONTRACTS.get(name)
    return c if c is not None and str(c.version) == version else None


def validate(schema: pa.Schema, contract: Contract, where: str = "table") -> None:
    """Raise SchemaError naming every missing column and every wrong type."""
    problems = []
    for field in contract.schema:
        if field.name not in schema.names:
            problems.append(f"missing column {field.name!r} ({field.type})")
            continue
        got = schema.field(field.name).type
        if not got.equals(field.type):
            problems.append(f"column {field.name!r} is {got}, expected {field.type}")
    declared = (schema.metadata or {}).get(SCHEMA_KEY)
    if declared and declared.decode() != contract.tag:
        name, _, version = declared.decode().partition("/")
        if name == contract.name and version.isdigit() and int(version) < contract.version:
            raise SchemaError(f"{where} was written in the older {declared.decode()} format; this version "
                              f"reads {contract.tag}: re-run the job that made it into a new output")
        problems.append(f"declares schema {declared.decode()!r}, expected {contract.tag!r}")
    if problems:
        raise SchemaError(f"{where} does not match the {contract.tag} contract: " + "; ".join(problems))


def conform(table: pa.Table, contract: Contract) -> pa.Table:
    """Validate, then return the table with exactly the contract's columns, order and metadata."""
    validate(table.schema, contract)
    return pa.Table.from_arrays(
        [table.column(f.name) for f in contract.schema], schema=contract.arrow_schema()
    )
