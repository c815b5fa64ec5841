"""Shard inspection on real shard sets built from the synthetic corpus (local and moto S3)."""
from __future__ import annotations

import json

import pyarrow as pa
import pytest

from pipelines.inspect import Distribution, inspect_shards
from pipelines.report import format_text
from pipelines.schema import CAPFILT, DOWNLOAD
from pipelines.shardio import ShardSet, shard_name
from tests.helpers.shards import capfilt_rows, corrupt_middle, download_rows, write_capfilt_set, write_download_set

# -- tests --------------------------------------------------------------------------------


def test_distribution_is_exact_and_bounded():
    d = Distribution()
    d.add([3, 1, 2, 2, 5])
    d.add([2, 4])
    s = d.summary()
    assert s["n"] == 7 and s["min"] == 1 and s["max"] == 5 and s["p50"] == 2
    assert s["mean"] == pytest.approx(19 / 7)
    assert len(d.counts) == 5  # memory: distinct values only
    scores = Distribution(resolution=0.001)
    scores.add([0.3201, 0.3199, float("nan")])
    assert scores.summary()["n"] == 2 and scores.summary()["max"] == pytest.approx(0.320)
    assert Distribution().summary() == {"n": 0}


@pytest.mark.parametrize("where", ["local", "s3"])
def test_download_set_statistics(where, corpus, tmp_path, request):
    uri = str(tmp_path / "dl") if where == "local" else request.getfixturevalue("s3_bucket") + "/dl"
    ss = write_download_set(uri, corpus)
    ins = inspect_shards(uri, sample=2, verify=True)
    assert ins.ok, ins.problems
    assert (ins.shards, ins.rows, ins.contract) == (3, 27, DOWNLOAD.tag)
    assert ins.bytes == sum(s["bytes"] for s in ss.read_manifest()["shards"])
    assert ins.status == {"ok": 24, "http_error": 3}
    assert ins.sources == {"synthetic": 24, "web": 3}
    assert ins.schema_versions == {DOWNLOAD.tag: 3}
    assert ins.width.summary()["n"] == 24 and ins.width.summary()["p50"] == 96
    # caption words: the 24 true captions + 3 failure captions of 3 words
    _, items = corpus
    expected = sorted([len(it.caption.split()) for it in items[:24]] + [3, 3, 3])
    assert ins.caption_words.n == 27
    assert ins.caption_words.summary()["max"] == expected[-1]
    assert ins.caption_words.summary()["mean"] == pytest.approx(sum(expected) / 27)
    assert ins.duplicate_keys == 0 and len(ins.samples) == 2
    assert ins.samples[0]["key"] == "synthetic/000000" and ins.samples[0]["image"].endswith("bytes>")
    text = format_text(ins)
    assert "rows 27" in text and "http_error: 3" in text and "consistency      OK" in text


def test_capfilt_set_statistics_read_image_headers(corpus, tmp_path):
    write_capfilt_set(str(tmp_path / "cf"), corpus)
    ins = inspect_shards(str(tmp_path / "cf"), thumbnails=5)
    assert ins.ok, ins.problems
    assert (ins.shards, ins.rows, ins.contract) == (2, 24, CAPFILT.tag)
    # sizes from the JPEG headers (the corpus is 96x96), one per row
    assert ins.width.summary() == {"n": 24, "min": 96, "p05": 96, "p50": 96, "p95": 96, "max": 96, "mean": 96}
    # indices 0,3,...,21 keep the original caption: 8 of 24
    assert ins.original_kept == 8 and ins.share_original_kept == pytest.approx(1 / 3)
    assert ins.clip_scores.n == 48
    assert ins.clip_scores.summary()["mean"] == pytest.approx((8 * (0.35 + 0.30) + 16 * (0.32 + 0.28)) / 48, abs=1e-3)
    assert len(ins.thumbnails) == 5 and ins.thumbnails[0].captions[0] == corpus[1][0].caption
    assert ins.thumbnails[0].jpeg[:2] == b"\xff\xd8"
    assert "original kept    8/24 rows (33.3%)" in format_text(ins)


