"""URL-list formats of each source, read from small files written here: every data row is one row."""
from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.schema import SchemaError
from pipelines.sources import SOURCES, URL_TABLE, Limits, ReadCounts, open_url_lists, read_rows


def read_all(spec, source="auto", url_prefix="", limits=Limits()):
    """(lists, rows of every file in order, counts per file)."""
    lists = open_url_lists(str(spec), source, url_prefix)
    rows, counts = [], []
    for f in lists.files:
        c = ReadCounts()
        tables = list(read_rows(f, lists.url_prefix, limits, c))
        for t in tables:
            assert t.schema.equals(URL_TABLE)
        rows += [r for t in tables for r in t.to_pylist()]
        counts.append(c)
    return lists, rows, counts


def test_coco_lavis_karpathy_json_keeps_every_caption_of_a_row(tmp_path):
    f = tmp_path / "coco_karpathy_train.json"
    f.write_text(json.dumps([
        {"caption": "A woman wearing a net on her head.", "image": "val2014/COCO_val2014_000000391895.jpg", "image_id": "coco_391895"},
        {"caption": ["two dogs", "dogs playing"], "image": "val2014/COCO_val2014_000000522418.jpg", "image_id": "coco_522418"},
    ]))
    lists, rows, _ = read_all(f)
    assert lists.files[0].source.name == "coco" and lists.policy_of(lists.files[0]) == "human"
    assert rows[0] == {"row": 0, "url": "http://images.cocodataset.org/val2014/COCO_val2014_000000391895.jpg",
                       "caption": "A woman wearing a net on her head.",
                       "captions": ["A woman wearing a net on her head."], "meta": None, "status": None,
                       "error": None}
    assert rows[1]["captions"] == ["two dogs", "dogs playing"] and rows[1]["caption"] == "two dogs"


def test_coco_url_prefix_override(tmp_path):
    f = tmp_path / "ann.json"
    f.write_text(json.dumps([{"image": "images/000001.jpg", "caption": "x"}]))
    _, rows, _ = read_all(f, "coco", url_prefix="http://127.0.0.1:8000/")
    assert rows[0]["url"] == "http://127.0.0.1:8000/images/000001.jpg"


def test_vg_lavis_json(tmp_path):
    f = tmp_path / "vg_caption.json"
    f.write_text(json.dumps([{"image": "VG_100K/1.jpg", "caption": "trees line the street", "image_id": 1}]))
    lists, rows, _ = read_all(f)
    assert lists.files[0].source.name == "vg" and lists.policy_of(lists.files[0]) == "human"
    assert rows[0]["url"] == "https://cs.stanford.edu/people/rak248/VG_100K/1.jpg"


def test_web_sources_declare_the_web_policy():
    assert {name for name, s in SOURCES.items() if s.policy == "human"} == {"coco", "vg"}
    assert all(SOURCES[n].policy == "web" for n in ("cc3m", "cc12m", "sbu", "laion", "generic"))


def test_cc3m_official_tsv_caption_then_url(tmp_path):
    f = tmp_path / "Train_GCC-training.tsv"
    # Web captions carry stray quotes; the official file is not quoted.
    f.write_bytes(b'a "quoted" word here\thttp://a.example/1.jpg\nsecond caption\thttp://a.example/2.jpg\n')
    lists, rows, _ = read_all(f)
    assert lists.files[0].source.name == "cc3m"
    assert [(r["row"], r["url"], r["caption"]) for r in rows] == [
        (0, "http://a.example/1.jpg", 'a "quoted" word here'), (1, "http://a.example/2.jpg", "second caption")]


def test_cc12m_tsv_url_then_caption(tmp_path):
    f = tmp_path / "cc12m.tsv"
    f.write_bytes(b"http://b.example/1.jpg\tfirst <PERSON> caption\r\nhttp://b.example/2.jpg\tsecond")  # CRLF, no final newline
    lists, rows, _ = read_all(f)
    assert lists.files[0].source.name == "cc12m"
    assert [r["url"] for r in rows] == ["http://b.example/1.jpg", "http://b.example/2.jpg"]
    assert rows[0]["caption"] == "first <PERSON> caption" and rows[1]["caption"] == "second"


