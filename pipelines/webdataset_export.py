"""A CapFilt shard set as WebDataset ``.tar`` shards, for open_clip-style trainers.

CapFilt shard ``part-NNNNN.parquet`` becomes ``NNNNN.tar``; each sample holds

    <key>.jpg (or .png/.webp, as stored)   the image bytes as they are in the shard
    <key>.txt                              the best caption (the first kept one)
    <key>.json                             key, captions, scores, source, policy, url, original_caption, meta

and ``sizes.json`` (shard name → samples written, what open_clip reads for the dataset size) is
written last. Sample keys are the row keys with ``%``, ``/``, ``.`` and ``#`` percent-escaped
(WebDataset splits member names at ``/`` and ``.``): distinct keys stay distinct and
:func:`original_key` reverses it; a key that repeats in a shard gets ``#2``, ``#3``, ... (readers
refuse a tar with two members of one name). The json keeps the original key. A row without an
image or without a caption cannot be a training sample: it is skipped and counted (``skipped``). Tars are written with the webdataset
package's ``TarWriter``, one Ray task per shard, all or nothing (``ShardSet.put``), so a rerun
skips the tars already there. Ray Data's
``write_webdataset`` names its files by block, which neither a ``{00000..N}.tar`` pattern nor
a resume can rely on.
"""
from __future__ import annotations

import io
import json
import urllib.parse

from pipelines.schema import CAPFILT
from pipelines.shardio import ShardSet, shard_index, shard_name

SIZES = "sizes.json"
_KEY_ESCAPES = {"%": "%25", "/": "%2F", ".": "%2E", "#": "%23"}  # "%" first: the escape itself


def sample_key(key: str) -> str:
    """``key`` as a WebDataset sample key: injective, no ``/`` or ``.``, reversed by :func:`original_key`."""
    return "".join(_KEY_ESCAPES.get(c, c) for c in key)


def original_key(sample: str) -> str:
    """The row key of a :func:`sample_key` (a ``#N`` repeat number dropped)."""
    return urllib.parse.unquote(sample.split("#", 1)[0])


def exportable(row: dict) -> bool:
    """Whether a CapFilt row can be a training sample (foreign shards may hold null images or no captions)."""
    return row["image"] is not None and bool(row["captions"])


def image_ext(data: bytes) -> str:
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return "jpg"


def tar_name(index: int) -> str:
    return f"{index:05d}.tar"


def export_shard(src_uri: str, dst_uri: str, index: int) -> int:
    """Write ``NNNNN.tar`` from CapFilt shard ``index``; returns its samples."""
    import webdataset as wds

    src, dst = ShardSet(src_uri), ShardSet(dst_uri)
    table = src.read_shard(shard_name(index), CAPFILT)
    buf, seen, written = io.BytesIO(), {}, 0
    with wds.TarWriter(buf, encoder=False) as sink:
        for row in filter(exportable, table.to_pylist()):
            info = {k: row[k] for k in ("key", "captions", "scores", "source", "policy", "url", "original_caption",
                                        "meta")}
            key = sample_key(row["key"])
            seen[key] = seen.get(key, 0) + 1
            sink.write({"__key__": key if seen[key] == 1 else f"{key}#{seen[key]}",
                        image_ext(row["image"]): row["image"],
                        "txt": row["captions"][0].encode("utf-8"), "json": json.dumps(info).encode("utf-8")})
            written += 1
    dst.put(tar_name(index), buf.getvalue())
    return written


def exportable_rows(src_uri: str, index: int) -> int:
    """The samples :func:`export_shard` writes for shard ``index`` (for tars a rerun finds there)."""
    table = ShardSet(src_uri).open_parquet(shard_name(index)).read(columns=["image", "captions"])
    return sum(map(exportable, table.to_pylist()))


def export_webdataset(src_uri: str, dst_uri: str, log=print) -> dict:
    """Export every committed shard of the CapFilt set ``src_uri`` (Ray must be initialised)."""
    import ray

    src, dst = ShardSet(src_uri), ShardSet(dst_uri)
    src.check_schema(CAPFILT)
    dst.check_writable()
    dst.makedirs()
    indices = [shard_index(n) for n in src.committed()]
    existing = {p.rsplit("/", 1)[-1] for p in dst.fs.ls(dst.root, detail=False)} if dst.fs.exists(dst.root) else set()
    todo = [i for i in indices if tar_name(i) not in existing]
    task = ray.remote(export_shard).options(num_cpus=0.5, max_retries=2)
    count = ray.remote(exportable_rows).options(num_cpus=0.5, max_retries=2)
    samples = ray.get([(task if i in todo else count).remote(*((src.uri, dst.uri, i) if i in todo else (src.uri, i)))
                       for i in indices])
    sizes = {tar_name(i): n for i, n in zip(indices, samples)}  # what the tars hold, not the shards' rows
    rows = sum(src.map_members(lambda n: src.shard_info(n).rows, src.committed()))
    dst.fs.pipe(dst.path(SIZES), json.dumps(sizes, indent=1).encode())
    skipped = rows - sum(sizes.values())
    log(f"webdataset export: {len(todo)} tars written, {len(indices) - len(todo)} already there"
        + (f"; {skipped} rows without an image or a caption skipped" if skipped else ""))
    pattern = f"{dst.uri}/{{{min(indices):05d}..{max(indices):05d}}}.tar" if indices else None
    return {"tars": len(indices), "written": len(todo), "samples": sum(sizes.values()), "skipped": skipped,
            "pattern": pattern}
