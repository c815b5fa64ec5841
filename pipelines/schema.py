"""The Parquet data contracts, declared once.

Every shard carries its contract name and version in the Parquet schema metadata
(``blip2.schema`` = ``"<name>/<version>"``); readers call :func:`validate` before using a
table so a wrong or stale file fails with a message that names what is wrong.
"""
from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

SCHEMA_KEY = b"blip2.schema"

# Status values of the download contract. Anything other than "ok" has image == null.
DOWNLOAD_STATUSES = (
    "ok",
    "blocked",          # address guard refused the URL (scheme, private/loopback/link-local target)
    "http_error",       # 4xx / 5xx
    "timeout",
    "redirect_error",   # redirect loop / too many redirects
    "network_error",    # DNS failure, connection refused/reset
    "decode_error",     # corrupt / truncated / not an image
    "too_large",        # over the pixel limit (decompression bomb)
    "bad_caption",      # empty or undecodable caption
    "duplicate",        # URL already seen earlier in the same input
)


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
    1,
    pa.schema(
        [
            pa.field("key", pa.string(), nullable=False),
            pa.field("source", pa.string(), nullable=False),
            pa.field("url", pa.string()),
            pa.field("caption", pa.string()),
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
    1,
    pa.schema(
        [
            pa.field("key", pa.string(), nullable=False),
            pa.field("source", pa.string(), nullable=False),
            pa.field("url", pa.string()),                                  # from the download row
            pa.field("sha256", pa.string()),                               # of the image bytes
            pa.field("image", pa.binary(), nullable=False),
            pa.field("captions", pa.list_(pa.string()), nullable=False),   # length 2, best first
            pa.field("scores", pa.list_(pa.float32()), nullable=False),    # CLIP cosine of each
            pa.field("candidates", pa.list_(CANDIDATE)),                   # all 11, optional
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
    1,
    pa.schema(
        [
            pa.field("row", pa.int32(), nullable=False),       # row index in the input shard
            pa.field("key", pa.string(), nullable=False),
            pa.field("source", pa.string(), nullable=False),
            pa.field("sha256", pa.string()),                   # the shard's, else hashed from the image
            pa.field("policy", pa.string()),                   # "human" rows skip the CLIP-score filter
            *_CURATION_SCORES,
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
        problems.append(f"declares schema {declared.decode()!r}, expected {contract.tag!r}")
    if problems:
        raise SchemaError(f"{where} does not match the {contract.tag} contract: " + "; ".join(problems))


def conform(table: pa.Table, contract: Contract) -> pa.Table:
    """Validate, then return the table with exactly the contract's columns, order and metadata."""
    validate(table.schema, contract)
    return pa.Table.from_arrays(
        [table.column(f.name) for f in contract.schema], schema=contract.arrow_schema()
    )
