"""Folders users already hold, read as download-contract shards: the real img2dataset CLI's three
output formats and a generic WebDataset, local and on S3."""
from __future__ import annotations

import io
import json

import pyarrow as pa
import pytest

from pipelines.adapters import img2dataset_status, open_download_source
from pipelines.inspect import inspect_shards
from pipelines.report import format_text
from pipelines.schema import DOWNLOAD, SchemaError
from tests.helpers.img2dataset import FORMATS

@pytest.mark.parametrize("fmt", FORMATS)
def test_every_img2dataset_sample_is_one_row_with_its_status(img2dataset_folders, corpus, fmt):
    folders, captions = img2dataset_folders
    source = open_download_source(str(folders[fmt]))
    assert source.kind == f"img2dataset {fmt} folder" and source.check() == [0, 1, 2]
    rows = [r for i in source.indices() for r in source.read(i).to_pylist()]
    assert len(rows) == 14 and len({r["key"] for r in rows}) == 14
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 12 and {r["url"] for r in ok} == set(captions)
    for r in ok:
        assert r["captions"] == [captions[r["url"]]] and r["key"].startswith("img2dataset/")
        from PIL import Image
        assert Image.open(io.BytesIO(r["image"])).size == (r["width"], r["height"]) == (64, 64)
        assert r["meta"]["similarity"] == pytest.approx(0.3) and r["sha256"]
    failed = sorted(r["status"] for r in rows if r["status"] != "ok")
    assert failed == ["http_error", "network_error"]
    assert all(r["image"] is None and r["error"] for r in rows if r["status"] != "ok")
    pa.Table.from_pylist(rows, schema=DOWNLOAD.schema)  # the contract holds


@pytest.mark.parametrize("fmt", FORMATS)
def test_shards_inspect_reads_img2dataset_folders(img2dataset_folders, fmt):
    ins = inspect_shards(str(img2dataset_folders[0][fmt]), thumbnails=3)
    assert ins.ok and ins.rows == 14 and ins.status == {"ok": 12, "http_error": 1, "network_error": 1}
    assert ins.meta_scores["punsafe"].n == 14 and len(ins.thumbnails) == 3
    assert f"read from an img2dataset {fmt} folder" in format_text(ins)


def test_a_generic_webdataset_folder(tmp_path, corpus):
    import webdataset as wds

    root, items = corpus
    (tmp_path / "wds").mkdir()
    for shard in range(2):
        with wds.TarWriter(str(tmp_path / "wds" / f"shard-{shard * 7:06d}.tar")) as sink:
            for it in items[shard * 3:shard * 3 + 3]:
                sample = {"__key__": f"s{it.index:04d}", "jpg": (root / it.file).read_bytes()}
                if it.index % 3 == 0:
                    sample["txt"] = it.caption
                else:
                    sample["json"] = json.dumps({"caption": it.caption, "url": f"http://x/{it.index}"})
                sink.write(sample)
            sink.write({"__key__": "no-image", "txt": "a caption without its image"})
    source = open_download_source(str(tmp_path / "wds"))
    assert source.kind == "WebDataset folder" and source.indices() == [0, 7]  # the number in each name
    rows = [r for i in source.indices() for r in source.read(i).to_pylist()]
    assert [r["status"] for r in rows] == ["ok"] * 3 + ["decode_error"] + ["ok"] * 3 + ["decode_error"]
    assert [r["caption"] for r in rows if r["status"] == "ok"] == [it.caption for it in items[:6]]
    assert rows[1]["url"] == "http://x/1" and rows[0]["width"] == 96


def test_img2dataset_folder_on_s3(img2dataset_folders, s3_bucket):
    import fsspec

    fs = fsspec.filesystem("s3")
    fs.put(str(img2dataset_folders[0]["webdataset"]) + "/", f"{s3_bucket}/i2d/", recursive=True)
    source = open_download_source(f"{s3_bucket}/i2d")
    assert source.kind == "img2dataset webdataset folder"
    assert sum(r["status"] == "ok" for i in source.indices() for r in source.read(i, ["status"]).to_pylist()) == 12