def test_sbu_json_and_tsv(tmp_path):
    j = tmp_path / "sbu.json"
    j.write_text(json.dumps([{"url": "http://c.example/1.jpg", "caption": "sky", "image": "1.jpg"}]))
    t = tmp_path / "sbu_urls.tsv"
    t.write_text("http://c.example/2.jpg\tsea\n")
    _, rows, _ = read_all(j, "sbu")
    assert rows == [{"row": 0, "url": "http://c.example/1.jpg", "caption": "sky", "captions": ["sky"], "meta": None,
                     "status": None, "error": None}]
    lists, rows, _ = read_all(t)
    assert lists.files[0].source.name == "sbu"
    assert rows[0]["url"] == "http://c.example/2.jpg" and rows[0]["caption"] == "sea"


def test_laion_parquet(tmp_path):
    f = tmp_path / "part-0.parquet"
    pq.write_table(pa.table({"SAMPLE_ID": [1, 2], "URL": ["http://d.example/1.jpg", "http://d.example/2.jpg"],
                             "TEXT": ["one", "two"], "similarity": [0.3, 0.4]}), f)
    lists, rows, _ = read_all(f)
    assert lists.files[0].source.name == "laion"
    assert [(r["row"], r["caption"]) for r in rows] == [(0, "one"), (1, "two")]


def test_laion_metadata_columns_travel_typed_and_a_bad_value_is_null(tmp_path):
    f = tmp_path / "laion.parquet"
    pq.write_table(pa.table({"URL": ["http://d.example/1.jpg", "http://d.example/2.jpg"], "TEXT": ["one", "two"],
                             "similarity": [0.31, 0.29], "punsafe": [0.01, None], "pwatermark": [0.9, 0.1],
                             "WIDTH": [640.0, float("nan")], "HEIGHT": [480, 300], "LICENSE": ["?", "cc-by"],
                             "NSFW": ["UNLIKELY", "UNSURE"], "hash": [1, 2]}), f)
    _, rows, _ = read_all(f)
    m0, m1 = rows[0]["meta"], rows[1]["meta"]
    assert {k: m0[k] for k in ("similarity", "punsafe", "pwatermark")} == pytest.approx(
        {"similarity": 0.31, "punsafe": 0.01, "pwatermark": 0.9}, rel=1e-6)
    assert (m0["width"], m0["height"], m0["license"], m0["nsfw"]) == (640, 480, "?", "UNLIKELY")
    assert m1["punsafe"] is None and m1["width"] is None and m1["height"] == 300 and m1["nsfw"] == "UNSURE"
    g = tmp_path / "plain.parquet"  # a list without such columns carries none
    pq.write_table(pa.table({"URL": ["http://d.example/3.jpg"], "TEXT": ["three"]}), g)
    assert read_all(g)[1][0]["meta"] is None


def test_a_folder_is_read_file_by_file_in_name_order(tmp_path):
    for i in range(3):
        pq.write_table(pa.table({"URL": [f"http://e.example/{i}/{j}.jpg" for j in range(2)],
                                 "TEXT": ["t", "u"]}), tmp_path / f"laion-{i}.parquet")
    lists, rows, _ = read_all(tmp_path, "laion")
    assert [f.path.rsplit("/", 1)[-1] for f in lists.files] == [f"laion-{i}.parquet" for i in range(3)]
    assert [r["row"] for r in rows] == [0, 1] * 3 and rows[2]["url"] == "http://e.example/1/0.jpg"


def test_bad_captions_are_rows_with_their_reason(tmp_path):
    f = tmp_path / "list.tsv"
    f.write_bytes(b"http://f.example/1.jpg\tok caption\n"
                  b"http://f.example/2.jpg\t\xff\xfe broken\n"
                  b"http://f.example/3.jpg\t   \n")
    _, rows, counts = read_all(f, "cc12m")
    assert [r["status"] for r in rows] == [None, "bad_caption", "bad_caption"]
    assert [r["error"] for r in rows[1:]] == ["caption is not valid UTF-8", "empty caption"]
    assert "broken" in rows[1]["caption"] and counts[0].statuses == {"bad_caption": 2}
    # A json file with raw invalid bytes in a caption is still readable; the row is flagged.
    j = tmp_path / "sbu.json"
    j.write_bytes(b'[{"url": "http://f.example/4.jpg", "caption": "caf\xe9"}]')
    _, rows, _ = read_all(j, "sbu")
    assert rows[0]["status"] == "bad_caption" and rows[0]["error"] == "caption is not valid UTF-8"


