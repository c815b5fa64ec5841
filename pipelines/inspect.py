"""Shard-set inspection: streaming statistics and manifest/checksum consistency.

``inspect_shards(uri)`` walks every committed shard of a download or CapFilt shard set
(local or ``s3://``) one row group at a time, so memory stays bounded by the number of
*distinct* values seen (caption lengths, image sizes, quantised CLIP scores) plus 8 bytes
per row for duplicate-key detection - fine for 10k shards. Every problem it finds (missing,
extra, truncated, corrupted, unreadable or wrongly-typed shards, a missing manifest) is
named in ``Inspection.problems``; a bad shard never stops the walk.

With ``verify=True`` every shard's bytes are read once, hashed and compared with the
manifest's sha256, validated against the contract and fully decoded.
"""
from __future__ import annotations

import hashlib
import io
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.curation import REASONS, REMOVED_DIR, SCORES_DIR, is_curated
from pipelines.images import IMAGE_FORMATS
from pipelines.schema import CONTRACTS, DOWNLOAD, Contract, SchemaError, contract_of, validate
from pipelines.shardio import MANIFEST, ROW_GROUP_ROWS, ShardSet

THUMB_PX = 160  # longest side of a report thumbnail
META_SCORES = ("similarity", "punsafe", "pwatermark")   # the lists' own scores (METADATA), histogrammed
META_TAGS = ("nsfw", "license")


@dataclass
class Distribution:
    """Exact streaming distribution of values quantised to ``resolution``.

    Memory grows with the number of distinct quantised values, never with the rows.
    """
    resolution: float = 1.0
    counts: Counter = field(default_factory=Counter)

    def add(self, values) -> None:
        v = np.asarray(values, dtype=np.float64)
        v = v[np.isfinite(v)]
        if v.size:
            q, c = np.unique(np.round(v / self.resolution).astype(np.int64), return_counts=True)
            self.counts.update(dict(zip(q.tolist(), c.tolist())))

    @property
    def n(self) -> int:
        return sum(self.counts.values())

    def values_and_counts(self) -> tuple[np.ndarray, np.ndarray]:
        keys = np.array(sorted(self.counts), dtype=np.int64)
        return keys * self.resolution, np.array([self.counts[k] for k in keys], dtype=np.int64)

    def quantile(self, q: float) -> float:
        vals, cnts = self.values_and_counts()
        cum = np.cumsum(cnts)
        return float(vals[np.searchsorted(cum, q * cum[-1], side="left")])

    def summary(self) -> dict:
        """{n, min, p05, p50, p95, max, mean}; only n when empty."""
        if not self.counts:
            return {"n": 0}
        vals, cnts = self.values_and_counts()
        return {"n": int(cnts.sum()), "min": float(vals[0]), "p05": self.quantile(0.05),
                "p50": self.quantile(0.5), "p95": self.quantile(0.95), "max": float(vals[-1]),
                "mean": float((vals * cnts).sum() / cnts.sum())}


@dataclass
class Thumbnail:
    key: str
    jpeg: bytes                        # re-encoded, longest side THUMB_PX
    captions: list[str]
    scores: list[float | None]
    note: str = ""                     # a line under the key (a search hit's shard, a removal's reasons)


@dataclass
class Curation:
    """What ``blip2 curate`` removed from a curated set, read from its side table and score table."""
    rows_in: int = 0
    kept: int = 0
    removed: int = 0
    by_reason: Counter = field(default_factory=Counter)        # a row counts once per reason
    scores: dict = field(default_factory=dict)                 # score name -> Distribution over every input row
    similarity: Distribution = field(default_factory=lambda: Distribution(resolution=0.001))  # removed duplicates
    thresholds: dict = field(default_factory=dict)
    examples: dict = field(default_factory=dict)               # reason -> [Thumbnail]

    def to_dict(self) -> dict:
        return {"rows_in": self.rows_in, "kept": self.kept, "removed": self.removed, "by_reason": dict(self.by_reason),
                "scores": {k: d.summary() for k, d in self.scores.items()}, "similarity": self.similarity.summary(),
                "thresholds": self.thresholds}