def test_anything_else_is_a_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(SchemaError, match="no committed shards.*img2dataset output or WebDataset"):
        open_download_source(str(tmp_path))


@pytest.mark.parametrize("status,error,want", [
    ("success", None, "ok"), ("failed_to_download", "HTTP Error 404: Not Found", "http_error"),
    ("failed_to_download", "HTTP Error 429: Too Many Requests", "rate_limited"),
    ("failed_to_download", "<urlopen error timed out>", "timeout"),
    ("failed_to_download", "Use of image disallowed by X-Robots-Tag directive", "opted_out"),
    ("failed_to_download", "<urlopen error [Errno 111] Connection refused>", "network_error"),
    ("failed_to_resize", "image too small", "too_small"), ("failed_to_resize", "cannot identify", "decode_error"),
])
def test_img2dataset_statuses_map_onto_ours(status, error, want):
    assert img2dataset_status(status, error)[0] == want


# -- hostile inputs (issue 32: D4, D5, D6, L1, L2, L3), built on the review's reproductions --------
def _wds(tmp_path, name, tars: dict):
    from tests.helpers.tars import tar_bytes

    d = tmp_path / name
    d.mkdir()
    for fname, members in tars.items():
        (d / fname).write_bytes(members if isinstance(members, bytes) else tar_bytes(members))
    return open_download_source(str(d))


def _rows(source):
    from pipelines.adapters import read_error

    tables = {i: source.read(i) for i in source.indices()}
    return [r for t in tables.values() for r in t.to_pylist()], {i: read_error(t) for i, t in tables.items()}


@pytest.fixture(scope="module")
def jpg(corpus):
    return (corpus[0] / corpus[1][0].file).read_bytes()


def test_wds_keys_keep_their_folder_never_leave_the_tar_and_never_repeat(tmp_path, jpg):
    source = _wds(tmp_path, "keys", {"00000.tar": [
        ("../../evil/a.jpg", jpg), ("../../evil/a.txt", b"trav a"), ("/abs/b.jpg", jpg), ("/abs/b.txt", b"abs b"),
        ("x/../../d.jpg", jpg), ("x/../../d.txt", b"d"), ("dir1/x.jpg", jpg), ("dir1/x.txt", b"one"),
        ("dir2/x.jpg", jpg), ("dir2/x.txt", b"two"), ("sym", "s.jpg", "/etc/passwd"), ("s.txt", b"symlink"),
        ("hard", "h.jpg", "/etc/hostname"), ("h.txt", b"hardlink"),
        ("a.jpg", jpg), ("a.txt", b"first"), ("b.jpg", jpg), ("b.txt", b"b"), ("a.jpg", jpg), ("a.txt", b"again")]})
    rows, problems = _rows(source)
    assert [(r["key"], r["status"]) for r in rows] == [
        ("webdataset/evil/a", "ok"), ("webdataset/abs/b", "ok"), ("webdataset/x/d", "ok"),
        ("webdataset/dir1/x", "ok"), ("webdataset/dir2/x", "ok"), ("webdataset/s", "decode_error"),
        ("webdataset/h", "decode_error"), ("webdataset/a", "ok"), ("webdataset/b", "ok"), ("webdataset/a#2", "ok")]
    assert [r["caption"] for r in rows if r["key"] in ("webdataset/a", "webdataset/a#2")] == ["first", "again"]
    assert problems == {0: None} and not (tmp_path / "evil").exists()


