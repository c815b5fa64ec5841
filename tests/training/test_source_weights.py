"""Per-source sampling weights (``ingest.source_weights``): the weighted epoch order as a pure
function, its split over ranks on resume, the shards' source runs, config checks, the realised
mix, and one run through ``run_training`` whose metrics hold it."""
from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from tests.training.train_fixtures import TOY, run_training_with_hooks, write_capfilt
from training.config import ModelConfig, TrainConfig
from training.ingest import (Augment, EpochOrder, IngestConfig, ShardRows, list_shards, rank_picks, rank_read_tasks,
                             step_split, steps_per_epoch)
from training.metrics import read_metrics
from training.source_weights import check_weight_names
from training.text import pre_caption

# a: 8 shards of 600 rows (a partial chunk each); b: 30 shards of 10 full chunks; one shard mixes
# both sources inside each of its two chunks
A = [ShardRows(f"a{i}", 600, ((0, 600, "a"),)) for i in range(8)]
B = [ShardRows(f"b{i}", 2560, ((0, 2560, "b"),)) for i in range(30)]
MIXED = ShardRows("m", 512, ((0, 100, "a"), (100, 300, "b"), (300, 512, "a")))
SHARDS = A[:4] + [MIXED] + B + A[4:]
ROWS = {"a": 8 * 600 + 312, "b": 30 * 2560 + 200}


def _entries(order: EpochOrder, lo: int = 0, hi: int | None = None) -> list[tuple[int, int, int, int]]:
    """(shard index, row, source index, copy) of positions [lo, hi)."""
    return list(zip(*(c.tolist() for c in order.take(lo, order.total if hi is None else hi))))


def _rows_of(shard: ShardRows, chunk: int, source: str) -> int:
    lo, hi = 256 * chunk, min(256 * (chunk + 1), shard.rows)
    return sum(max(0, min(hi, b) - max(lo, a)) for a, b, s in shard.sources if s == source)


def _order(epoch: int = 0, weights=None, seed: int = 3, window: int = 4) -> EpochOrder:
    return EpochOrder(SHARDS, seed=seed, epoch=epoch, window=window, weights={"a": 2, "b": 0.5} if weights is None
                      else weights)


def test_weighted_order_is_a_pure_function_that_changes_by_epoch():
    first = _entries(_order())
    assert _entries(_order()) == first                        # same (seed, epoch, shards, weights): same order
    assert _entries(_order(epoch=1)) != first                 # a new order (and new draws) each epoch
    assert _entries(_order(seed=4)) != first
    assert _entries(_order(weights={"a": 2, "b": 0.6})) != first
    # weights of 1 are the unweighted order itself (single-source chunks)
    plain = EpochOrder(A + B, seed=3, epoch=0, window=4)
    ones = EpochOrder(A + B, seed=3, epoch=0, window=4, weights={"a": 1})
    assert [e[:2] for e in _entries(ones)] == list(zip(*(c.tolist() for c in plain.positions(0, plain.total))))