def test_malformed_lines_are_rows_and_blank_lines_are_counted(tmp_path):
    f = tmp_path / "cc12m.tsv"
    f.write_bytes(b"http://g.example/1.jpg\tone\nno-tab-here\n\n  \nhttp://g.example/2.jpg\ttwo\ttoo many\n"
                  b"http://g.example/3.jpg\tthree\n")
    _, rows, counts = read_all(f, "cc12m")
    assert [r["status"] for r in rows] == [None, "malformed_row", "malformed_row", None]
    assert rows[1]["error"] == "line 2: 1 fields, expected 2" and rows[2]["error"].startswith("line 5: 3 fields")
    assert counts[0].rows == 4 and counts[0].blank_lines == 2  # 6 lines = 4 rows + 2 blank: all accounted for


def test_a_stray_quote_in_a_csv_costs_one_row_not_the_rest_of_the_file(tmp_path):
    f = tmp_path / "urls.csv"
    lines = ['url,caption', '"http://h.example/0.jpg","unterminated quote', 'http://h.example/1.jpg,"a, quoted, caption"']
    lines += [f"http://h.example/{i}.jpg,caption {i}" for i in range(2, 2000)]
    f.write_text("\n".join(lines) + "\n")
    _, rows, counts = read_all(f, "generic")
    assert len(rows) == 2000 == counts[0].rows  # one row per line after the header
    assert rows[0]["status"] == "malformed_row" and "line 2" in rows[0]["error"]
    assert rows[1]["caption"] == "a, quoted, caption" and rows[1]["status"] is None
    assert all(r["status"] is None and "\n" not in r["caption"] for r in rows[1:])


@pytest.mark.parametrize("url_type,caption_type,bad", [
    (pa.int64(), pa.string(), "'url' is int64"),
    (pa.float64(), pa.string(), "'url' is double"),
    (pa.list_(pa.string()), pa.string(), "'url' is list<"),
    (pa.string(), pa.int64(), "'caption' is int64"),
    (pa.string(), pa.timestamp("s"), "'caption' is timestamp"),
    (pa.string(), pa.map_(pa.string(), pa.string()), "'caption' is map"),
])
def test_wrong_column_types_are_clear_errors_before_any_work(tmp_path, url_type, caption_type, bad):
    values = {pa.int64(): [1], pa.float64(): [float("nan")], pa.string(): ["x"], pa.timestamp("s"): [0]}
    url = pa.array(values.get(url_type, [["http://x/1"]]), url_type)
    caption = pa.array(values.get(caption_type, [[("k", "v")]]), caption_type)
    f = tmp_path / "list.parquet"
    pq.write_table(pa.table({"url": url, "caption": caption}), f)
    with pytest.raises(SchemaError, match=bad) as e:
        open_url_lists(str(f), "generic")
    assert str(f) in str(e.value)


def test_text_columns_may_be_binary_dictionary_or_a_list_of_captions(tmp_path):
    f = tmp_path / "list.parquet"
    pq.write_table(pa.table({"url": pa.array([b"http://x/1.jpg"], pa.binary()).dictionary_encode(),
                             "caption": pa.array([["first", "second"]], pa.list_(pa.string()))}), f)
    _, rows, _ = read_all(f, "generic")
    assert rows[0]["url"] == "http://x/1.jpg" and rows[0]["captions"] == ["first", "second"]


def test_duplicate_column_names_are_refused(tmp_path):
    table = pa.Table.from_arrays([pa.array(["http://x/1.jpg"]), pa.array(["caption"])], names=["url", "url"])
    pq.write_table(table, tmp_path / "dup.parquet")
    (tmp_path / "dup.csv").write_text("url,caption,url\nhttp://x/1.jpg,c,http://x/2.jpg\n")
    (tmp_path / "dup.jsonl").write_text('{"url": "http://x/1.jpg", "caption": "c", "caption": "d"}\n')
    for name in ("dup.parquet", "dup.csv", "dup.jsonl"):
        with pytest.raises(SchemaError, match="duplicate column") as e:
            open_url_lists(str(tmp_path / name), "generic")
        assert name in str(e.value)


