"""The download job on local Ray against real loopback servers: every input row ends in one counted status,
in bounded time, whatever the server does."""
from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.config import DownloadConfig
from pipelines.download import format_summary, run_download
from pipelines.schema import DOWNLOAD, SchemaError
from pipelines.shardio import ShardSet
from tests.helpers.images import encoded, png_header_only
from tests.helpers.servers import pids_running, start_http_server


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
        "pixel.gif": encoded(Image.new("P", (1, 1)), "GIF"),  # a tracking pixel
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
        (f"{b}/status/500?reason=blocked:%20spoofed", "server error that says blocked", "http_error"),
        (f"{b}/sleep/3/{items[6].file}", "slow", "timeout"),
        (f"{b}/drip?n=100000&interval=0.2", "slow-drip body", "timeout"),
        (f"{b}/slowheaders?interval=0.2", "slow-drip headers", "timeout"),
        (f"{b}/endless", "endless body", "too_large"),
        (f"{b}/ratelimit/job1/{items[13].file}?n=1&after=1", "429 once, then ok", "ok"),
        (f"{b}/ratelimit/job2/{items[14].file}?n=99&after=1", "429 for ever", "rate_limited"),
        (f"{b}/robots/{items[15].file}?tag=noai", "opted out", "opted_out"),
        (f"{b}/loop/0", "loop", "redirect_error"),
        (f"{b}/redirect?to=/{items[7].file}", "same-host redirect", "ok"),
        (f"{b}/{items[12].file}?q=café", "non-ASCII URL", "ok"),
        (b.replace("http://", "http://user:pw@") + f"/{items[16].file}", "user info in the URL", "ok"),
        (f"{b}/redirect?to={r}/latest/meta-data", "redirect to another loopback address", "blocked"),
        (f"{r}/direct.jpg", "loopback not on the allow-list", "blocked"),
        (f"{b}/redirect?to=file:///etc/passwd", "redirect to file", "blocked"),
        ("ftp://127.0.0.1/a.jpg", "ftp", "blocked"),
        ("file:///etc/passwd", "file", "blocked"),
        ("images/relative.jpg", "a path, not a URL", "invalid_url"),
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
        (f"{h}/pixel.gif", "tracking pixel", "too_small"),
        (f"{b}/{items[8].file}", "", "bad_caption"),
        (f"{b}/{items[9].file}", "   ", "bad_caption"),
        (f"{b}/{items[10].file}", b"caf\xe9 \xff", "bad_caption"),
        (f"{b}/{items[0].file}", "same url again", "duplicate"),
        (f"{h}/cmyk.jpg", "same url again", "duplicate"),
        (f"{b}/{items[11].file}", "", "bad_caption"),   # first occurrence has a bad caption ...
        (f"{b}/{items[11].file}", "good caption", "ok"),  # ... so this one downloads
        ("no tab on this line", None, "malformed_row"),
    ]
    return rows


def base_cfg(input_path, output, **kw) -> DownloadConfig:
    return DownloadConfig(input=str(input_path), source="cc12m", output=output, image_size=32, min_image_size=16,
                          rows_per_shard=8, threads=4, timeout=1.0, deadline=1.5, max_bytes=1 << 20,
                          max_retry_after=2.0, partitions_per_wave=2, allow_hosts=["127.0.0.1"], **kw)


def read_output(uri: str) -> pa.Table:
    shards = ShardSet(uri)
    return pa.concat_tables([shards.read_shard(n, DOWNLOAD) for n in shards.committed()])