def test_wds_members_are_bounded_before_they_are_read(tmp_path, jpg):
    import resource

    from tests.helpers.tars import header_only, tar_bytes

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    source = _wds(tmp_path, "big", {
        "00000.tar": [("sparse", "big.jpg", jpg, 2 << 30), ("big.txt", b"sparse member"), ("g.jpg", jpg),
                      ("g.txt", b"a good caption"), ("huge.jpg", jpg), ("huge.txt", b"huge " * (4 << 20)),
                      ("long.jpg", jpg), ("long.txt", b"x" * 5000)],
        "00001.tar": tar_bytes([("a.jpg", jpg), ("a.txt", b"a")], end=False) + header_only("b.jpg", 2 << 30, jpg[:1024])})
    rows, problems = _rows(source)
    assert [(r["key"], r["status"]) for r in rows] == [
        ("webdataset/big", "too_large"), ("webdataset/g", "ok"), ("webdataset/huge", "bad_caption"),
        ("webdataset/long", "bad_caption"), ("webdataset/a", "ok"), ("webdataset/b", "too_large")]
    assert rows[0]["error"] == "tar member big.jpg is sparse"
    assert rows[2]["error"] == "tar member huge.txt is 20971520 bytes, over 1048576"
    assert "5000 bytes, over download.max_caption_bytes=4096" in rows[3]["error"]
    assert rows[5]["error"] == "tar member b.jpg is 2147483648 bytes, over 33554432"
    assert problems[0] is None and problems[1].startswith("00001.tar: unreadable after 2 samples (ReadError")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB: no member was expanded


def test_the_runs_download_caps_bound_adapter_samples(tmp_path, jpg):
    """``download.max_bytes`` / ``max_caption_bytes`` as configured, not their defaults, bound an
    img2dataset / WebDataset sample (blip2 capfilt passes InputLimits.of(cfg.download))."""
    from pipelines.adapters import InputLimits
    from pipelines.config import DownloadConfig

    _wds(tmp_path, "caps", {"00000.tar": [("a.jpg", jpg), ("a.txt", b"short"), ("b.jpg", jpg), ("b.txt", b"y" * 300)]})
    limits = InputLimits.of(DownloadConfig(max_bytes=len(jpg) - 1, max_caption_bytes=200))
    rows, _ = _rows(open_download_source(str(tmp_path / "caps"), limits=limits))
    assert [(r["key"], r["status"]) for r in rows] == [("webdataset/a", "too_large"), ("webdataset/b", "too_large")]
    assert rows[0]["error"] == f"tar member a.jpg is {len(jpg)} bytes, over {len(jpg) - 1}"
    rows, _ = _rows(open_download_source(str(tmp_path / "caps"), limits=InputLimits.of(DownloadConfig(max_caption_bytes=200))))
    assert [r["status"] for r in rows] == ["ok", "bad_caption"]


def test_wds_bad_samples_are_rows_with_a_status(tmp_path, jpg):
    cases = [b'{"caption": 123}', b'{"caption": ["x", "y"]}', b'{"url": 5, "caption": "ok"}', b"[1, 2]",
             b"[" * 100000, b'{"caption": "ok", "punsafe": "high", "WIDTH": "x", "all_captions": 5}']
    members = [m for i, js in enumerate(cases) for m in ((f"j{i}.jpg", jpg), (f"j{i}.json", js))]
    source = _wds(tmp_path, "samples", {"00000.tar": members + [("d.jpg", jpg), ("d.jpg", jpg), ("d.txt", b"x"),
                                                                ("g.jpg", jpg), ("g.txt", b"good")]})
    rows, problems = _rows(source)
    assert [r["status"] for r in rows] == ["bad_caption", "ok", "ok", "bad_caption", "bad_caption", "ok",
                                           "decode_error", "ok"]
    assert rows[0]["error"].endswith("caption is a int, not text") and rows[1]["caption"] == "x"  # a list: its first
    assert rows[2]["url"] is None and rows[2]["caption"] == "ok" and rows[5]["meta"]["punsafe"] is None
    assert rows[6]["error"] == "tar member d.jpg repeats an extension of its sample" and problems == {0: None}


