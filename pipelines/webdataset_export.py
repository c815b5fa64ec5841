"""A CapFilt shard set as WebDataset ``.tar`` shards, for open_clip-style trainers.

CapFilt shard ``part-NNNNN.parquet`` becomes ``NNNNN.tar``; each sample holds

    <key>.jpg (or .png/.webp, as stored)   the image bytes as they are in the shard
    <key>.txt                              the best caption (the first kept one)
    <key>.json                             key, captions, scores, source, policy, url, original_caption, meta

and ``sizes.json`` (shard name → samples, what open_clip reads for the dataset size) is written
last. Sample keys are the row keys with ``/`` and ``.`` replaced by ``_`` (WebDataset splits
member names at them); the json keeps the original key. Tars are written with the webdataset
package's ``TarWriter``, one Ray task per shard, all or nothing (``ShardSet.put``), so a rerun
skips the tars already there. Ray Data's
``write_webdataset`` names its files by block, which neither a ``{00000..N}.tar`` pattern nor
a resume can rely on.
"""
from __future__ import annotations

import io
import json
import re

from pipelines.schema import CAPFILT
from pipelines.shardio import ShardSet, shard_index, shard_name

SIZES = "sizes.json"
_KEY_UNSAFE = re.compile(r"[/.]")


def sample_key(key: str) -> str:
    return _KEY_UNSAFE.sub("_", key)


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
    buf = io.BytesIO()
    with wds.TarWriter(buf, encoder=False) as sink:
        for row in table.to_pylist():
            info = {k: row[k] for k in ("key", "captions", "scores", "source", "policy", "url", "original_caption",
                                        "meta")}
            sink.write({"__key__": sample_key(row["key"]), image_ext(row["image"]): row["image"],
                        "txt": row["captions"][0].encode("utf-8"), "json": json.dumps(info).encode("utf-8")})
    dst.put(tar_name(index), buf.getvalue())
    return table.num_rows


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
    ray.get([task.remote(src.uri, dst.uri, i) for i in todo])
    sizes = dict(zip((tar_name(i) for i in indices), src.map_members(lambda n: src.shard_info(n).rows, src.committed())))
    dst.fs.pipe(dst.path(SIZES), json.dumps(sizes, indent=1).encode())
    log(f"webdataset export: {len(todo)} tars written, {len(indices) - len(todo)} already there")
    pattern = f"{dst.uri}/{{{min(indices):05d}..{max(indices):05d}}}.tar" if indices else None
    return {"tars": len(indices), "written": len(todo), "samples": sum(sizes.values()), "pattern": pattern}