@pytest.mark.slow
def test_every_bad_input_gets_its_status_in_bounded_time(tmp_path, ray_local, http_server, hostile_server, recorder,
                                                         corpus):
    rows = hostile_list(http_server, hostile_server, recorder, corpus)
    with open(tmp_path / "list.tsv", "wb") as f:
        for url, caption, _ in rows:
            f.write(url.encode() + (b"" if caption is None else b"\t" + (caption if isinstance(caption, bytes)
                                                                        else caption.encode())) + b"\n")
    cfg = base_cfg(tmp_path / "list.tsv", str(tmp_path / "out"))
    start = time.monotonic()
    summary = run_download(cfg, progress=False, log=lambda m: None)
    assert time.monotonic() - start < 60  # the slow servers above would each hold a thread for hours

    out = read_output(cfg.output)
    got = {r["key"]: r for r in out.to_pylist()}
    assert sorted(got) == sorted(f"cc12m/{i}" for i in range(len(rows)))  # each key exactly once
    statuses = {f"cc12m/{i}": s for i, (_, _, s) in enumerate(rows)}
    assert {k: r["status"] for k, r in got.items()} == statuses
    assert recorder.seen == []  # nothing was ever fetched from 127.0.0.2

    for key, row in got.items():
        if row["status"] == "ok":
            img = Image.open(io.BytesIO(row["image"]))
            assert img.mode == "RGB" and img.format == "JPEG" and (row["width"], row["height"]) == img.size
            assert min(img.size) == min(32, row["original_width"], row["original_height"])  # never upscaled
            assert row["sha256"] and row["error"] is None and row["captions"] == [row["caption"]]
        else:
            assert row["image"] is None and row["error"] and row["captions"] is None
    alpha = next(r for r in got.values() if r["url"].endswith("alpha.png"))
    assert np.asarray(Image.open(io.BytesIO(alpha["image"]))).min() > 240  # transparent → white
    dup = next(r for r in got.values() if r["caption"] == "same url again" and "cmyk" in r["url"])
    first_cmyk = next(k for k, r in got.items() if r["url"].endswith("cmyk.jpg") and r["caption"] == "cmyk")
    assert dup["duplicate_of"] == first_cmyk and dup["error"] == f"duplicate of {first_cmyk}"

    expected_counts = {}
    for _, _, s in rows:
        expected_counts[s] = expected_counts.get(s, 0) + 1
    assert {k: v for k, v in summary["by_status"].items() if v} == expected_counts
    assert summary["complete"] and summary["input_rows"] == summary["output_rows"] == summary["status_rows"] == len(rows)
    assert summary["blocked_by_class"] == {"loopback": 2, "scheme": 3}
    assert summary["hosts"]["timeout"]["rows"] == 3 and summary["hosts"]["rate_limited"]["hosts"] == 1
    manifest = ShardSet(cfg.output).read_manifest()
    assert manifest["num_rows"] == len(rows) and manifest["config"]["allow_hosts"] == ["127.0.0.1"]
    text = format_summary(summary, cfg.output)
    assert f"{len(rows)} in input, {len(rows)} in output = Σ statuses (complete)" in text
    assert "blocked by class: loopback 2, scheme 3" in text and "rate_limited: 1 rows from 1 hosts" in text
    assert "malformed_row 1" in text

    # Re-running a finished job does no work and changes nothing.
    again = run_download(cfg, progress=False, log=lambda m: None)
    assert again["this_run_rows"] == 0 and again["resumed_rows"] == len(rows)
    assert again["by_status"] == summary["by_status"]


@pytest.mark.slow
def test_human_captions_are_all_kept_with_their_image(tmp_path, ray_local, http_server, corpus):
    items = corpus[1][:4]
    coco = [{"image": it.file, "caption": f"{it.caption}, said annotator {k}"} for k in range(5) for it in items]
    (tmp_path / "coco_karpathy_train.json").write_text(json.dumps(coco))  # one row per caption, images interleaved
    cfg = dataclasses.replace(base_cfg(tmp_path / "coco_karpathy_train.json", str(tmp_path / "out")), source="auto",
                              url_prefix=http_server.base_url, rows_per_shard=6)
    summary = run_download(cfg, progress=False, log=lambda m: None)
    out = {r["key"]: r for r in read_output(cfg.output).to_pylist()}
    ok = {k: r for k, r in out.items() if r["status"] == "ok"}
    assert sorted(ok) == [f"coco/{i}" for i in range(4)] and all(r["policy"] == "human" for r in out.values())
    for i, it in enumerate(items):
        assert ok[f"coco/{i}"]["captions"] == [f"{it.caption}, said annotator {k}" for k in range(5)]
    merged = [r for r in out.values() if r["status"] == "merged"]
    assert len(merged) == 16 and all(r["duplicate_of"] == f"coco/{int(r['key'].split('/')[1]) % 4}" for r in merged)
    assert summary["images"] == {"human": 4} and summary["captions"] == {"human": 20}
    assert "human images: 4 with 20 captions" in format_summary(summary, cfg.output)


@pytest.mark.slow
def test_a_task_that_keeps_dying_is_retried_a_bounded_number_of_times_then_committed(tmp_path, ray_local,
                                                                                     http_server, corpus):
    items = corpus[1]
    rows = [(f"{http_server.base_url}/sleep/20/{items[i].file}?n={i}", items[i].caption) for i in range(3)]
    rows.append((f"{http_server.base_url}/{items[3].file}", ""))  # decided by the plan: kept through the failure
    write_tsv(tmp_path / "l.tsv", rows)
    cfg = dataclasses.replace(base_cfg(tmp_path / "l.tsv", str(tmp_path / "out")), deadline=30.0, timeout=30.0,
                              task_retries=1)
    kills, result = [], {}
    job = threading.Thread(target=lambda: result.update(run_download(cfg, progress=False, log=lambda m: None)))
    job.start()
    deadline = time.monotonic() + 120
    while len(kills) < 2 and time.monotonic() < deadline:  # kill -9 the task's worker, twice (it runs 20 s)
        for pid in pids_running("ray::download-part-00000"):
            if pid not in kills:
                os.kill(pid, signal.SIGKILL)
                kills.append(pid)
        time.sleep(0.2)
    job.join(120)
    assert len(kills) == 2 and not job.is_alive()
    assert result["complete"] and result["failed_partitions"] == 1 and result["task_deaths"] == 2
    out = read_output(cfg.output).to_pylist()
    assert [r["status"] for r in out] == ["task_failed"] * 3 + ["bad_caption"]
    assert "died 2 times" in out[0]["error"]