def test_duplicate_keys_are_counted_and_named(corpus, tmp_path):
    ss = ShardSet(str(tmp_path / "dup"))
    ss.write_shard(0, pa.Table.from_pylist(download_rows(corpus, 0, 4, failures=0), schema=DOWNLOAD.schema), DOWNLOAD)
    ss.write_shard(1, pa.Table.from_pylist(download_rows(corpus, 2, 4, failures=0), schema=DOWNLOAD.schema), DOWNLOAD)
    ss.write_manifest(DOWNLOAD)
    ins = inspect_shards(ss.uri)
    assert ins.duplicate_keys == 2
    assert ins.duplicate_examples == {"synthetic/000002": [shard_name(0), shard_name(1)],
                                      "synthetic/000003": [shard_name(0), shard_name(1)]}


def test_verify_names_corrupted_and_missing_shards(corpus, tmp_path):
    root = tmp_path / "bad"
    write_download_set(str(root), corpus)
    corrupt_middle(root / shard_name(1))
    (root / shard_name(2)).unlink()
    quick = inspect_shards(str(root))             # listing check alone sees the deleted shard
    assert any(shard_name(2) in p and "missing" in p for p in quick.problems)
    assert not any(shard_name(1) in p for p in quick.problems if "sha256" in p)
    ins = inspect_shards(str(root), verify=True)
    assert not ins.ok
    assert any(p.startswith(shard_name(1)) and "corrupted" in p for p in ins.problems)
    assert any(p.startswith(shard_name(2)) and "missing" in p for p in ins.problems)
    assert not any(p.startswith(shard_name(0)) for p in ins.problems)


def test_missing_manifest_schema_mismatch_and_extra_shard(corpus, tmp_path):
    ss = write_download_set(str(tmp_path / "x"), corpus, shards=2, manifest=False)
    ins = inspect_shards(ss.uri)
    assert any("_manifest.json is missing" in p for p in ins.problems)
    assert ins.rows == 18 and ins.contract == DOWNLOAD.tag  # statistics still computed
    ss.write_manifest(DOWNLOAD)
    # a capfilt shard dropped into a download set, not in its manifest
    ss.write_shard(7, pa.Table.from_pylist(capfilt_rows(corpus, 0, 2), schema=CAPFILT.schema), CAPFILT)
    ins = inspect_shards(ss.uri, verify=True)
    assert any(p.startswith(shard_name(7)) and "not in the manifest" in p for p in ins.problems)
    assert any(p.startswith(shard_name(7)) and f"{DOWNLOAD.tag} contract" in p for p in ins.problems)
    assert ins.schema_versions == {DOWNLOAD.tag: 2, CAPFILT.tag: 1}


def test_unreadable_shard_does_not_stop_the_walk(corpus, tmp_path):
    ss = write_download_set(str(tmp_path / "t"), corpus, shards=2)
    (tmp_path / "t" / shard_name(0)).write_bytes(b"not parquet at all")
    ins = inspect_shards(ss.uri)
    assert any(p.startswith(shard_name(0)) and "unreadable" in p for p in ins.problems)
    assert any(p.startswith(shard_name(0)) and "size" in p for p in ins.problems)
    assert ins.rows == 9  # shard 1 still counted
    json.dumps(ins.to_dict(), default=str)  # the JSON summary stays serialisable


def test_manifest_that_disagrees_with_the_shards(corpus, tmp_path):
    ss = write_download_set(str(tmp_path / "m"), corpus, shards=2)
    manifest = ss.read_manifest()
    manifest["shards"][1]["rows"] += 5          # a shard record that lies about its rows
    manifest["num_rows"] += 5
    (tmp_path / "m" / "_manifest.json").write_text(json.dumps(manifest))
    ins = inspect_shards(ss.uri)
    assert f"{shard_name(1)}: 9 rows, manifest says 14" in ins.problems
    assert "_manifest.json: says 23 rows, the shards hold 18" in ins.problems
    assert not any(p.startswith(shard_name(0)) for p in ins.problems)
