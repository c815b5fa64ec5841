"""`blip2 curate` as a Ray job on local Ray: every removed row accounted for, with its reason and scores."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from capfilt.curate import run_curate
from capfilt.curate_config import (AestheticFilter, ClipScoreFilter, CurateConfig, ExactDedupFilter, NsfwFilter,
                                   SemDedupFilter, WatermarkFilter)
from capfilt.embeddings import read_embeddings, read_metadata, write_embeddings
from capfilt.heads import build_head, load_head, save_head, score
from pipelines.curation import REMOVED_DIR, SCORES_DIR
from pipelines.schema import CAPFILT, CURATE_SCORES, REMOVED, SchemaError
from pipelines.shardio import COMMITS, ShardSet, shard_name
from tests.helpers.curation import write_curation_input

QUIET = dict(log=lambda m: None)


def read_rows(uri: str, contract) -> list[dict]:
    ss = ShardSet(uri)
    return [r for n in ss.committed() for r in ss.read_shard(n, contract).to_pylist()]


@pytest.fixture(scope="module")
def curated(ray_local, corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("curate")
    data = write_curation_input(str(root / "in"), corpus)
    cfg = CurateConfig(input=data.uri, output=str(root / "out"))
    return data, cfg, run_curate(cfg, seed=0, **QUIET)


def test_default_filters_remove_exactly_the_planted_rows(curated):
    data, cfg, summary = curated
    removed = {r["key"]: r for r in read_rows(f"{cfg.output}/{REMOVED_DIR}", REMOVED)}
    kept = [r["key"] for r in read_rows(cfg.output, CAPFILT)]
    expected = set().union(*data.removed.values())
    assert set(removed) == expected and len(expected) == 4 + 3 + 4
    assert sorted(kept + list(removed)) == sorted(data.keys)              # nothing lost, nothing twice
    for reason, keys in data.removed.items():
        assert {k for k, r in removed.items() if reason in r["reasons"]} == keys, reason
    for key, row in removed.items():
        assert len(row["reasons"]) == 1
        if key in data.duplicate_of:
            assert row["duplicate_of"] == data.duplicate_of[key]
            cos = float(data.embeddings[key] @ data.embeddings[row["duplicate_of"]])
            assert row["similarity"] == pytest.approx(1.0 if "exact_duplicate" in row["reasons"] else cos, abs=2e-3)
        else:
            assert row["duplicate_of"] is None and row["clip_score"] < 0.22
    s = summary["set"]
    assert (s["rows_in"], s["kept"], s["removed"], s["accounted"]) == (47, 36, 11, True)
    assert s["by_reason"] == {"no_image": 0, "bad_embedding": 0, "clip_score": 4, "nsfw": 0, "watermark": 0,
                              "aesthetic": 0, "exact_duplicate": 3, "near_duplicate": 4}
    assert summary["thresholds"]["quantile_score"] == pytest.approx(0.22, abs=1e-4)


def test_side_table_rows_are_whole_and_curated_embeddings_stay_aligned(curated):
    data, cfg, _ = curated
    src, out = ShardSet(data.uri), ShardSet(cfg.output)
    inputs = {r["key"]: r for r in read_rows(data.uri, CAPFILT)}
    for r in read_rows(f"{cfg.output}/{REMOVED_DIR}", REMOVED):
        assert r["image"] == inputs[r["key"]]["image"] and r["captions"] == inputs[r["key"]]["captions"]
        assert r["url"] == f"http://127.0.0.1/{r['key']}" and r["sha256"] == inputs[r["key"]]["sha256"]
    for name in out.committed():
        index = int(name[5:10])
        shard = out.read_shard(name, CAPFILT)
        keys = shard.column("key").to_pylist()
        assert read_metadata(out, index).column("key").to_pylist() == keys
        emb = read_embeddings(out, index).astype(np.float32)
        np.testing.assert_allclose(emb, np.stack([data.embeddings[k] for k in keys]), atol=2e-3)
        removed_here = ShardSet(f"{cfg.output}/{REMOVED_DIR}").read_shard(name, REMOVED)
        original = src.read_shard(name, CAPFILT).column("key").to_pylist()
        for key, row in zip(removed_here.column("key").to_pylist(), removed_here.column("row").to_pylist()):
            assert original[row] == key                                # the side table names the input row
    scores = ShardSet(f"{cfg.output}/{SCORES_DIR}")
    assert sum(scores.read_shard(n, CURATE_SCORES).num_rows for n in scores.committed()) == 47
    assert out.read_manifest()["num_rows"] == 36
    assert ShardSet(f"{cfg.output}/{REMOVED_DIR}").read_manifest()["num_rows"] == 11
    assert not out.fs.exists(out.path("_curate/work"))


def test_rerun_skips_committed_shards_and_rewrites_a_lost_one_identically(curated):
    data, cfg, _ = curated
    out, side = ShardSet(cfg.output), ShardSet(f"{cfg.output}/{REMOVED_DIR}")
    before = (out.shard_info(shard_name(1)), side.shard_info(shard_name(1)))
    again = run_curate(cfg, seed=0, **QUIET)
    assert again["shards_written"] == 0 and again["shards_skipped"] == 4 and again["set"]["kept"] == 36
    out.fs.rm(out.path(shard_name(1)))
    resumed = run_curate(cfg, seed=0, **QUIET)
    assert resumed["shards_written"] == 1 and resumed["set"]["rows_in"] == 47
    assert (out.shard_info(shard_name(1)), side.shard_info(shard_name(1))) == before   # same bytes (sha256)


def test_other_settings_on_the_same_output_are_refused(curated):
    _, cfg, _ = curated
    other = dataclasses.replace(cfg, semdedup=SemDedupFilter(threshold=0.5))
    with pytest.raises(SchemaError, match="other filters"):
        run_curate(other, seed=0, **QUIET)


def test_missing_embeddings_fail_before_any_work(ray_local, corpus, tmp_path):
    data = write_curation_input(str(tmp_path / "in"), corpus)
    ss = ShardSet(data.uri)
    ss.fs.rm(ss.path("embeddings/img_emb/img_emb_00002.npy"))
    with pytest.raises(SchemaError, match="part-00002.parquet has no image embeddings"):
        run_curate(CurateConfig(input=data.uri, output=str(tmp_path / "out")), seed=0, **QUIET)
    assert not (tmp_path / "out" / shard_name(0)).exists()


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    import torch

    root = tmp_path_factory.mktemp("heads")
    torch.manual_seed(0)
    return {"nsfw": save_head(build_head("nsfw", 32), "nsfw", root / "nsfw"),
            "aesthetic": save_head(build_head("aesthetic_mlp", 32), "aesthetic_mlp", root / "aesthetic")}


def test_heads_laion_columns_and_human_rows_on_s3(ray_local, corpus, s3_bucket, heads):
    """Shards carrying LAION's punsafe/pwatermark (meta) and human rows, heads from local folders, output on moto S3."""
    data = write_curation_input(f"{s3_bucket}/in", corpus, laion_columns=True)
    emb = np.stack([data.embeddings[k] for k in data.keys])
    nsfw = score(load_head(heads["nsfw"])[1], emb)
    aesthetic = score(load_head(heads["aesthetic"])[1], emb)
    nsfw_th, aesthetic_min = float(np.quantile(nsfw, 0.8)), float(np.quantile(aesthetic, 0.25))
    cfg = CurateConfig(input=data.uri, output=f"{s3_bucket}/out", exact_dedup=ExactDedupFilter(enabled=False),
                       semdedup=SemDedupFilter(enabled=False), clip_score=ClipScoreFilter(quantile=0.1),
                       nsfw=NsfwFilter(head=heads["nsfw"], threshold=nsfw_th),
                       aesthetic=AestheticFilter(head=heads["aesthetic"], min_score=aesthetic_min),
                       watermark=WatermarkFilter(threshold=0.8))
    summary = run_curate(cfg, seed=0, **QUIET)
    rows = {r["key"]: r for r in read_rows(data.uri, CAPFILT)}
    table = {}
    for n in ShardSet(data.uri).committed():
        t = ShardSet(data.uri).read_shard(n, CAPFILT).to_pylist()
        table.update({r["key"]: (r["meta"]["punsafe"], r["meta"]["pwatermark"], r["policy"]) for r in t})
    web_scores = sorted(rows[k]["scores"][0] for k in data.keys if table[k][2] != "human")
    clip_th = web_scores[math.ceil(0.1 * len(web_scores)) - 1]
    expected = {
        "clip_score": {k for k in data.keys if table[k][2] != "human" and rows[k]["scores"][0] < clip_th - 1e-6},
        "nsfw": {k for i, k in enumerate(data.keys) if nsfw[i] > nsfw_th or (table[k][0] or 0) > 0.5},
        "watermark": {k for k in data.keys if table[k][1] > 0.8},
        "aesthetic": {k for i, k in enumerate(data.keys) if aesthetic[i] < aesthetic_min},
    }
    assert all(expected.values()) and "syn/0000" not in expected["clip_score"]     # human rows keep their place
    removed = {r["key"]: r for r in read_rows(f"{cfg.output}/{REMOVED_DIR}", REMOVED)}
    for reason, keys in expected.items():
        assert {k for k, r in removed.items() if reason in r["reasons"]} == keys, reason
    assert set(removed) == set().union(*expected.values())
    for key, r in removed.items():   # every score of the decision is in the record
        i = data.keys.index(key)
        assert r["nsfw"] == pytest.approx(nsfw[i], abs=1e-5) and r["aesthetic"] == pytest.approx(aesthetic[i], abs=1e-4)
        assert r["punsafe"] == (None if table[key][0] is None else pytest.approx(table[key][0]))
        assert r["pwatermark"] == pytest.approx(table[key][1])
    s = summary["set"]
    assert s["accounted"] and s["kept"] + s["removed"] == 47 and s["removed"] == len(removed)
    assert s["by_reason"]["nsfw"] == len(expected["nsfw"])


