"""CapFilt's CLIP embeddings on disk, in clip-retrieval's layout (one file of each kind per shard).

    embeddings/img_emb/img_emb_NNNNN.npy            float16 [rows, dim], L2-normalised image embeddings
    embeddings/text_emb/text_emb_NNNNN.npy          the best kept caption's text embedding
    embeddings/metadata/metadata_NNNNN.parquet      key, caption, original_caption, score

Rows are aligned with ``part-NNNNN.parquet``; an empty shard has no embedding files.
"""
from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.shardio import ShardSet

EMBEDDINGS_DIR = "embeddings"
KINDS = ("img_emb", "text_emb", "metadata")


def embedding_paths(index: int) -> dict[str, str]:
    """clip-retrieval's on-disk layout, one file of each kind per shard, rows aligned with the shard."""
    return {"img_emb": f"{EMBEDDINGS_DIR}/img_emb/img_emb_{index:05d}.npy",
            "text_emb": f"{EMBEDDINGS_DIR}/text_emb/text_emb_{index:05d}.npy",
            "metadata": f"{EMBEDDINGS_DIR}/metadata/metadata_{index:05d}.parquet"}


def write_embeddings(dst: ShardSet, index: int, shard: pa.Table, img_emb: np.ndarray, text_emb: np.ndarray) -> None:
    """Write shard ``index``'s embeddings (rows aligned with the CAPFILT table ``shard``); nothing when empty."""
    if shard.num_rows == 0:
        return
    paths = embedding_paths(index)
    for kind in KINDS:
        dst.makedirs(f"{EMBEDDINGS_DIR}/{kind}")
    for kind, rows in (("img_emb", img_emb), ("text_emb", text_emb)):
        buf = io.BytesIO()
        np.save(buf, np.asarray(rows).astype(np.float16))  # clip-retrieval stores float16
        dst.fs.pipe(dst.path(paths[kind]), buf.getvalue())
    captions, scores = shard.column("captions").to_pylist(), shard.column("scores").to_pylist()
    meta = pa.table({"key": shard.column("key"),
                     "caption": pa.array([c[0] if c else None for c in captions], pa.string()),
                     "original_caption": shard.column("original_caption"),
                     "score": pa.array([s[0] if s else None for s in scores], pa.float32())})
    buf = io.BytesIO()
    pq.write_table(meta, buf)
    dst.fs.pipe(dst.path(paths["metadata"]), buf.getvalue())


def has_embeddings(src: ShardSet, index: int) -> bool:
    return src.fs.exists(src.path(embedding_paths(index)["img_emb"]))


def read_embeddings(src: ShardSet, index: int, kind: str = "img_emb") -> np.ndarray:
    """One shard's ``img_emb`` or ``text_emb`` array (float16, as stored)."""
    return np.load(io.BytesIO(src.fs.cat(src.path(embedding_paths(index)[kind]))))


def read_embedding_rows(src: ShardSet, index: int, rows: list[int], kind: str = "img_emb") -> np.ndarray:
    """Some rows of one shard's embeddings (float16), by range reads: never the whole file."""
    with src.fs.open(src.path(embedding_paths(index)[kind]), "rb", block_size=1 << 16) as f:
        fmt = np.lib.format
        header = fmt.read_array_header_1_0 if fmt.read_magic(f) == (1, 0) else fmt.read_array_header_2_0
        shape, _, dtype = header(f)
        start, width = f.tell(), int(np.prod(shape[1:])) * dtype.itemsize
        out = np.empty((len(rows), *shape[1:]), dtype)
        for i, r in enumerate(rows):
            f.seek(start + int(r) * width)
            out[i] = np.frombuffer(f.read(width), dtype).reshape(shape[1:])
    return out


def read_metadata(src: ShardSet, index: int) -> pa.Table:
    return pq.read_table(io.BytesIO(src.fs.cat(src.path(embedding_paths(index)["metadata"]))))
