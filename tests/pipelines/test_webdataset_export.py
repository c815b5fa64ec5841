"""A CapFilt shard set exported as WebDataset tars and read back with the webdataset package."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.schema import CAPFILT
from pipelines.shardio import ShardSet
from pipelines.webdataset_export import SIZES, export_webdataset, sample_key
from tests.helpers.shards import write_capfilt_set


@pytest.mark.parametrize("where", ["local", "s3"])
def test_export_reads_back_row_for_row_with_an_open_clip_pattern(where, ray_local, corpus, tmp_path, request):
    import webdataset as wds

    base = str(tmp_path) if where == "local" else request.getfixturevalue("s3_bucket")
    src = write_capfilt_set(f"{base}/capfilt", corpus, shards=2, per_shard=5)
    summary = export_webdataset(src.uri, f"{base}/wds", log=lambda m: None)
    assert summary["pattern"] == f"{base}/wds/{{00000..00001}}.tar" and summary["samples"] == 10
    rows = [r for n in src.committed() for r in src.read_shard(n, CAPFILT).to_pylist()]
    if where == "local":  # open_clip's --train-data takes this brace pattern as it is
        samples = list(wds.WebDataset(summary["pattern"], shardshuffle=False))
    else:  # read the tars through fsspec into the same reader
        from pipelines.adapters import tar_samples

        dst = ShardSet(f"{base}/wds")
        samples = [s for n in ("00000.tar", "00001.tar") for s in tar_samples(dst.fs.open(dst.path(n), "rb"))]
    assert len(samples) == len(rows)
    for row, sample in zip(rows, samples):
        assert sample["__key__"] == sample_key(row["key"]) and sample["jpg"] == row["image"]
        assert sample["txt"].decode() == row["captions"][0]
        info = json.loads(sample["json"])
        assert info["key"] == row["key"] and info["captions"] == row["captions"]
        assert info["scores"] == pytest.approx(row["scores"]) and info["source"] == row["source"]
    dst = ShardSet(f"{base}/wds")
    assert json.loads(dst.fs.cat(dst.path(SIZES))) == {"00000.tar": 5, "00001.tar": 5}
    again = export_webdataset(src.uri, dst.uri, log=lambda m: None)  # a rerun skips what is there
    assert again["written"] == 0 and again["tars"] == 2


def test_colliding_repeated_and_unusable_rows_still_give_tars_webdataset_reads(ray_local, corpus, tmp_path):
    """Issue 32 D7 and L4 (export): keys that sanitising used to merge (``a.b``/``a_b``), a key that
    repeats, a row without captions and one without an image; read back by webdataset itself."""
    import webdataset as wds

    from pipelines.webdataset_export import original_key
    from tests.helpers.shards import capfilt_row, write_set

    root, items = corpus
    img = [(root / it.file).read_bytes() for it in items[:6]]
    keys = ["src/a.b", "src/a_b", "src/a%2Eb", "src/x#1", "dup", "dup"]
    rows = [capfilt_row(k, img[i], [f"caption {i}"], [0.5]) for i, k in enumerate(keys)]
    empty = capfilt_row("no/captions", img[0], ["x"], [0.5])
    empty.update(captions=[], scores=[])
    src = write_set(str(tmp_path / "capfilt"), CAPFILT, [rows + [empty, capfilt_row("no/image", img[1], ["y"], [0.5])]])
    table = src.read_shard("part-00000.parquet")  # a foreign shard: CapFilt never writes a null image
    field = table.schema.field("image").with_nullable(True)
    table = table.set_column(table.schema.get_field_index("image"), field,
                             pa.array(table.column("image").to_pylist()[:-1] + [None], pa.binary()))
    pq.write_table(table, src.path("part-00000.parquet"))
    summary = export_webdataset(src.uri, str(tmp_path / "wds"), log=lambda m: None)
    assert (summary["samples"], summary["skipped"]) == (6, 2)
    samples = list(wds.WebDataset(summary["pattern"], shardshuffle=False))
    assert [s["__key__"] for s in samples] == ["src%2Fa%2Eb", "src%2Fa_b", "src%2Fa%252Eb", "src%2Fx%231", "dup",
                                               "dup#2"]
    assert [original_key(s["__key__"]) for s in samples] == keys == [json.loads(s["json"])["key"] for s in samples]
    assert [s["txt"].decode() for s in samples] == [f"caption {i}" for i in range(6)]
    assert json.loads((tmp_path / "wds" / SIZES).read_text()) == {"00000.tar": 6}
    (tmp_path / "wds" / SIZES).unlink()
    again = export_webdataset(src.uri, str(tmp_path / "wds"), log=lambda m: None)  # resumed: counted, not rewritten
    assert (again["written"], again["samples"], again["skipped"]) == (0, 6, 2)