def test_json_values_of_the_wrong_type_are_counted_rows(tmp_path):
    f = tmp_path / "sbu.json"
    f.write_text(json.dumps([{"url": "http://x/1.jpg", "caption": "ok"}, {"url": 1, "caption": "number url"},
                             {"url": "http://x/2.jpg", "caption": {"k": "v"}}, {"url": "http://x/3.jpg", "caption": 7},
                             ["not", "an", "object"]]))
    _, rows, _ = read_all(f, "sbu")
    assert [r["status"] for r in rows] == [None, "invalid_url", "bad_caption", "bad_caption", "malformed_row"]
    assert rows[1]["error"] == "URL is a int, not text" and rows[3]["error"] == "caption is a int, not text"
    # ... unless the very first record has them: then the file is refused before any work.
    (tmp_path / "first.json").write_text(json.dumps([{"url": 5, "caption": "c"}]))
    with pytest.raises(SchemaError, match="'url' holds int values"):
        open_url_lists(str(tmp_path / "first.json"), "sbu")


def test_length_limits_and_undecodable_urls(tmp_path):
    f = tmp_path / "cc12m.tsv"
    f.write_bytes(b"http://x/" + b"a" * 200 + b".jpg\tfine\n"
                  b"http://x/1.jpg\t" + b"long " * 2000 + b"\n"
                  b"http://x/\xff.jpg\tbad bytes in the url\n")
    _, rows, _ = read_all(f, "cc12m", limits=Limits(max_url_bytes=100, max_caption_bytes=4096))
    assert [r["status"] for r in rows] == ["invalid_url", "bad_caption", "invalid_url"]
    assert "over download.max_url_bytes=100" in rows[0]["error"]
    assert "10000 bytes, over download.max_caption_bytes=4096" in rows[1]["error"]
    assert len(rows[1]["caption"]) <= 201  # a refused caption is kept only in part
    assert rows[2]["error"] == "URL is not valid UTF-8"


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


def test_unknown_source_policy_and_missing_input(tmp_path):
    with pytest.raises(ValueError, match="unknown source 'flickr'"):
        open_url_lists(str(tmp_path), "flickr")
    with pytest.raises(ValueError, match="unknown caption policy 'artisanal'"):
        open_url_lists(str(tmp_path), "auto", policy="artisanal")
    with pytest.raises(FileNotFoundError):
        open_url_lists(str(tmp_path / "nope.tsv"), "cc3m")


def test_every_source_declares_its_columns():
    for s in SOURCES.values():
        assert s.url_column and s.caption_column and s.formats and s.policy in ("web", "human")
        if not s.header:
            assert {s.url_column, s.caption_column} <= set(s.columns)


def test_fingerprint_names_the_file_version(tmp_path):
    f = tmp_path / "cc12m.tsv"
    f.write_text("http://x/1.jpg\tone\n")
    before = open_url_lists(str(f)).fingerprint()
    import os
    os.utime(f, (1, 1))  # same size, same path, another version
    assert open_url_lists(str(f)).fingerprint() != before and before[0]["bytes"] == f.stat().st_size


def test_gzipped_list_read_from_s3(tmp_path, s3_bucket):
    import fsspec

    data = gzip.compress(b"a caption\thttp://h.example/1.jpg\nanother\thttp://h.example/2.jpg\n")
    with fsspec.open(f"{s3_bucket}/lists/Train_GCC-training.tsv.gz", "wb") as f:
        f.write(data)
    lists, rows, _ = read_all(f"{s3_bucket}/lists/")
    assert lists.files[0].path == f"{s3_bucket}/lists/Train_GCC-training.tsv.gz"
    assert lists.files[0].source.name == "cc3m"
    assert [(r["row"], r["url"]) for r in rows] == [(0, "http://h.example/1.jpg"), (1, "http://h.example/2.jpg")]
    assert lists.fingerprint()[0]["version"]  # the ETag


def test_laion_coco_precomputed_captions_are_carried(tmp_path):
    f = tmp_path / "laion_coco.parquet"
    pq.write_table(pa.table({"URL": ["http://d.example/1.jpg"], "TEXT": ["alt text"], "top_caption": ["a dog"],
                             "all_captions": [["a dog", "a brown dog", "a dog on grass"]],
                             "all_similarities": [[0.31, 0.35, 0.29]]}), f)
    meta = read_all(f, "laion")[1][0]["meta"]
    assert meta["synthetic_captions"] == ["a dog", "a brown dog", "a dog on grass"]
    assert meta["synthetic_scores"] == pytest.approx([0.31, 0.35, 0.29], rel=1e-6)
