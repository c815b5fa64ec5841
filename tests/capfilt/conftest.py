"""Download-contract shard sets built from the synthetic corpus, with the web's bad rows mixed in."""
from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from pipelines.schema import DOWNLOAD
from pipelines.shardio import ShardSet
from tests.helpers.shards import download_row, write_set

LONG_CAPTION = " ".join(["a red circle above a blue square"] * 20)  # far beyond CLIP's 32-token tiny context


def write_download_set(uri: str, shards: list[list[dict]]) -> ShardSet:
    return write_set(uri, DOWNLOAD, shards)


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


@pytest.fixture(scope="session")
def hostile_input(tmp_path_factory, corpus):
    """(uri, expected): a local download shard set with the bad rows of :func:`hostile_shards`."""
    corpus_dir, items = corpus
    shards, expected = hostile_shards(Path(corpus_dir), items)
    uri = str(tmp_path_factory.mktemp("download") / "set")
    write_download_set(uri, shards)
    return uri, expected