def test_up_weighted_rows_appear_exactly_w_times_and_half_weight_within_a_binomial_bound():
    chunks_b = 30 * 10 + 2                                    # b's parts: 300 chunks + the mixed chunks' b rows
    bound = 4 * math.sqrt(chunks_b * 0.25)                    # 4 sigma of Binomial(302, 0.5)
    kept_per_epoch = []
    for epoch in range(4):
        order = _order(epoch)
        entries = _entries(order)
        a, b = order.sources.index("a"), order.sources.index("b")
        per_row = Counter((s, r, src) for s, r, src, _ in entries)
        assert all(n == 2 for (_, _, src), n in per_row.items() if src == a)        # every a row exactly twice
        assert sum(1 for _, _, src in per_row if src == a) == ROWS["a"]
        assert {c for _, _, src, c in entries if src == a} == {0, 1}                 # as copy 0 and copy 1
        assert all(n == 1 for (_, _, src), n in per_row.items() if src == b)        # a b row at most once ...
        kept = {(s, r // 256) for s, r, src, _ in entries if src == b}               # ... whole chunks at a time
        rows_b = sum(1 for e in entries if e[2] == b)
        assert rows_b == sum(_rows_of(SHARDS[s], c, "b") for s, c in kept)
        assert abs(len(kept) - chunks_b / 2) <= bound, (epoch, len(kept))
        assert order.source_counts(order.total).tolist() == [2 * ROWS["a"], rows_b]
        for hi in (0, 1, 777, 256 * 4 + 5, order.total - 3):                       # counts of any prefix
            got = np.bincount([e[2] for e in entries[:hi]], minlength=2).tolist()
            assert order.source_counts(hi).tolist() == got
        kept_per_epoch.append(len(kept))
    assert len(set(kept_per_epoch)) > 1                                              # the draws differ by epoch


def test_weight_zero_drops_a_source_and_the_mixed_chunk_splits_by_row():
    order = _order(weights={"b": 0})
    entries = _entries(order)
    assert {order.sources[src] for _, _, src, _ in entries} == {"a"}
    assert len(entries) == len(set(entries)) == ROWS["a"]                          # a at weight 1: once each
    m = SHARDS.index(MIXED)
    assert sorted(r for s, r, _, _ in entries if s == m) == list(range(100)) + list(range(300, 512))
    assert _order(weights={"a": 0, "b": 0}).total == 0


def test_unknown_and_negative_weights_are_clear_errors(tmp_path, corpus):
    with pytest.raises(ValueError, match=r"source\(s\) \['laoin'\].*its sources: \['a', 'b'\]"):
        check_weight_names({"laoin": 0.5, "a": 1}, SHARDS)
    for bad in (-1, float("nan"), "x"):
        with pytest.raises(ValueError, match="source_weights.coco must be a number >= 0"):
            IngestConfig(source_weights={"coco": bad}).validate()
    # through run_training: refused on the driver once the shard set is read, before Ray Train starts
    from training.loop import run_training

    write_capfilt(str(tmp_path / "cf"), corpus, source=lambda i: "coco" if i < 24 else "laion")
    cfg = TrainConfig(input=str(tmp_path / "cf"), output=str(tmp_path / "runs"))
    cfg.validate()
    with pytest.raises(ValueError, match=r"\['coc'\].*\['coco', 'laion'\]"):
        run_training(ModelConfig(), cfg, IngestConfig(source_weights={"coc": 2}))
    assert not (tmp_path / "runs").exists()


def test_resume_at_another_world_size_consumes_exactly_the_remaining_weighted_entries():
    order = _order(window=8)
    g, b = 240, 50
    stop = steps_per_epoch(order, g) * g
    assert stop == order.total - order.total % g

    def consumed(world, start, end):
        return sorted(p for r in range(world) for pos, _, _ in rank_picks(order, step_split(g, b, world), r, start, end)
                      for p in pos.tolist())

    cut = 37 * g                                                                     # a mid-epoch step
    assert order.window_start(order.window_of(cut)) < cut                           # inside a window
    assert consumed(2, 0, cut) + consumed(3, cut, stop) == list(range(stop))
    # the read tasks of the resumed ranks hand over exactly the remaining entries, copy numbers included
    handed = Counter()
    for r in range(3):
        for t in rank_read_tasks(order, rank_picks(order, step_split(g, b, 3), r, cut, stop)):
            handed.update((t["urls"][c], t["starts"][c] + o, k) for c, o, k in zip(t["chunk"], t["offset"], t["copy"]))
    want = Counter((SHARDS[s].url, row, c) for s, row, _, c in _entries(order, cut, stop))
    assert handed == want


def test_copies_of_a_row_are_augmented_differently(corpus):
    root, items = corpus
    image = (root / items[0].file).read_bytes()
    batch = {"key": np.array(["k"] * 8, dtype=object), "image": np.array([image] * 8, dtype=object),
             "captions": np.array([["one caption", "another caption"]] * 8, dtype=object),
             "copy": np.arange(8)}
    out = Augment(seed=0, epoch=0, image_size=32, min_scale=0.5, max_words=50)(batch)
    views = {out["pixel_values"][i].tobytes() for i in range(8)}
    assert len(views) > 4                                                            # different crops/flips
    plain = Augment(seed=0, epoch=0, image_size=32, min_scale=0.5, max_words=50)({k: v[:1] for k, v in batch.items()
                                                                                   if k != "copy"})
    assert (plain["pixel_values"][0] == out["pixel_values"][0]).all()               # copy 0: the unweighted view


# -- human rows at LAVIS' share (ingest.human_captions) -----------------------------------------
# coco: 300 human rows, rows 0..99 with 5 captions, 100..149 with 7, 150..199 with 1, 200..299 with 3;
# one shard mixes web laion rows (0..49) with 2-caption human vg rows (50..99)
HUMAN_SHARDS = [ShardRows("h", 300, ((0, 300, "coco"),), ((0, 100, 5), (100, 150, 7), (200, 300, 3))),
                ShardRows("w", 600, ((0, 600, "laion"),)),
                ShardRows("m", 100, ((0, 50, "laion"), (50, 100, "vg")), ((50, 100, 2),))]
CAPTIONS_OF = {0: [5] * 100 + [7] * 50 + [1] * 50 + [3] * 100, 1: [1] * 600, 2: [1] * 50 + [2] * 50}


def test_a_human_image_with_k_captions_appears_k_times_per_epoch_times_its_weight():
    for weights, each, factor in (({}, True, 1), ({"coco": 2, "vg": 0.5}, True, None), ({}, False, 0)):
        for epoch in range(3):
            order = EpochOrder(HUMAN_SHARDS, seed=1, epoch=epoch, window=3, weights=weights, each_caption=each)
            seen = Counter((s, r) for s, r, _, _ in _entries(order))
            copies = {(s, r): sorted(c for s2, r2, _, c in _entries(order) if (s2, r2) == (s, r)) for s, r in seen}
            for s, ks in CAPTIONS_OF.items():
                for r, k in enumerate(ks):
                    src = HUMAN_SHARDS[s].sources[0][2] if s != 2 else ("laion" if r < 50 else "vg")
                    want = k if each else 1
                    if factor is None and src == "coco":
                        want *= 2
                    if factor is None and src == "vg":           # weight 0.5 × 2 captions: one copy
                        want = 1
                    assert seen[(s, r)] == want, (weights, each, s, r)
                    assert copies[(s, r)] == list(range(want))   # copies 0..n-1, each its own view
    order = EpochOrder(HUMAN_SHARDS, seed=1, epoch=0, window=3, each_caption=True)
    assert order.total == 100 * 5 + 50 * 7 + 50 + 100 * 3 + 600 + 50 + 50 * 2
    # COCO at LAVIS' share: 5 samples per 5-caption image, against 1 per web image
    assert order.source_counts(order.total).tolist() == [1200, 650, 100]   # coco, laion, vg


def test_the_copies_of_a_human_row_train_on_each_of_its_captions_once(corpus):
    root, items = corpus
    image = (root / items[0].file).read_bytes()
    caps = ["A man, riding.", "two dogs", "", "a red bus", "the sky"]        # the empty one is never drawn
    n = 8                                                                    # 4 usable captions, 2 epochs' worth
    batch = {"key": np.array(["k"] * n, dtype=object), "image": np.array([image] * n, dtype=object),
             "captions": np.array([caps] * n, dtype=object), "copy": np.arange(n),
             "policy": np.array(["human"] * n, dtype=object)}
    texts = Augment(seed=0, epoch=0, image_size=32, min_scale=0.5, max_words=50)(batch)["text"].tolist()
    usable = [pre_caption(c, 50) for c in caps if c]
    assert sorted(texts[:4]) == sorted(usable) and texts[4:] == texts[:4]   # each once per k copies
    perms = {tuple(Augment(0, epoch, 32, 0.5, 50)(batch)["text"].tolist()[:4]) for epoch in range(6)}
    assert all(sorted(p) == sorted(usable) for p in perms) and len(perms) > 1   # a new permutation by epoch
    # "one": the human row draws like a web row; a web row never follows the human rule
    one = Augment(0, 0, 32, 0.5, 50, human_captions="one")(batch)["text"].tolist()
    web = Augment(0, 0, 32, 0.5, 50)({**batch, "policy": np.array(["web"] * n, dtype=object)})["text"].tolist()
    assert one == web and set(one) <= set(usable)


def test_list_shards_counts_the_captions_of_human_rows(tmp_path, corpus):
    def human(i):  # rows 0..11 web; 12..23 human with 1 + i % 4 captions (one of them empty at i % 4 == 3)
        if i < 12:
            return None
        return ["x"] * (i % 4) + [""] if i % 4 == 3 else ["c"] * (1 + i % 4)

    write_capfilt(str(tmp_path / "cf"), corpus, rows_per_shard=24, source=lambda i: "coco" if i >= 12 else "laion",
                  human=human)
    first = list_shards(str(tmp_path / "cf"), sources=True)[0]
    ks = [1] * 12 + [min(4, 1 + i % 4) if i % 4 != 3 else 3 for i in range(12, 24)]
    want = [(r, r + 1, k) for r, k in enumerate(ks) if k != 1]
    merged = []
    for a, b, k in want:
        merged = merged[:-1] + [(merged[-1][0], b, k)] if merged and merged[-1][1:] == (a, k) else merged + [(a, b, k)]
    assert first.captions == tuple(merged)
    assert first.sources == ((0, 12, "laion"), (12, 24, "coco"))


def test_list_shards_reads_each_rows_source(tmp_path, corpus):
    def source(i):  # shard 0: coco; shard 1: laion; shard 2 (rows 40..47): mixed
        return "coco" if i < 20 or i in (42, 43) else "laion"

    write_capfilt(str(tmp_path / "cf"), corpus, rows_per_shard=20, source=source)
    shards = list_shards(str(tmp_path / "cf"), sources=True)
    assert [s.sources for s in shards] == [((0, 20, "coco"),), ((0, 20, "laion"),),
                                           ((0, 2, "laion"), (2, 4, "coco"), (4, 8, "laion"))]
    assert all(s.sources == () for s in list_shards(str(tmp_path / "cf")))          # only read when asked


def test_source_mix_is_the_plan_and_the_cumulative_counts_of_the_orders(capsys):
    from training.ingest import IngestSpec
    from training.source_weights import SourceMix

    spec = IngestSpec(IngestConfig(source_weights={"a": 2.0, "b": 0.5}), tuple(SHARDS), seed=0, image_size=32)
    first = SourceMix(spec, global_batch=64).metrics(0, 64)
    plan0 = spec.order(0).source_counts(spec.epoch_stop(spec.order(0), 64)).tolist()
    assert [first["plan/a"], first["plan/b"]] == plan0 and first["samples/a"] + first["samples/b"] == 64
    assert "epoch 0 source mix" in capsys.readouterr().out
    later = SourceMix(spec, global_batch=64).metrics(1, 128)                                       # a resumed run, epoch 1
    now = spec.order(1).source_counts(128).tolist()
    assert [later["samples/a"], later["samples/b"]] == [plan0[0] + now[0], plan0[1] + now[1]]
    assert "plan/a" not in later


@pytest.mark.slow
def test_run_training_logs_the_realised_mix(tmp_path, corpus, ray_local):
    """coco (human rows, 2 captions each) up-weighted 2×, laion dropped: each coco image is trained
    on exactly 2 × 2 times in the epoch, metrics.jsonl holds the epoch's plan and the cumulative
    per-source counts, and the run's summary shows the realised mix."""
    from training.metrics import summary

    write_capfilt(str(tmp_path / "cf"), corpus, source=lambda i: "coco" if i < 24 else "laion",
                  human=lambda i: [f"first caption {i}", f"second caption {i}"] if i < 24 else None)
    cfg = TrainConfig(input=str(tmp_path / "cf"), output=str(tmp_path / "runs"), name="mix", steps=12, batch_size=8,
                      global_batch=8, num_workers=1, checkpoint_every=12, log_every=1, warmup_steps=1)
    cfg.validate()
    ingest = IngestConfig(map_batch_size=8, shuffle_window=2, source_weights={"coco": 2, "laion": 0})
    result = run_training_with_hooks(ModelConfig(image_size=32), cfg, ingest, model_class=TOY)
    assert result.error is None, result.error
    rows = read_metrics(str(tmp_path / "runs" / "mix"))
    assert [r["step"] for r in rows] == list(range(1, 13))
    keys = Counter(k for r in rows for k in r["keys"])
    assert keys == {f"{i:06d}": 4 for i in range(24)}                               # coco 2 × 2, laion never
    assert (rows[0]["plan/coco"], rows[0]["plan/laion"]) == (96, 0)
    assert [r["samples/coco"] for r in rows] == [8 * s for s in range(1, 13)]
    assert all(r["samples/laion"] == 0 for r in rows) and "plan/coco" not in rows[1]
    assert "samples per source: coco 96 (100.00 %), laion 0 (0.00 %)" in summary(rows)
