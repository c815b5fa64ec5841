"""The download job on local Ray against real loopback servers: every bad-input kind gets its status."""
from __future__ import annotations

import dataclasses
import io
import struct
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.config import DownloadConfig
from pipelines.download import format_summary, plan_partitions, run_download
from pipelines.download_worker import Rejected, check_image, status_of_fetch_error
from pipelines.schema import DOWNLOAD, SchemaError
from pipelines.shardio import ShardSet
from pipelines.sources import open_url_lists
from tests.helpers.servers import start_http_server, start_recording_server


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares a huge size in its header (a decompression bomb's calling card)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def hostile_images(good_jpeg: bytes) -> dict[str, bytes]:
    rgb = Image.new("RGB", (40, 30), (200, 40, 40))
    gradient16 = Image.fromarray(np.arange(40 * 30, dtype=np.uint16).reshape(30, 40) * 50)
    rgba = Image.new("RGBA", (40, 30), (0, 0, 255, 0))  # fully transparent blue → white
    return {
        "corrupt.jpg": b"\xff\xd8\xff\xe0 this is not really a jpeg" * 10,
        "truncated.jpg": good_jpeg[: len(good_jpeg) // 2],
        "text.jpg": b"<html>not an image</html>",
        "cmyk.jpg": encoded(Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "JPEG"),
        "palette.png": encoded(rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=4), "PNG"),
        "gray16.png": encoded(gradient16, "PNG"),
        "alpha.png": encoded(rgba, "PNG"),
        "gray.png": encoded(rgb.convert("L"), "PNG"),
        "bomb.png": png_header_only(12_000, 12_000),
        "webp.webp": encoded(rgb, "WEBP"),
    }


@pytest.fixture(scope="module")
def hostile_server(tmp_path_factory, corpus):
    root = tmp_path_factory.mktemp("hostile")
    good = (corpus[0] / corpus[1][0].file).read_bytes()
    for name, data in hostile_images(good).items():
        (root / name).write_bytes(data)
    server = start_http_server(root)
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def recorder():
    server = start_recording_server("127.0.0.2")
    yield server
    server.shutdown()
    server.server_close()


def write_tsv(path, rows: list[tuple[str, bytes | str]]):
    with open(path, "wb") as f:
        for url, caption in rows:
            f.write(url.encode() + b"\t" + (caption if isinstance(caption, bytes) else caption.encode()) + b"\n")


def hostile_list(http_server, hostile_server, recorder, corpus) -> list[tuple[str, bytes | str, str]]:
    """(url, caption, expected status), one row per bad-input kind plus good rows."""
    b, h = http_server.base_url, hostile_server.base_url
    r = f"http://127.0.0.2:{recorder.server_address[1]}"
    items = corpus[1]
    rows = [(f"{b}/{it.file}", it.caption, "ok") for it in items[:6]]
    rows += [
        (f"{b}/status/404", "missing", "http_error"),
        (f"{b}/status/500", "server error", "http_error"),
        (f"{b}/sleep/3/{items[6].file}", "slow", "timeout"),
        (f"{b}/loop/0", "loop", "redirect_error"),
        (f"{b}/redirect?to=/{items[7].file}", "same-host redirect", "ok"),
        (f"{b}/{items[12].file}?q=café", "non-ASCII URL", "ok"),
        (f"{b}/redirect?to={r}/latest/meta-data", "redirect to another loopback address", "blocked"),
        (f"{r}/direct.jpg", "loopback not on the allow-list", "blocked"),
        (f"{b}/redirect?to=file:///etc/passwd", "redirect to file", "blocked"),
        ("ftp://127.0.0.1/a.jpg", "ftp", "blocked"),
        ("file:///etc/passwd", "file", "blocked"),
        ("http://127.0.0.1:1/refused.jpg", "connection refused", "network_error"),
        (f"{h}/corrupt.jpg", "corrupt", "decode_error"),
        (f"{h}/truncated.jpg", "truncated", "decode_error"),
        (f"{h}/text.jpg", "html", "decode_error"),
        (f"{h}/cmyk.jpg", "cmyk", "ok"),
        (f"{h}/palette.png", "palette", "ok"),
        (f"{h}/gray16.png", "16-bit", "ok"),
        (f"{h}/alpha.png", "alpha", "ok"),
        (f"{h}/gray.png", "grayscale", "ok"),
        (f"{h}/webp.webp", "webp", "ok"),
        (f"{h}/bomb.png", "bomb", "too_large"),
        (f"{b}/{items[8].file}", "", "bad_caption"),
        (f"{b}/{items[9].file}", "   ", "bad_caption"),
        (f"{b}/{items[10].file}", b"caf\xe9 \xff", "bad_caption"),
        (f"{b}/{items[0].file}", "same url again", "duplicate"),
        (f"{h}/cmyk.jpg", "same url again", "duplicate"),
        (f"{b}/{items[11].file}", "", "bad_caption"),   # first occurrence has a bad caption ...
        (f"{b}/{items[11].file}", "good caption", "ok"),  # ... so this one downloads
    ]
    return rows


def base_cfg(tmp_path, input_path, output, **kw) -> DownloadConfig:
    return DownloadConfig(input=str(input_path), source="cc12m", output=output, image_size=32,
                          rows_per_shard=8, threads=4, timeout=1.0, max_pixels=50_000_000,
                          partitions_per_wave=2,  # several Ray Data waves in one run
                          allow_hosts=["127.0.0.1"], **kw)


def read_output(uri: str) -> pa.Table:
    shards = ShardSet(uri)
    return pa.concat_tables([shards.read_shard(n, DOWNLOAD) for n in shards.committed()])


@pytest.mark.slow
def test_every_bad_input_gets_its_status(tmp_path, ray_local, http_server, hostile_server, recorder, corpus):
    rows = hostile_list(http_server, hostile_server, recorder, corpus)
    write_tsv(tmp_path / "list.tsv", [(u, c) for u, c, _ in rows])
    cfg = base_cfg(tmp_path, tmp_path / "list.tsv", str(tmp_path / "out"))
    summary = run_download(cfg, progress=False)

    out = read_output(cfg.output)
    got = {r["key"]: r for r in out.to_pylist()}
    assert sorted(got) == sorted(f"cc12m/{i}" for i in range(len(rows)))  # each key exactly once
    assert out.num_rows == len(rows)
    statuses = {f"cc12m/{i}": s for i, (_, _, s) in enumerate(rows)}
    assert {k: r["status"] for k, r in got.items()} == statuses
    assert recorder.seen == []  # nothing was ever fetched from 127.0.0.2

    for key, row in got.items():
        if row["status"] == "ok":
            img = Image.open(io.BytesIO(row["image"]))
            assert img.mode == "RGB" and img.format == "JPEG"
            assert min(img.size) == 32 and (row["width"], row["height"]) == img.size
            assert row["sha256"] and row["error"] is None
        else:
            assert row["image"] is None and row["error"]
    alpha = next(r for r in got.values() if r["url"].endswith("alpha.png"))
    assert np.asarray(Image.open(io.BytesIO(alpha["image"]))).min() > 240  # transparent → white
    dup = next(r for r in got.values() if r["caption"] == "same url again" and "cmyk" in r["url"])
    first_cmyk = next(k for k, r in got.items() if r["url"].endswith("cmyk.jpg") and r["caption"] == "cmyk")
    assert dup["error"] == f"duplicate of {first_cmyk}"

    expected_counts = {}
    for _, _, s in rows:
        expected_counts[s] = expected_counts.get(s, 0) + 1
    assert {k: v for k, v in summary["by_status"].items() if v} == expected_counts
    assert summary["complete"] and summary["input_rows"] == len(rows)
    manifest = ShardSet(cfg.output).read_manifest()
    assert manifest["num_rows"] == len(rows) and manifest["config"]["allow_hosts"] == ["127.0.0.1"]
    text = format_summary(summary, cfg.output)
    assert "blocked" in text and "cc12m" in text and "images/s" in text

    # Re-running a finished job does no work and changes nothing.
    again = run_download(cfg, progress=False)
    assert again["this_run_rows"] == 0 and again["resumed_rows"] == len(rows)
    assert again["by_status"] == summary["by_status"]


@pytest.mark.slow
def test_download_to_s3(tmp_path, ray_local, s3_bucket, http_server, corpus):
    items = corpus[1][:10]
    pq.write_table(pa.table({"URL": [f"{http_server.base_url}/{it.file}" for it in items],
                             "TEXT": [it.caption for it in items]}), tmp_path / "laion.parquet")
    cfg = dataclasses.replace(base_cfg(tmp_path, tmp_path / "laion.parquet", f"{s3_bucket}/dl"), source="auto")
    summary = run_download(cfg, progress=False)
    assert summary["by_source"] == {"laion": {"ok": 10}}, read_output(f"{s3_bucket}/dl").drop(["image"]).to_pylist()[:2]
    shards = ShardSet(f"{s3_bucket}/dl")
    assert shards.committed() == ["part-00000.parquet", "part-00001.parquet"]
    out = read_output(shards.uri)
    assert out.column("caption").to_pylist() == [it.caption for it in items]
    assert shards.read_manifest()["num_rows"] == 10


def test_missing_column_fails_before_any_work(tmp_path):
    pq.write_table(pa.table({"URL": ["http://127.0.0.1/x.jpg"], "caption": ["c"]}), tmp_path / "l.parquet")
    cfg = DownloadConfig(input=str(tmp_path / "l.parquet"), source="laion", output=str(tmp_path / "out"))
    with pytest.raises(SchemaError, match="missing column 'TEXT'"):
        run_download(cfg)  # raises before Ray is needed or anything is written
    assert not (tmp_path / "out").exists()


def test_resume_refuses_a_different_plan(tmp_path, ray_local, http_server, corpus):
    write_tsv(tmp_path / "l.tsv", [(f"{http_server.base_url}/{it.file}", it.caption) for it in corpus[1][:3]])
    cfg = base_cfg(tmp_path, tmp_path / "l.tsv", str(tmp_path / "out"))
    run_download(cfg, progress=False)
    with pytest.raises(ValueError, match="different input or rows_per_shard"):
        run_download(dataclasses.replace(cfg, rows_per_shard=2), progress=False)


def test_partitions_are_fixed_and_mark_duplicates(tmp_path):
    rows = [(f"http://h.example/{i % 7}.jpg", f"c{i}") for i in range(20)]
    write_tsv(tmp_path / "l.tsv", rows)
    lists = open_url_lists(str(tmp_path / "l.tsv"), "cc12m")
    parts = list(plan_partitions(lists, 6))
    assert [i for i, _ in parts] == [0, 1, 2, 3] and [p.num_rows for _, p in parts] == [6, 6, 6, 2]
    allrows = pa.concat_tables([p for _, p in parts]).to_pylist()
    assert [r["key"] for r in allrows] == [f"cc12m/{i}" for i in range(20)]
    assert [r["duplicate_of"] for r in allrows] == [None] * 7 + [f"cc12m/{i % 7}" for i in range(7, 20)]
    assert {r["partition"] for r in allrows[6:12]} == {1}


def test_check_image_maps_bombs_and_corruption():
    with pytest.raises(Rejected) as e:
        check_image(png_header_only(12_000, 12_000), max_pixels=40_000_000)
    assert e.value.status == "too_large"
    # Over PIL's own limit (2 × MAX_IMAGE_PIXELS) its DecompressionBombError is mapped too.
    with pytest.raises(Rejected) as e:
        check_image(png_header_only(20_000, 20_000), max_pixels=10**12)
    assert e.value.status == "too_large" and "decompression bomb" in str(e.value).lower()
    with pytest.raises(Rejected) as e:
        check_image(b"GIF89a garbage", max_pixels=10**6)
    assert e.value.status == "decode_error"
    data, w, h = check_image(encoded(Image.new("CMYK", (5, 4)), "JPEG"), 10**6)
    assert (w, h) == (5, 4) and Image.open(io.BytesIO(data)).mode == "RGB"
    gray16 = Image.fromarray(np.full((4, 5), 65535, np.uint16))
    data, _, _ = check_image(encoded(gray16, "PNG"), 10**6)
    assert np.asarray(Image.open(io.BytesIO(data))).min() == 255  # full-scale 16-bit → 8-bit white


@pytest.mark.parametrize("message,status", [
    ("HTTP Error 404: Not Found", "http_error"),
    ("<urlopen error timed out>", "timeout"),
    ("The read operation timed out", "timeout"),
    ("<urlopen error blocked: 10.0.0.1 is private>", "blocked"),
    ("<urlopen error redirect_error: more than 5 redirects>", "redirect_error"),
    ("<urlopen error [Errno 111] Connection refused>", "network_error"),
    ("Use of image disallowed by X-Robots-Tag directive", "blocked"),
])
def test_fetch_error_messages_map_to_statuses(message, status):
    assert status_of_fetch_error(message) == status


def test_cli_refuses_missing_column_before_starting_ray(tmp_path, capsys):
    from orchestration.cli import main

    (tmp_path / "gcc.tsv").write_text("only-a-caption\n")
    rc = main(["download", "--input", str(tmp_path / "gcc.tsv"), "--source", "cc3m",
               "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "missing column 'url'" in err and str(tmp_path / "gcc.tsv") in err
    assert not (tmp_path / "out").exists()


def test_duplicate_index_across_chunks_matches_a_plain_dict():
    import random

    from pipelines.download_dedup import DuplicateIndex

    rng = random.Random(0)
    urls = [f"http://h.example/{rng.randrange(300)}.jpg" if rng.random() > 0.05 else None for _ in range(2000)]
    bad = [("empty caption" if rng.random() < 0.05 else None) for _ in urls]
    keys = [f"{'laion' if i < 1200 else 'cc3m'}/{i if i < 1200 else i - 1200}" for i in range(len(urls))]
    table = pa.table({"key": keys, "url": urls, "caption_error": bad})
    index, got = DuplicateIndex(), []
    for start in range(0, len(urls), 333):  # uneven chunks
        got += index.mark(table.slice(start, 333)).to_pylist()
    first, want = {}, []
    for k, u, b in zip(keys, urls, bad):
        if not u or b:
            want.append(None)
            continue
        want.append(first.get(u))
        first.setdefault(u, k)
    assert got == want and sum(x is not None for x in got) > 1000
    assert len(index.digests) == len(first) and index.digests.nbytes + index.first.nbytes == 16 * len(first)
