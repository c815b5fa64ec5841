"""Rows of the Parquet contracts and shard sets made of them: one builder per contract, shared by
every test that writes shards by hand (the jobs' own outputs are tested through the jobs)."""
from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pyarrow as pa
from PIL import Image

from pipelines.schema import CAPFILT, DOWNLOAD, Contract
from pipelines.shardio import ShardSet


def download_row(key: str, caption: str | None, image: bytes | None, status: str = "ok", *, source: str = "synthetic",
                 policy: str = "web", url: str | None = None, captions: list[str] | None = None,
                 error: str | None = None, size: int = 96, duplicate_of: str | None = None) -> dict:
    """A DOWNLOAD row; an ok row's ``captions`` default to its own caption."""
    ok = status == "ok"
    return dict(key=key, source=source, policy=policy, url=url or f"http://127.0.0.1:1/{key}", caption=caption,
                captions=(captions if captions is not None else [caption]) if ok else None,
                duplicate_of=duplicate_of, meta=None, image=image,
                width=size if ok else None, height=size if ok else None,
                original_width=size if ok else None, original_height=size if ok else None, status=status,
                error=None if ok else (error or status), sha256=hashlib.sha256(image).hexdigest() if image else None)


def capfilt_row(key: str, image: bytes, captions: list[str], scores: list[float], *, source: str = "synthetic",
                policy: str = "web", candidates: list[dict] | None = None, original_caption: str | None = None) -> dict:
    """A CAPFILT row."""
    return dict(key=key, source=source, policy=policy, url=f"http://127.0.0.1:1/{key}",
                sha256=hashlib.sha256(image).hexdigest(), meta=None, image=image, captions=captions, scores=scores,
                candidates=candidates, original_caption=original_caption if original_caption is not None else captions[0])


def write_set(uri: str, contract: Contract, shards: list[list[dict]], manifest: bool = False,
              config: dict | None = None) -> ShardSet:
    """Shard i of ``uri`` holds ``shards[i]``, committed through the real ShardSet protocol."""
    ss = ShardSet(uri)
    for i, rows in enumerate(shards):
        ss.write_shard(i, pa.Table.from_pylist(rows, schema=contract.arrow_schema()), contract)
    if manifest:
        ss.write_manifest(contract, config=config)
    return ss


# -- shard sets made from the synthetic corpus --------------------------------------------


def download_rows(corpus, start: int, n: int, failures: int = 1) -> list[dict]:
    """``n`` ok rows from the corpus plus ``failures`` http_error rows."""
    root, items = corpus
    rows = [download_row(f"synthetic/{it.index:06d}", it.caption, (root / it.file).read_bytes(),
                         url=f"http://127.0.0.1:1/{it.file}") for it in items[start:start + n]]
    rows += [download_row(f"web/{start:03d}-{j}", "a lost picture", None, "http_error", source="web",
                          url=f"http://127.0.0.1:1/missing/{start}-{j}", error="404 Not Found")
             for j in range(failures)]
    return rows


def write_download_set(uri: str, corpus, shards: int = 3, per_shard: int = 8, manifest: bool = True) -> ShardSet:
    return write_set(uri, DOWNLOAD, [download_rows(corpus, s * per_shard, per_shard) for s in range(shards)],
                     manifest=manifest, config={"test": True})


def capfilt_rows(corpus, start: int, n: int) -> list[dict]:
    """Every third row keeps its original (true) caption first; the others keep two synthetic ones."""
    root, items = corpus
    rows = []
    for it in items[start:start + n]:
        synthetic = [f"a picture of {it.colors[0]} things", f"a picture of a {it.shapes[0]}"]
        if it.index % 3 == 0:
            captions, scores = [it.caption, synthetic[0]], [0.35, 0.30]
        else:
            captions, scores = synthetic, [0.32, 0.28]
        cands = [dict(caption=c, score=s, synthetic=c != it.caption) for c, s in zip(captions, scores)]
        rows.append(capfilt_row(f"synthetic/{it.index:06d}", (root / it.file).read_bytes(), captions, scores,
                                candidates=cands, original_caption=it.caption))
    return rows


def write_capfilt_set(uri: str, corpus, shards: int = 2, per_shard: int = 12) -> ShardSet:
    return write_set(uri, CAPFILT, [capfilt_rows(corpus, s * per_shard, per_shard) for s in range(shards)],
                     manifest=True, config={"test": True})


def corrupt_middle(path) -> None:
    """Flip bytes in the middle of a file, keeping its size (only a checksum can tell)."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 64] = bytes(b ^ 0x5A for b in data[mid:mid + 64])
    path.write_bytes(bytes(data))


LONG_CAPTION = " ".join(["a red circle above a blue square"] * 20)  # far beyond CLIP's 32-token tiny context


def hostile_shards(corpus_dir: Path, items, per_shard: int = 5) -> tuple[list[list[dict]], dict]:
    """Three shards of good images plus bad rows, and one shard with no ok row at all.

    Returns (shards, expected) where expected names the keys each outcome must get.
    """
    good = [download_row(f"syn/{it.index:04d}", it.caption, (corpus_dir / it.file).read_bytes())
            for it in items[: 3 * per_shard]]
    jpeg = (corpus_dir / items[0].file).read_bytes()
    cmyk = io.BytesIO()
    Image.new("CMYK", (40, 30), (10, 200, 30, 0)).save(cmyk, format="JPEG")
    shards = [good[i * per_shard:(i + 1) * per_shard] for i in range(3)]
    shards[0] += [download_row("bad/garbage", "a red circle", b"this is not an image"),
                  download_row("bad/http", "a red circle", None, status="http_error")]
    shards[1] += [download_row("bad/empty-bytes", "a blue square", b""),
                  download_row("bad/truncated", "a blue square", jpeg[: len(jpeg) // 3])]
    shards[2] += [download_row("odd/empty-caption", "", (corpus_dir / items[20].file).read_bytes()),
                  download_row("odd/long-caption", LONG_CAPTION, (corpus_dir / items[21].file).read_bytes()),
                  download_row("odd/cmyk", "a green square", cmyk.getvalue())]
    shards.append([download_row("bad/timeout", "a red circle", None, status="timeout")])
    expected = {
        "out": sorted([r["key"] for r in good] + ["odd/empty-caption", "odd/long-caption", "odd/cmyk"]),
        "undecodable": 2, "zero_size": 1, "rows_not_ok": 2,
    }
    return shards, expected
