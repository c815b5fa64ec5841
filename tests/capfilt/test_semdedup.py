"""SemDeDup on local Ray against a brute-force all-pairs reference, on planted near-duplicates."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from capfilt.curate_config import SemDedupFilter
from capfilt.semdedup import allocate, earlier_max, normalized, pack_groups, semdedup
from tests.helpers.embeddings import ArrayLoader, brute_force, planted

PER_SHARD = 250


def removed_rows(result: dict, per_shard: int = PER_SHARD) -> set[int]:
    return {shard * per_shard + int(r) for shard, rem in result.items() for r in rem.rows}


def test_earlier_max_matches_the_dense_matrix():
    e = normalized(np.random.default_rng(0).normal(size=(37, 8)))
    best, arg = earlier_max(e, block_elems=64)          # several row blocks
    sims = e @ e.T
    assert best[0] == -np.inf and arg[0] == -1
    for i in range(1, 37):
        assert arg[i] == int(np.argmax(sims[i, :i]))
        assert best[i] == pytest.approx(sims[i, :i].max(), abs=1e-6)


def test_allocate_and_pack_are_deterministic_and_balanced():
    assert allocate({0: 10, 1: 30, 2: 60}, 10) == {0: 1, 1: 3, 2: 6}
    assert sum(allocate({0: 7, 1: 7, 2: 7}, 10).values()) == 10
    assert allocate({0: 3}, 10) == {0: 3}
    group_of = pack_groups(np.array([50, 10, 40, 30, 20, 50]), rows_per_task=100)
    loads = np.bincount(group_of, weights=[50, 10, 40, 30, 20, 50])
    assert len(loads) == 2 and loads.max() - loads.min() <= 10
    assert (pack_groups(np.array([50, 10, 40, 30, 20, 50]), 100) == group_of).all()


@pytest.fixture(scope="module")
def data():
    emb, pairs = planted(1500, 24, pairs=60, seed=1)
    rng = np.random.default_rng(2)
    score = rng.uniform(0.2, 0.4, len(emb)).astype(np.float32)
    score[pairs[:5, 1]] = score[pairs[:5, 0]]      # ties in score: the smaller key stays
    key = np.array([f"k{i:05d}" for i in range(len(emb))])
    return emb, pairs, score, key


@pytest.mark.parametrize("clusters,probes,rows_per_task", [(1, 1, 10**6), (6, 6, 1000)])
def test_one_cluster_or_every_probe_is_exact_all_pairs(ray_local, tmp_path, data, clusters, probes, rows_per_task):
    emb, _, score, key = data
    cfg = SemDedupFilter(threshold=0.9, clusters=clusters, probes=probes, sample=800, rows_per_task=rows_per_task)
    loader = ArrayLoader.split(emb, score, key, PER_SHARD)
    counts = {s: len(v[0]) for s, v in loader.shards.items()}
    result, info = semdedup(loader, counts, str(tmp_path / "work"), cfg, seed=0, log=lambda m: None)
    expected = brute_force(emb.astype(np.float16), score, key, 0.9)
    assert removed_rows(result) == expected
    assert info["clusters"] == clusters and (info["groups"] > 1) == (rows_per_task < 10**6)
    assert not (tmp_path / "work" / "buckets").exists()     # scratch removed


def test_planted_pairs_found_with_the_defaults_and_the_better_row_stays(ray_local, tmp_path, data):
    emb, pairs, score, key = data
    loader = ArrayLoader.split(emb, score, key, PER_SHARD)
    counts = {s: len(v[0]) for s, v in loader.shards.items()}
    cfg = SemDedupFilter(threshold=0.95, sample=1000, rows_per_task=900)
    result, info = semdedup(loader, counts, str(tmp_path / "work"), cfg, seed=3, log=lambda m: None)
    assert info["clusters"] > 1 and info["groups"] >= 2
    removed = removed_rows(result)
    worse = {int(b) if (-score[b], key[b]) > (-score[a], key[a]) else int(a) for a, b in pairs}
    assert removed == worse                                   # recall and precision 1 on this data
    for shard, rem in result.items():                          # each names the row kept in its place
        for row, dup_shard, dup_row, dup_key, sim in zip(rem.rows, rem.dup_shard, rem.dup_row, rem.dup_key,
                                                         rem.similarity):
            a, b = shard * PER_SHARD + row, dup_shard * PER_SHARD + dup_row
            assert key[b] == dup_key and (-score[b], key[b]) < (-score[a], key[a])
            assert sim == pytest.approx(float(normalized(emb[[a]].astype(np.float16))[0]
                                              @ normalized(emb[[b]].astype(np.float16))[0]), abs=1e-4)
    again, _ = semdedup(loader, counts, str(tmp_path / "work2"), cfg, seed=3, log=lambda m: None)
    assert removed_rows(again) == removed                      # deterministic
    one_probe, _ = semdedup(loader, counts, str(tmp_path / "work3"), dataclasses.replace(cfg, probes=1), seed=3,
                            log=lambda m: None)
    assert removed_rows(one_probe) <= removed                  # one probe can only miss pairs


def test_nothing_to_do(ray_local, tmp_path):
    assert semdedup(ArrayLoader({}), {}, str(tmp_path), SemDedupFilter(), 0, log=lambda m: None)[0] == {}