def test_every_filter_switched_off_keeps_every_row(ray_local, corpus, tmp_path):
    data = write_curation_input(str(tmp_path / "in"), corpus)
    off = dict(enabled=False)
    cfg = CurateConfig(input=data.uri, output=str(tmp_path / "out"), clip_score=ClipScoreFilter(**off),
                       exact_dedup=ExactDedupFilter(**off), semdedup=SemDedupFilter(**off), nsfw=NsfwFilter(**off),
                       watermark=WatermarkFilter(**off), aesthetic=AestheticFilter(**off))
    summary = run_curate(cfg, seed=0, **QUIET)
    assert summary["set"]["kept"] == 47 and summary["set"]["removed"] == 0
    assert [r["key"] for r in read_rows(cfg.output, CAPFILT)] == data.keys


def test_partitioned_exact_dedup_matches_one_partition_and_unusable_rows_are_removed(ray_local, corpus, tmp_path):
    """sha256 partitions over map tasks (rows_per_task 5: 10 partitions, 10 map tasks) remove the
    same rows as one partition; a null image (L4) and a NaN embedding (L5) are counted removals."""
    data = write_curation_input(str(tmp_path / "in"), corpus)
    taken = set().union(*data.removed.values(), data.duplicate_of.values())
    ss = ShardSet(data.uri)
    table = ss.read_shard(shard_name(1), CAPFILT)
    free = [i for i, k in enumerate(table.column("key").to_pylist()) if k not in taken]
    null_row, nan_row = free[0], free[1]
    images = table.column("image").to_pylist()
    images[null_row] = None
    at = table.schema.get_field_index("image")
    table = table.cast(table.schema.set(at, table.schema.field(at).with_nullable(True)))
    table = table.set_column(at, table.schema.field(at), pa.array(images, pa.binary()))
    emb = read_embeddings(ss, 1).astype(np.float32)
    emb[nan_row] = np.nan
    pq.write_table(table, ss.path(shard_name(1)))   # a foreign shard: our writer refuses a null image
    ss.fs.rm(ss.path(f"{COMMITS}/{shard_name(1)}.json"))
    write_embeddings(ss, 1, table, emb, emb)
    keys = table.column("key").to_pylist()

    runs = {}
    for per_task in (10**9, 5):
        cfg = CurateConfig(input=data.uri, output=str(tmp_path / f"out{per_task}"), exact_rows_per_task=per_task,
                           semdedup=SemDedupFilter(enabled=False))
        summary = run_curate(cfg, seed=0, **QUIET)
        runs[per_task] = {r["key"]: (r["reasons"], r["duplicate_of"])
                          for r in read_rows(f"{cfg.output}/{REMOVED_DIR}", REMOVED)}
        assert summary["set"]["accounted"] and summary["set"]["by_reason"]["exact_duplicate"] == 3
        assert (summary["set"]["by_reason"]["no_image"], summary["set"]["by_reason"]["bad_embedding"]) == (1, 1)
    assert runs[5] == runs[10**9]
    assert runs[5][keys[null_row]] == (["no_image"], None) and runs[5][keys[nan_row]] == (["bad_embedding"], None)
    exact = {k: dup for k, (reasons, dup) in runs[5].items() if "exact_duplicate" in reasons}
    assert exact == {k: data.duplicate_of[k] for k in data.removed["exact_duplicate"]}