@dataclass
class Inspection:
    uri: str
    contract: str | None = None        # the manifest's contract tag, else the first shard's
    manifest: dict | None = None
    shards: int = 0
    rows: int = 0
    bytes: int = 0
    schema_versions: Counter = field(default_factory=Counter)
    status: Counter = field(default_factory=Counter)
    sources: Counter = field(default_factory=Counter)
    policies: Counter = field(default_factory=Counter)
    width: Distribution = field(default_factory=Distribution)
    height: Distribution = field(default_factory=Distribution)
    original_width: Distribution = field(default_factory=Distribution)
    original_height: Distribution = field(default_factory=Distribution)
    caption_words: Distribution = field(default_factory=Distribution)
    captions_per_image: Distribution = field(default_factory=Distribution)   # human images keep several
    clip_scores: Distribution = field(default_factory=lambda: Distribution(resolution=0.001))
    meta_scores: dict = field(default_factory=lambda: {k: Distribution(resolution=0.01) for k in META_SCORES})
    meta_tags: dict = field(default_factory=lambda: {k: Counter() for k in META_TAGS})
    original_kept: int = 0             # CapFilt rows whose original caption is one of the two kept
    image_errors: int = 0              # image bytes PIL cannot read a header from
    duplicate_keys: int = 0            # rows whose key appeared earlier
    duplicate_examples: dict = field(default_factory=dict)   # key -> [shard names]
    problems: list[str] = field(default_factory=list)        # each names the shard/file concerned
    verified: bool = False
    samples: list[dict] = field(default_factory=list)
    thumbnails: list[Thumbnail] = field(default_factory=list)
    curation: Curation | None = None   # set for a set written by blip2 curate

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def share_original_kept(self) -> float | None:
        capfilt = (self.contract or "").startswith("capfilt/")
        return self.original_kept / self.rows if capfilt and self.rows else None

    def to_dict(self) -> dict:
        """A JSON-friendly summary (no image bytes)."""
        return {
            "uri": self.uri, "contract": self.contract, "manifest": self.manifest is not None,
            "shards": self.shards, "rows": self.rows, "bytes": self.bytes,
            "schema_versions": dict(self.schema_versions), "status": dict(self.status),
            "sources": dict(self.sources), "policies": dict(self.policies),
            "width": self.width.summary(), "height": self.height.summary(),
            "original_width": self.original_width.summary(),
            "original_height": self.original_height.summary(),
            "caption_words": self.caption_words.summary(), "captions_per_image": self.captions_per_image.summary(),
            "clip_scores": self.clip_scores.summary(),
            "meta_scores": {k: d.summary() for k, d in self.meta_scores.items()},
            "meta_tags": {k: dict(c) for k, c in self.meta_tags.items()},
            "share_original_kept": self.share_original_kept, "image_errors": self.image_errors,
            "duplicate_keys": self.duplicate_keys, "duplicate_examples": self.duplicate_examples,
            "problems": self.problems, "verified": self.verified, "samples": self.samples,
            "curation": self.curation.to_dict() if self.curation else None,
        }


# -- per-batch accumulation ---------------------------------------------------------------
def _word_counts(strings: pa.Array) -> np.ndarray:
    valid = pc.drop_null(strings)
    return pc.list_value_length(pc.utf8_split_whitespace(valid)).to_numpy(zero_copy_only=False)


def make_thumbnail(data: bytes) -> tuple[bytes, tuple[int, int]]:
    from PIL import Image

    with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as im:
        size = im.size
        im = im.convert("RGB")
        im.thumbnail((THUMB_PX, THUMB_PX))
        out = io.BytesIO()
        im.save(out, format="JPEG", quality=85)
    return out.getvalue(), size


