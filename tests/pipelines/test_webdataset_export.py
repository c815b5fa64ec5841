"""A CapFilt shard set exported as WebDataset tars and read back with the webdataset package."""
from __future__ import annotations

import json

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