def test_unreadable_wds_shards_keep_what_came_before_and_are_reported(tmp_path, jpg):
    from tests.helpers.tars import tar_bytes

    full = tar_bytes([m for k in "abc" for m in ((f"{k}.jpg", jpg), (f"{k}.txt", k.encode()))])
    source = _wds(tmp_path, "broken", {"00000.tar": [("g.jpg", jpg), ("g.txt", b"good")],
                                       "00001.tar": full[:len(full) // 2], "00002.tar": bytes(range(256)) * 40,
                                       ".hidden.tar": b"not a tar", "_tmp.tar": b"nor this"})
    assert source.indices() == [0, 1, 2]  # hidden and _-names are not shards (L3)
    rows, problems = _rows(source)
    assert [(r["key"], r["status"]) for r in rows] == [("webdataset/g", "ok"), ("webdataset/a", "ok"),
                                                       ("webdataset/b", "ok"), ("webdataset/c", "decode_error")]
    assert rows[3]["error"] == "the tar ends or breaks inside this sample"
    assert problems[0] is None and problems[1].startswith("00001.tar: unreadable after 3 samples")
    assert problems[2].startswith("00002.tar: unreadable after 0 samples (ReadError")
    ins = inspect_shards(source.uri)
    assert ins.rows == 4 and [p.split(" (")[0] for p in ins.problems] == [
        "shard 1: 00001.tar: unreadable after 3 samples", "shard 2: 00002.tar: unreadable after 0 samples"]


def _i2d(d, n, rows: dict, types: dict | None = None):
    import pyarrow.parquet as pq

    d.mkdir(exist_ok=True)
    cols = {"key": pa.string(), "url": pa.string(), "caption": pa.string(), "status": pa.string(),
            "error_message": pa.string(), "width": pa.int64(), "height": pa.int64(), "jpg": pa.binary(),
            **(types or {})}
    pq.write_table(pa.table({k: pa.array(v, cols.get(k)) for k, v in rows.items()}), d / f"{n:05d}.parquet")
    (d / f"{n:05d}_stats.json").write_text("{}")


def test_img2dataset_files_keys_never_open_a_path_outside_the_folder(tmp_path, jpg):
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.jpg").write_bytes(b"secret " + jpg)
    d = tmp_path / "i2d" / "files"
    (d / "00000").mkdir(parents=True)
    (d / "00000" / "good.jpg").write_bytes(jpg)
    (d / "00000" / "link.jpg").symlink_to(tmp_path / "outside" / "secret.jpg")
    keys = ["../../outside/secret", "link", "good", "a\x00b"]
    _i2d(d, 0, {"key": keys, "url": [f"http://x/{i}" for i in range(4)], "caption": ["c"] * 4,
                "status": ["success"] * 4, "error_message": [None] * 4})
    source = open_download_source(str(d))
    assert source.kind == "img2dataset files folder"
    rows, problems = _rows(source)
    assert [r["status"] for r in rows] == ["decode_error", "decode_error", "ok", "decode_error"]
    assert rows[2]["image"] == jpg and all(r["image"] is None for r in rows if r["status"] != "ok")


def test_img2dataset_wrong_types_and_a_later_shard_without_keys_are_counted(tmp_path, jpg):
    d = tmp_path / "types"
    base = {"key": ["a", "b"], "url": ["http://x/a", "http://x/b"], "caption": ["ca", "cb"],
            "status": ["success", "success"], "error_message": [None, None], "jpg": [jpg, jpg]}
    _i2d(d, 0, {**base, "url": [1, 2], "caption": [3, 4], "width": ["wide", "x"]},
         {"url": pa.int64(), "caption": pa.int64(), "width": pa.string()})
    _i2d(d, 1, {**base, "status": [1, 2]}, {"status": pa.int64()})
    _i2d(d, 2, {k: v for k, v in base.items() if k != "key"})
    source = open_download_source(str(d))
    assert source.check() == [0, 1, 2]
    rows, problems = _rows(source)
    assert [(r["key"], r["status"], r["url"], r["width"]) for r in rows] == [
        ("img2dataset/a", "bad_caption", None, None), ("img2dataset/b", "bad_caption", None, None),
        ("img2dataset/a", "network_error", "http://x/a", None), ("img2dataset/b", "network_error", "http://x/b", None)]
    assert problems == {0: None, 1: None, 2: "00002.parquet: not an img2dataset shard (no 'key' column)"}