def _image_size(data: bytes) -> tuple[int, int]:
    from PIL import Image

    with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as im:  # reads the header only
        return im.size


def _sample_row(row: dict) -> dict:
    """A printable row: image bytes replaced by their length, candidates summarised."""
    out = {}
    for k, v in row.items():
        if isinstance(v, (bytes, bytearray)):
            out[k] = f"<{len(v)} bytes>"
        elif k == "candidates" and v is not None:
            out[k] = f"<{len(v)} candidates>"
        else:
            out[k] = v
    return out


class _Walker:
    """Accumulates one Inspection over the batches of every shard."""

    def __init__(self, ins: Inspection, sample: int, thumbnails: int):
        self.ins, self.sample, self.want_thumbs = ins, sample, thumbnails
        self.key_hashes: list[np.ndarray] = []

    def needs_images(self, contract: Contract | None) -> bool:
        # CapFilt rows carry no width/height: image sizes come from the image headers.
        return (contract is not None and contract.name == "capfilt") or len(self.ins.thumbnails) < self.want_thumbs

    def add(self, batch: pa.RecordBatch, contract: Contract | None) -> None:
        ins, cols = self.ins, batch.schema.names
        ins.rows += batch.num_rows
        if "key" in cols:
            self.key_hashes.append(np.fromiter((hash(k) for k in batch.column("key").to_pylist()),
                                               dtype=np.int64, count=batch.num_rows))
        if "source" in cols:
            ins.sources.update(batch.column("source").to_pylist())
        if "status" in cols:
            ins.status.update(batch.column("status").to_pylist())
        for name in ("width", "height", "original_width", "original_height"):
            if name in cols:
                getattr(ins, name).add(pc.drop_null(batch.column(name)).to_numpy(zero_copy_only=False))
        if "policy" in cols:
            ins.policies.update(batch.column("policy").to_pylist())
        # Download rows: each row's own caption (failed rows included); CapFilt rows: every kept caption.
        if "caption" in cols:
            ins.caption_words.add(_word_counts(batch.column("caption")))
        elif "captions" in cols:
            ins.caption_words.add(_word_counts(pc.list_flatten(batch.column("captions"))))
        if "captions" in cols:
            ins.captions_per_image.add(pc.list_value_length(pc.drop_null(batch.column("captions")))
                                       .to_numpy(zero_copy_only=False))
        if "meta" in cols:
            meta = batch.column("meta")
            for k in META_SCORES:
                ins.meta_scores[k].add(pc.struct_field(meta, k).to_numpy(zero_copy_only=False))
            for k in META_TAGS:
                ins.meta_tags[k].update(v for v in pc.struct_field(meta, k).to_pylist() if v is not None)
        if "scores" in cols:
            ins.clip_scores.add(pc.list_flatten(batch.column("scores")).to_numpy(zero_copy_only=False))
        if "captions" in cols and "original_caption" in cols:
            for kept, orig in zip(batch.column("captions").to_pylist(),
                                  batch.column("original_caption").to_pylist()):
                ins.original_kept += bool(orig is not None and kept and orig in kept)
        if "image" in cols:
            self._images(batch, contract)
        if len(ins.samples) < self.sample:
            rows = batch.slice(0, self.sample - len(ins.samples)).to_pylist()
            ins.samples.extend(_sample_row(r) for r in rows)

    def _images(self, batch: pa.RecordBatch, contract: Contract | None) -> None:
        ins = self.ins
        capfilt = contract is not None and contract.name == "capfilt"
        images = batch.column("image").to_pylist()
        widths, heights = [], []
        for i, data in enumerate(images):
            if data is None:
                continue
            thumb = len(ins.thumbnails) < self.want_thumbs
            if not (capfilt or thumb):
                break
            try:
                jpeg, size = make_thumbnail(data) if thumb else (None, _image_size(data))
            except Exception:  # noqa: BLE001 - any undecodable image is a counted outcome
                ins.image_errors += 1
                continue
            if capfilt:
                widths.append(size[0])
                heights.append(size[1])
            if thumb:
                ins.thumbnails.append(self._thumb(batch, i, jpeg))
        if capfilt:
            ins.width.add(widths)
            ins.height.add(heights)

    @staticmethod
    def _thumb(batch: pa.RecordBatch, i: int, jpeg: bytes) -> Thumbnail:
        row = batch.slice(i, 1).to_pylist()[0]
        if "captions" in row:
            caps, scores = list(row["captions"] or []), list(row.get("scores") or [])
        else:
            caps, scores = [row.get("caption") or ""], []
        scores = scores + [None] * (len(caps) - len(scores))
        return Thumbnail(str(row.get("key")), jpeg, caps, scores)

    def finish_duplicates(self, read_keys, names: list[str]) -> None:
        """Confirm repeated key hashes with the strings: ``read_keys(name)`` is a shard's keys."""
        if not self.key_hashes:
            return
        hashes = np.concatenate(self.key_hashes)
        uniq, counts = np.unique(hashes, return_counts=True)
        dup = set(uniq[counts > 1].tolist())
        if not dup:
            return
        # Rare path: a second, key-column-only pass confirms the strings and names the shards.
        seen: dict[str, list[str]] = {}
        for name in names:
            try:
                keys = read_keys(name)
            except Exception:  # noqa: BLE001 - already reported as unreadable
                continue
            for k in keys:
                if hash(k) in dup:
                    seen.setdefault(k, []).append(name)
        dups = {k: v for k, v in seen.items() if len(v) > 1}
        self.ins.duplicate_keys = sum(len(v) - 1 for v in dups.values())
        self.ins.duplicate_examples = dict(list(sorted(dups.items()))[:10])


