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