@pytest.mark.slow
def test_download_to_s3(tmp_path, ray_local, s3_bucket, http_server, corpus):
    items = corpus[1][:10]
    pq.write_table(pa.table({"URL": [f"{http_server.base_url}/{it.file}" for it in items],
                             "TEXT": [it.caption for it in items], "punsafe": [i / 10 for i in range(10)],
                             "NSFW": ["UNLIKELY"] * 9 + ["NSFW"], "similarity": [0.3] * 10}), tmp_path / "laion.parquet")
    cfg = dataclasses.replace(base_cfg(tmp_path / "laion.parquet", f"{s3_bucket}/dl"), source="auto")
    summary = run_download(cfg, progress=False, log=lambda m: None)
    assert summary["by_source"] == {"laion": {"ok": 10}}
    shards = ShardSet(f"{s3_bucket}/dl")
    assert shards.committed() == ["part-00000.parquet", "part-00001.parquet"]
    out = read_output(shards.uri)
    assert out.column("caption").to_pylist() == [it.caption for it in items]
    meta = out.column("meta").to_pylist()  # LAION's own columns travel with their rows
    assert [m["nsfw"] for m in meta][-1] == "NSFW" and [round(m["punsafe"], 2) for m in meta] == [i / 10 for i in range(10)]
    assert shards.read_manifest()["num_rows"] == 10
    assert not shards.fs.exists(shards.path("_plan/rows"))  # planned rows removed once complete


def test_a_missing_output_bucket_is_refused_not_created(tmp_path, s3_server, s3_bucket):
    import boto3

    (tmp_path / "l.tsv").write_text("http://127.0.0.1/x.jpg\tc\n")
    cfg = base_cfg(tmp_path / "l.tsv", "s3://no-such-bucket-here/x")
    with pytest.raises(FileNotFoundError, match="bucket 'no-such-bucket-here'.*does not exist"):
        run_download(cfg, progress=False)
    names = [b["Name"] for b in boto3.client("s3", endpoint_url=s3_server).list_buckets()["Buckets"]]
    assert "no-such-bucket-here" not in names


def test_missing_column_fails_before_any_work(tmp_path):
    pq.write_table(pa.table({"URL": ["http://127.0.0.1/x.jpg"], "caption": ["c"]}), tmp_path / "l.parquet")
    cfg = DownloadConfig(input=str(tmp_path / "l.parquet"), source="laion", output=str(tmp_path / "out"))
    with pytest.raises(SchemaError, match="missing column 'TEXT'"):
        run_download(cfg)  # raises before Ray is needed or anything is written
    assert not (tmp_path / "out").exists()


def test_resume_refuses_a_different_plan(tmp_path, ray_local, http_server, corpus):
    write_tsv(tmp_path / "l.tsv", [(f"{http_server.base_url}/{it.file}", it.caption) for it in corpus[1][:3]])
    cfg = base_cfg(tmp_path / "l.tsv", str(tmp_path / "out"))
    run_download(cfg, progress=False, log=lambda m: None)
    with pytest.raises(ValueError, match="different input or rows_per_shard"):
        run_download(dataclasses.replace(cfg, rows_per_shard=2), progress=False)


def test_cli_refuses_missing_column_before_starting_ray(tmp_path, capsys):
    from orchestration.cli import main

    (tmp_path / "gcc.tsv").write_text("only-a-caption\n")
    rc = main(["download", "--input", str(tmp_path / "gcc.tsv"), "--source", "cc3m",
               "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "missing column 'url'" in err and str(tmp_path / "gcc.tsv") in err
    assert not (tmp_path / "out").exists()


def test_plan_only_reads_and_plans_without_downloading(tmp_path, ray_local):
    write_tsv(tmp_path / "l.tsv", [(f"http://127.0.0.1:1/{i % 5}.jpg", f"c{i}") for i in range(20)])
    cfg = base_cfg(tmp_path / "l.tsv", str(tmp_path / "out"))
    summary = run_download(cfg, progress=False, plan_only=True, log=lambda m: None)
    assert (summary["input_rows"], summary["shards"], summary["duplicates"]) == (20, 3, 15)
    assert ShardSet(cfg.output).committed() == []
    assert "20 in 1 files → 3 shards" in format_summary(summary, cfg.output)