# -- the walk -----------------------------------------------------------------------------
def _check_manifest(ins: Inspection, manifest: dict | None, listing: dict[str, int]) -> dict:
    """Compare the manifest with the listing; returns name -> manifest shard record."""
    if manifest is None:
        if listing:
            ins.problems.append(f"{MANIFEST} is missing (a job still running, or one that never finished)")
        return {}
    records = {s["name"]: s for s in manifest.get("shards", [])}
    for name in sorted(set(records) - set(listing)):
        ins.problems.append(f"{name}: listed in the manifest but missing from storage")
    for name in sorted(set(listing) - set(records)):
        ins.problems.append(f"{name}: on storage but not in the manifest")
    for name in sorted(set(records) & set(listing)):
        if records[name].get("bytes") is not None and records[name]["bytes"] != listing[name]:
            ins.problems.append(f"{name}: size {listing[name]} bytes, manifest says {records[name]['bytes']}")
    if manifest.get("num_rows") is not None and manifest["num_rows"] != sum(s.get("rows", 0) for s in records.values()):
        ins.problems.append(f"{MANIFEST}: num_rows does not match the sum of its shards' rows")
    return records


def inspect_shards(uri: str, sample: int = 0, thumbnails: int = 0, verify: bool = False,
                   batch_size: int = ROW_GROUP_ROWS) -> Inspection:
    """Walk the shard set at ``uri`` once and return its statistics and problems.

    sample: rows to keep for printing (first rows in shard order, image bytes elided).
    thumbnails: images to keep as small JPEGs (first decodable images in shard order).
    verify: read every shard's full bytes; compare sha256, rows and schema with the manifest.
    """
    shards = ShardSet(uri)
    shards.fs.invalidate_cache(shards.root)  # fsspec instances are shared: never trust an old listing
    ins = Inspection(uri=shards.uri, verified=verify)
    try:
        manifest = shards.read_manifest()
    except Exception as e:  # noqa: BLE001 - an unreadable manifest is a finding, not a crash
        ins.problems.append(f"{MANIFEST}: unreadable ({e})")
        manifest = None
    ins.manifest = manifest
    listing = shards.committed_sizes()
    if not listing and manifest is None and (foreign := _foreign_source(uri)) is not None:
        return _inspect_foreign(foreign, ins, _Walker(ins, sample, thumbnails), batch_size)
    records = _check_manifest(ins, manifest, listing)
    expected = CONTRACTS.get((manifest or {}).get("schema", "").partition("/")[0])
    if expected is not None and expected.tag != manifest.get("schema"):
        ins.problems.append(f"{MANIFEST}: unknown schema version {manifest.get('schema')!r}")
        expected = None
    ins.contract = expected.tag if expected else None
    ins.shards, ins.bytes = len(listing), sum(listing.values())
    walker = _Walker(ins, sample, thumbnails)
    complete = not (set(records) - set(listing))  # every listed shard present ...
    for name in listing:
        complete &= _walk_shard(shards, name, records.get(name), expected, walker, verify, batch_size)
    walker.finish_duplicates(lambda n: shards.open_parquet(n).read(columns=["key"]).column("key").to_pylist(),
                             list(listing))
    # ... and read to the end: only then can the row total be compared
    if complete and manifest is not None and manifest.get("num_rows") not in (None, ins.rows):
        ins.problems.append(f"{MANIFEST}: says {manifest['num_rows']} rows, the shards hold {ins.rows}")
    if not listing:
        ins.problems.append(f"{shards.uri}: no committed shards (part-NNNNN.parquet)")
    if is_curated(manifest):
        ins.curation = inspect_curation(shards, manifest, examples=max(thumbnails // 4, 4) if thumbnails else 0,
                                        problems=ins.problems, batch_size=batch_size)
    return ins


def _foreign_source(uri: str):
    """An img2dataset or WebDataset folder read through pipelines.adapters, else None."""
    from pipelines.adapters import OwnShards, open_download_source

    try:
        source = open_download_source(uri)
    except SchemaError:
        return None
    return None if isinstance(source, OwnShards) else source


def _inspect_foreign(source, ins: Inspection, walker: _Walker, batch_size: int) -> Inspection:
    """Statistics of a folder another tool wrote, as the download-contract rows a job reads from it."""
    from pipelines.adapters import read_error

    ins.contract = f"{DOWNLOAD.tag} (read from an {source.kind})"
    for index in source.indices():
        try:
            table = source.read(index)
        except Exception as e:  # noqa: BLE001 - an unreadable shard is named, the walk goes on
            ins.problems.append(f"shard {index}: unreadable ({type(e).__name__}: {str(e)[:200]})")
            continue
        problem = read_error(table)
        if problem:
            ins.problems.append(f"shard {index}: {problem}")
            if not table.num_rows:
                continue
        ins.shards += 1
        for batch in table.to_batches(max_chunksize=batch_size):
            walker.add(batch, DOWNLOAD)
    walker.finish_duplicates(lambda n: source.read(int(n), ["key"]).column("key").to_pylist(),
                             [str(i) for i in source.indices()])
    if not ins.shards:
        ins.problems.append(f"{ins.uri}: no readable shards")
    return ins
CURATION_SCORES = ("clip_score", "aesthetic", "nsfw", "punsafe", "pwatermark")


def inspect_curation(shards: ShardSet, manifest: dict, examples: int, problems: list[str],
                     batch_size: int = ROW_GROUP_ROWS) -> Curation:
    """Stream the side table (reasons, similarities, example images) and the score table (score histograms)."""
    cur = Curation(thresholds=(manifest.get("summary") or {}).get("thresholds") or {})
    cur.scores = {name: Distribution(resolution=0.001) for name in CURATION_SCORES}
    scores, removed = ShardSet(shards.url(SCORES_DIR)), ShardSet(shards.url(REMOVED_DIR))
    for name, batch in _batches(scores, ["clip_score", "aesthetic", "nsfw", "punsafe", "pwatermark"], problems,
                                batch_size):
        cur.rows_in += batch.num_rows
        for col in CURATION_SCORES:
            cur.scores[col].add(pc.drop_null(batch.column(col)).to_numpy(zero_copy_only=False))
    for name, batch in _batches(removed, ["key", "reasons", "captions", "scores", "similarity", "duplicate_of", "image"],
                                problems, batch_size):
        cur.removed += batch.num_rows
        cur.similarity.add(pc.drop_null(batch.column("similarity")).to_numpy(zero_copy_only=False))
        rows = batch.select(["key", "reasons", "captions", "scores", "duplicate_of"]).to_pylist()
        images = batch.column("image")
        for i, row in enumerate(rows):
            cur.by_reason.update(row["reasons"])
            for reason in row["reasons"]:
                got = cur.examples.setdefault(reason, [])
                if len(got) < examples and images[i].is_valid:
                    try:
                        jpeg = make_thumbnail(images[i].as_py())[0]
                    except Exception:  # noqa: BLE001 - counted with the other image errors' kind: skipped
                        continue
                    note = "removed: " + ", ".join(row["reasons"]) + (
                        f" (duplicate of {row['duplicate_of']})" if row["duplicate_of"] else "")
                    got.append(Thumbnail(row["key"], jpeg, list(row["captions"] or []), list(row["scores"] or []), note))
    cur.kept = cur.rows_in - cur.removed
    cur.by_reason = Counter({r: cur.by_reason[r] for r in REASONS if cur.by_reason[r]})
    return cur


def _batches(ss: ShardSet, columns: list[str], problems: list[str], batch_size: int):
    for name in ss.committed():
        try:
            for batch in ss.open_parquet(name).iter_batches(batch_size=batch_size, columns=columns):
                yield name, batch
        except Exception as e:  # noqa: BLE001 - a bad side-table shard is named, the walk goes on
            problems.append(f"{ss.url(name)}: unreadable ({type(e).__name__}: {str(e)[:200]})")


def _walk_shard(shards: ShardSet, name: str, record: dict | None, expected: Contract | None,
                walker: _Walker, verify: bool, batch_size: int) -> bool:
    """Accumulate one shard; False when it could not be read to the end (the problem is recorded)."""
    ins = walker.ins
    try:
        if verify:
            data = shards.fs.cat(shards.path(name))
            digest = hashlib.sha256(data).hexdigest()
            if record is not None and record.get("sha256") and record["sha256"] != digest:
                ins.problems.append(f"{name}: sha256 {digest[:12]}… does not match the manifest's "
                                    f"{record['sha256'][:12]}… (corrupted)")
            pf = pq.ParquetFile(io.BytesIO(data))
        else:
            pf = shards.open_parquet(name)
        schema = pf.schema_arrow
        declared = contract_of(schema)
        ins.schema_versions[declared.tag if declared else "undeclared"] += 1
        contract = expected or declared
        if ins.contract is None and declared is not None:
            ins.contract = declared.tag
        if contract is not None:
            validate(schema, contract, where=name)
        if record is not None and record.get("rows") is not None and pf.metadata.num_rows != record["rows"]:
            ins.problems.append(f"{name}: {pf.metadata.num_rows} rows, manifest says {record['rows']}")
        # Without --verify skip the heavy columns we do not need (download images, candidates).
        columns = None if verify else [
            c for c in schema.names
            if c != "candidates" and (c != "image" or walker.needs_images(contract))]
        for batch in pf.iter_batches(batch_size=batch_size, columns=columns):
            walker.add(batch, contract)
        return True
    except SchemaError as e:
        ins.problems.append(f"{name}: {e}")
    except Exception as e:  # noqa: BLE001 - a corrupt shard is named, the walk goes on
        ins.problems.append(f"{name}: unreadable ({type(e).__name__}: {str(e)[:200]})")
    return False
