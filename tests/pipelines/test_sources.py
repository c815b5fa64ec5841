"""URL-list formats of each source, read from small files written here."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.schema import SchemaError
from pipelines.sources import SOURCES, URL_TABLE, open_url_lists


def read_all(spec, source="auto", url_prefix=""):
    lists = open_url_lists(str(spec), source, url_prefix)
    table = pa.concat_tables(list(lists.batches()))
    assert table.schema.equals(URL_TABLE)
    return lists, table.to_pylist()


def test_coco_lavis_karpathy_json(tmp_path):
    f = tmp_path / "coco_karpathy_train.json"
    f.write_text(json.dumps([
        {"caption": "A woman wearing a net on her head.", "image": "val2014/COCO_val2014_000000391895.jpg", "image_id": "coco_391895"},
        {"caption": ["two dogs", "dogs playing"], "image": "val2014/COCO_val2014_000000522418.jpg", "image_id": "coco_522418"},
    ]))
    lists, rows = read_all(f)
    assert lists.files[0].source.name == "coco"
    assert rows[0] == {"key": "coco/0", "source": "coco",
                       "url": "http://images.cocodataset.org/val2014/COCO_val2014_000000391895.jpg",
                       "caption": "A woman wearing a net on her head.", "caption_error": None}
    assert rows[1]["caption"] == "two dogs"  # val/test files list several captions: first kept


def test_coco_url_prefix_override(tmp_path):
    f = tmp_path / "ann.json"
    f.write_text(json.dumps([{"image": "images/000001.jpg", "caption": "x"}]))
    _, rows = read_all(f, "coco", url_prefix="http://127.0.0.1:8000/")
    assert rows[0]["url"] == "http://127.0.0.1:8000/images/000001.jpg"


def test_vg_lavis_json(tmp_path):
    f = tmp_path / "vg_caption.json"
    f.write_text(json.dumps([{"image": "VG_100K/1.jpg", "caption": "trees line the street", "image_id": 1}]))
    lists, rows = read_all(f)
    assert lists.files[0].source.name == "vg"
    assert rows[0]["url"] == "https://cs.stanford.edu/people/rak248/VG_100K/1.jpg"
    assert rows[0]["key"] == "vg/0"


def test_cc3m_official_tsv_caption_then_url(tmp_path):
    f = tmp_path / "Train_GCC-training.tsv"
    # Web captions carry stray quotes; the official file is not quoted.
    f.write_bytes(b'a "quoted" word here\thttp://a.example/1.jpg\nsecond caption\thttp://a.example/2.jpg\n')
    lists, rows = read_all(f)
    assert lists.files[0].source.name == "cc3m"
    assert [(r["key"], r["url"], r["caption"]) for r in rows] == [
        ("cc3m/0", "http://a.example/1.jpg", 'a "quoted" word here'),
        ("cc3m/1", "http://a.example/2.jpg", "second caption")]


def test_cc12m_tsv_url_then_caption(tmp_path):
    f = tmp_path / "cc12m.tsv"
    f.write_bytes(b"http://b.example/1.jpg\tfirst <PERSON> caption\nhttp://b.example/2.jpg\tsecond\n")
    lists, rows = read_all(f)
    assert lists.files[0].source.name == "cc12m"
    assert [r["url"] for r in rows] == ["http://b.example/1.jpg", "http://b.example/2.jpg"]
    assert rows[0]["caption"] == "first <PERSON> caption"


def test_sbu_json_and_tsv(tmp_path):
    j = tmp_path / "sbu.json"
    j.write_text(json.dumps([{"url": "http://c.example/1.jpg", "caption": "sky", "image": "1.jpg"}]))
    t = tmp_path / "sbu_urls.tsv"
    t.write_text("http://c.example/2.jpg\tsea\n")
    _, rows = read_all(j, "sbu")
    assert rows == [{"key": "sbu/0", "source": "sbu", "url": "http://c.example/1.jpg", "caption": "sky",
                     "caption_error": None}]
    lists, rows = read_all(t)
    assert lists.files[0].source.name == "sbu"
    assert rows[0]["url"] == "http://c.example/2.jpg" and rows[0]["caption"] == "sea"


def test_laion_parquet(tmp_path):
    f = tmp_path / "part-0.parquet"
    pq.write_table(pa.table({"SAMPLE_ID": [1, 2], "URL": ["http://d.example/1.jpg", "http://d.example/2.jpg"],
                             "TEXT": ["one", "two"], "similarity": [0.3, 0.4]}), f)
    lists, rows = read_all(f)
    assert lists.files[0].source.name == "laion"
    assert [(r["key"], r["caption"]) for r in rows] == [("laion/0", "one"), ("laion/1", "two")]


def test_folder_of_files_keys_count_across_files(tmp_path):
    for i in range(3):
        pq.write_table(pa.table({"URL": [f"http://e.example/{i}/{j}.jpg" for j in range(2)],
                                 "TEXT": ["t", "u"]}), tmp_path / f"laion-{i}.parquet")
    _, rows = read_all(tmp_path, "laion")
    assert [r["key"] for r in rows] == [f"laion/{i}" for i in range(6)]
    assert rows[2]["url"] == "http://e.example/1/0.jpg"


def test_bad_captions_are_flagged_not_fatal(tmp_path):
    f = tmp_path / "list.tsv"
    f.write_bytes(b"http://f.example/1.jpg\tok caption\n"
                  b"http://f.example/2.jpg\t\xff\xfe broken\n"
                  b"http://f.example/3.jpg\t   \n")
    _, rows = read_all(f, "cc12m")
    assert [r["caption_error"] for r in rows] == [None, "caption is not valid UTF-8", "empty caption"]
    assert "broken" in rows[1]["caption"]
    # A json file with raw invalid bytes in a caption is still readable; the row is flagged.
    j = tmp_path / "sbu.json"
    j.write_bytes(b'[{"url": "http://f.example/4.jpg", "caption": "caf\xe9"}]')
    _, rows = read_all(j, "sbu")
    assert rows[0]["caption_error"] == "caption is not valid UTF-8"


def test_malformed_delimited_rows_are_counted(tmp_path):
    f = tmp_path / "cc12m.tsv"
    f.write_bytes(b"http://g.example/1.jpg\tone\nno-tab-here\nhttp://g.example/2.jpg\ttwo\n")
    lists, rows = read_all(f, "cc12m")
    assert [r["url"] for r in rows] == ["http://g.example/1.jpg", "http://g.example/2.jpg"]
    assert lists.malformed_rows == {str(f): 1}


@pytest.mark.parametrize("source,content,name,missing", [
    ("laion", pa.table({"URL": ["http://x/1"], "caption": ["c"]}), "l.parquet", "TEXT"),
    ("coco", [{"file": "a.jpg", "caption": "c"}], "coco.json", "image"),
    ("sbu", [{"url": "http://x/1", "text": "c"}], "sbu.json", "caption"),
    ("cc3m", b"only-one-field\n", "gcc.tsv", "url"),
])
def test_missing_column_is_a_clear_error(tmp_path, source, content, name, missing):
    f = tmp_path / name
    if isinstance(content, pa.Table):
        pq.write_table(content, f)
    elif isinstance(content, bytes):
        f.write_bytes(content)
    else:
        f.write_text(json.dumps(content))
    with pytest.raises(SchemaError) as e:
        open_url_lists(str(f), source)
    assert repr(missing) in str(e.value) and str(f) in str(e.value)


def test_unknown_source_and_missing_input(tmp_path):
    with pytest.raises(ValueError, match="unknown source 'flickr'"):
        open_url_lists(str(tmp_path), "flickr")
    with pytest.raises(FileNotFoundError):
        open_url_lists(str(tmp_path / "nope.tsv"), "cc3m")


def test_every_source_declares_its_columns():
    for s in SOURCES.values():
        assert s.url_column and s.caption_column and s.formats
        if not s.header:
            assert {s.url_column, s.caption_column} <= set(s.columns)


def test_gzipped_list_read_from_s3(tmp_path, s3_bucket):
    import gzip

    import fsspec

    data = gzip.compress(b"a caption\thttp://h.example/1.jpg\nanother\thttp://h.example/2.jpg\n")
    with fsspec.open(f"{s3_bucket}/lists/Train_GCC-training.tsv.gz", "wb") as f:
        f.write(data)
    lists, rows = read_all(f"{s3_bucket}/lists/")
    assert lists.files[0].path == f"{s3_bucket}/lists/Train_GCC-training.tsv.gz"
    assert lists.files[0].source.name == "cc3m"
    assert [(r["key"], r["url"]) for r in rows] == [("cc3m/0", "http://h.example/1.jpg"),
                                                  ("cc3m/1", "http://h.example/2.jpg")]
