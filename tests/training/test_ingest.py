"""Ingest: augmentation, caption handling, the seeded global epoch order and its split over ranks,
bad-sample replacement."""
from __future__ import annotations

import io
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from pipelines.schema import SchemaError
from tests.training.train_fixtures import write_capfilt
from training.ingest import (CLIP_MEAN, CLIP_STD, Augment, EpochOrder, IngestConfig, IngestSpec, ShardRows, augment_image,
                             iter_epoch, list_shards, rank_picks, rank_read_tasks, read_rows,
                             sample_rng, step_split, steps_per_epoch)


def _jpeg(color=(255, 0, 0), size=(96, 80)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


def test_augment_image_shape_normalisation_and_determinism():
    data = _jpeg((255, 255, 255))
    a = augment_image(data, sample_rng(0, 0, "k"), 64, 0.5)
    b = augment_image(data, sample_rng(0, 0, "k"), 64, 0.5)
    assert a.shape == (3, 64, 64) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    # a white image normalises to (1 - mean) / std per channel
    np.testing.assert_allclose(a.mean(axis=(1, 2)), (1 - CLIP_MEAN) / CLIP_STD, atol=0.02)
    with pytest.raises(Exception):
        augment_image(b"garbage", sample_rng(0, 0, "k"), 64, 0.5)


def test_crop_and_flip_vary_with_epoch_and_key():
    # left half red, right half blue: flips and crops move the colour mass
    img = Image.new("RGB", (96, 96), (255, 0, 0))
    img.paste((0, 0, 255), (48, 0, 96, 96))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    outs = {tuple(np.round(augment_image(buf.getvalue(), sample_rng(0, e, "k"), 32, 0.5)[0, 0, :], 3))
            for e in range(12)}
    assert len(outs) > 6  # different epochs → different views of the same sample


def test_augment_draws_both_captions_and_replaces_bad_images():
    keys = [f"{i:03d}" for i in range(40)]
    batch = {"key": np.array(keys, dtype=object),
             "image": np.array([b"broken" if i == 3 else _jpeg() for i in range(40)], dtype=object),
             "captions": np.array([["First Caption.", "second caption"] for _ in keys], dtype=object)}
    out = Augment(seed=0, epoch=0, image_size=32, min_scale=0.5, max_words=50)(batch)
    assert out["pixel_values"].shape == (40, 3, 32, 32)          # the batch never shrinks
    assert out["replaced"].tolist() == [i == 3 for i in range(40)]
    assert np.isfinite(out["pixel_values"]).all()
    drawn = Counter(out["text"].tolist())
    assert set(drawn) == {"first caption", "second caption"} and min(drawn.values()) >= 8
    again = Augment(seed=0, epoch=0, image_size=32, min_scale=0.5, max_words=50)(batch)
    assert again["text"].tolist() == out["text"].tolist()       # seeded by (seed, epoch, key)


def test_all_bad_batch_keeps_its_size():
    batch = {"key": np.array(["a", "b"], dtype=object), "image": np.array([b"x", b"y"], dtype=object),
             "captions": np.array([["c", "d"], ["e", "f"]], dtype=object)}
    out = Augment(0, 0, 16, 0.5, 50)(batch)
    assert out["pixel_values"].shape == (2, 3, 16, 16) and out["replaced"].all()


SHARDS = [ShardRows(f"s{i}", n) for i, n in enumerate([600, 70, 512, 300, 256, 1000])]   # 2738 rows


def _ids(order: EpochOrder, lo: int, hi: int) -> list[tuple[int, int]]:
    shard, row = order.positions(lo, hi)
    return list(zip(shard.tolist(), row.tolist()))


def test_epoch_order_is_a_seeded_permutation_of_every_sample():
    order = EpochOrder(SHARDS, seed=3, epoch=0, window=4)
    everything = _ids(order, 0, order.total)
    assert order.total == 2738 and sorted(everything) == [(i, r) for i, s in enumerate(SHARDS) for r in range(s.rows)]
    assert _ids(EpochOrder(SHARDS, seed=3, epoch=0, window=4), 0, order.total) == everything   # a pure function
    assert _ids(order, 100, 900) == everything[100:900]                                    # any slice, any time
    assert _ids(EpochOrder(SHARDS, seed=3, epoch=1, window=4), 0, order.total) != everything  # a new order per epoch
    assert _ids(EpochOrder(SHARDS, seed=4, epoch=0, window=4), 0, order.total) != everything
    # a sample-level shuffle: the first 64 samples come from several shards and are not in row order
    first = everything[:64]
    assert len({s for s, _ in first}) >= 3 and first != sorted(first)


def test_step_split_keeps_the_global_batch_at_every_world_size():
    assert step_split(8, 4, 2) == [[4, 4]]
    assert step_split(8, 4, 1) == [[4], [4]]                 # one worker: two accumulation rounds
    assert step_split(8, 4, 3) == [[3, 3, 2]]                # 8 is not a multiple of 3: lower ranks +1
    assert step_split(2320, 29, 16) == [[29] * 16] * 5       # the paper's stage-1 ViT-L setting
    for g, b, w in [(8, 4, 3), (100, 7, 5), (1680, 105, 13), (9, 4, 2)]:
        split = step_split(g, b, w)
        assert sum(map(sum, split)) == g and max(map(max, split)) <= b and min(map(min, split)) >= 1
    with pytest.raises(ValueError, match="cannot give one sample"):
        step_split(2, 4, 3)


def test_resume_at_another_world_size_continues_with_the_next_unseen_sample():
    g, b = 12, 4
    stop = steps_per_epoch(SHARDS, g) * g
    assert stop == 2736                                                    # a 2-sample drop-last tail
    order = EpochOrder(SHARDS, seed=0, epoch=0, window=4)

    def consumed(world, start, end):
        return sorted(p for r in range(world) for pos, _, _ in rank_picks(order, step_split(g, b, world), r, start, end)
                      for p in pos.tolist())

    assert consumed(2, 0, stop) == consumed(3, 0, stop) == list(range(stop))
    assert consumed(2, 0, 5 * g) + consumed(1, 5 * g, stop) == list(range(stop))     # 2 -> 1 worker at step 5
    # every round of a step is a contiguous run of the order, whatever the world size
    for world in (1, 2, 3):
        rounds = list(zip(*(list(rank_picks(order, step_split(g, b, world), r, 0, 2 * g)) for r in range(world))))
        los = [sorted(p for pos, _, _ in rnd for p in pos.tolist()) for rnd in rounds]
        assert [x for lo in los for x in lo] == list(range(2 * g))
    # what the read tasks hand over is exactly the picked samples, in each rank's order
    picks = list(rank_picks(order, step_split(g, b, 2), 1, 5 * g, 8 * g))
    want = [(SHARDS[s].url, r) for _, shard, row in picks for s, r in zip(shard.tolist(), row.tolist())]
    tasks = rank_read_tasks(order, picks)
    assert [(t["urls"][c], t["starts"][c] + o) for t in tasks for c, o in zip(t["chunk"], t["offset"])] == want


def test_each_rank_reads_only_its_share_of_a_windows_row_groups():
    shards = [ShardRows(f"s{i}", 2560) for i in range(40)]                  # 400 row groups
    order = EpochOrder(shards, seed=0, epoch=0, window=32)
    g, b, world = 1024, 128, 8
    stop = steps_per_epoch(shards, g) * g
    reads = [sum(len(t["urls"]) for t in rank_read_tasks(order, rank_picks(order, step_split(g, b, world), r, 0, stop)))
             for r in range(world)]
    assert sum(reads) < 2 * 400                 # ~1.5 readers per row group (all 8 without the grouping)


@pytest.mark.parametrize("weights", [None, {"a": 2.0, "b": 0.5}])
def test_the_lazy_rank_plan_makes_exactly_the_eager_read_tasks(weights):
    """RankPlan builds each window's task on its own (on a Ray Data worker); the tasks are those
    of the eager rank_read_tasks, for any world size, micro-batch, accumulation and resume point."""
    from training.ingest import RankPlan

    sources = weights is not None
    shards = [ShardRows(f"s{i}", 300 + 37 * i, ((0, 300 + 37 * i, "ab"[i % 2]),) if sources else ()) for i in range(20)]
    spec = IngestSpec(IngestConfig(shuffle_window=3, source_weights=weights or {}), tuple(shards), seed=5, image_size=32)
    order = spec.order(1)
    for g, b, world in ((64, 16, 1), (64, 16, 3), (100, 7, 4), (90, 90, 2)):
        split = step_split(g, b, world)
        stop = spec.epoch_stop(order, g)
        for start in (0, 7 * g):
            for rank in range(world):
                plan = RankPlan(spec, 1, rank, tuple(map(tuple, split)), start, stop)
                lazy = [t for t in (plan.task(order, w) for w in plan.windows(order)) if t is not None]
                eager = rank_read_tasks(order, rank_picks(order, split, rank, start, stop))
                assert lazy == eager, (g, b, world, start, rank)
    # a worker process builds the plan's order once and serves every window from it
    assert plan.order() is plan.order() and plan.order().total == order.total


def test_read_rows_and_list_shards(tmp_path, corpus):
    write_capfilt(str(tmp_path / "cf"), corpus, rows_per_shard=20)
    shards = list_shards(str(tmp_path / "cf"))
    assert [s.rows for s in shards] == [20, 20, 8]
    got = read_rows({"url": shards[1].url, "start": 5, "stop": 9})
    assert got["key"] == ["000025", "000026", "000027", "000028"]
    with pytest.raises(SchemaError):
        list_shards(str(tmp_path / "nothing-here"))


def test_ray_data_epoch_stream_fixed_batches_resume_and_s3(ray_local, corpus, s3_bucket):
    """Two ranks through real Ray Data on S3 shards: disjoint, complete, sized by step_split;
    resuming at a step boundary with another world size continues exactly."""
    uri = f"{s3_bucket}/capfilt"
    write_capfilt(uri, corpus, rows_per_shard=12, bad={5})
    spec = IngestSpec(IngestConfig(map_batch_size=8, shuffle_window=2), tuple(list_shards(uri)), seed=0,
                      image_size=32)
    two = step_split(8, 4, 2)                                              # global batch 8, micro-batch 4
    per_rank = {r: list(iter_epoch(spec, epoch=0, rank=r, split=two)) for r in (0, 1)}
    assert all(len(b) == 6 for b in per_rank.values())                     # 48 // 8 steps, one batch each
    assert all(b["pixel_values"].shape == (4, 3, 32, 32) for bs in per_rank.values() for b in bs)
    keys = [k for r in (0, 1) for b in per_rank[r] for k in b["key"]]
    assert sorted(keys) == [f"{i:06d}" for i in range(48)]                  # each sample once
    assert sum(b["replaced"] for bs in per_rank.values() for b in bs) == 1  # the bad JPEG, counted
    step_keys = [per_rank[0][s]["key"] + per_rank[1][s]["key"] for s in range(6)]
    resumed = list(iter_epoch(spec, epoch=0, rank=0, split=step_split(8, 4, 1), start=16))   # 1 worker from step 2: 2 rounds
    assert [len(b["key"]) for b in resumed] == [4] * 8
    assert [sorted(resumed[2 * i]["key"] + resumed[2 * i + 1]["key"]) for i in range(4)] == \
        [sorted(k) for k in step_keys[2:]]                                  # the same samples in each step
    by_key = {k: (t, px) for bs in per_rank.values() for b in bs
              for k, t, px in zip(b["key"], b["text"], b["pixel_values"])}
    for b in resumed:                                                      # same pixels and captions
        for k, t, px in zip(b["key"], b["text"], b["pixel_values"]):
            if k != "000005":
                assert by_key[k][0] == t and (by_key[k][1] == px).all()
    next_epoch = [k for b in iter_epoch(spec, epoch=1, rank=1, split=two) for k in b["key"]]
    assert next_epoch != [k for b in per_rank[1] for k in b["key"]]         # reshuffled


def test_caption_pick_first_and_no_flip_keep_the_rest_of_the_draws(tmp_path):
    """caption_pick=first always trains on the best caption; hflip=false only skips the flip,
    so crops (and the random stream) stay those of the default mode."""
    import io

    import numpy as np
    from PIL import Image

    from training.ingest import Augment

    img = Image.new("RGB", (32, 32), (255, 255, 255))
    img.paste((255, 0, 0), (0, 0, 8, 32))  # a red bar on the left: a flip moves it right
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    keys = [f"k/{i}" for i in range(16)]
    batch = {"key": keys, "image": [buf.getvalue()] * 16, "captions": [["best one", "second one"]] * 16}
    paper = Augment(0, 0, 32, 1.0, 50)(batch)
    first = Augment(0, 0, 32, 1.0, 50, hflip=False, caption_pick="first")(batch)
    assert set(paper["text"]) == {"best one", "second one"}
    assert set(first["text"]) == {"best one"}
    green = first["pixel_values"][:, 1]  # the red bar has no green, the white background has
    left_red = green[:, :, :4].mean(axis=(1, 2)) < green[:, :, -4:].mean(axis=(1, 2))
    assert left_red.all()  # never flipped
    flipped = ~np.isclose(paper["pixel_values"], first["pixel_values"]).all(axis=(1, 2, 3))
    assert 0 < flipped.sum() < 16  # the paper mode flipped some of the same crops


def test_augment_cleans_captions_as_lavis():
    batch = {"key": np.array(["k"], dtype=object), "image": np.array([_jpeg()], dtype=object),
             "captions": np.array([["A man's dog, running on the beach!"]], dtype=object)}
    out = Augment(seed=0, epoch=0, image_size=32, min_scale=0.5, max_words=4)(batch)
    assert out["text"].tolist() == ["a man's dog, running"]


def test_workers_read_the_ingest_section_as_is_at_the_models_resolution():
    """No copy: a rank's spec holds the user's ``ingest`` section itself, and crops to
    ``model.image_size`` (the one resolution key, also read by eval and preprocess)."""
    from training.config import ModelConfig, TrainConfig
    from training.loop import WorkerConfig
    from training.trackers import TrackingConfig

    ingest = IngestConfig(shuffle_window=3)
    wc = WorkerConfig(ModelConfig(image_size=48), TrainConfig(), ingest, TrackingConfig(), shards=(), seed=7,
                      run_uri="unused")
    spec = wc.data()
    assert spec.cfg is ingest and (spec.image_size, spec.seed) == (48, 7)
    assert wc.params()["ingest"]["shuffle_window"] == 3 and "shuffle_window" not in wc.params()["train"]


def test_crop_fallback_is_torchvisions_centred_crop_with_the_aspect_clamped():
    """After 10 missed draws (a 1000×10 strip cannot hold a 3/4–4/3 crop of half its area),
    torchvision crops the centre with the aspect clamped to the ratio range: 13×10 here."""
    import random

    from training.ingest import random_resized_crop

    strip = Image.fromarray(np.random.default_rng(0).integers(0, 255, (10, 1000, 3), dtype=np.uint8))
    got = random_resized_crop(strip, random.Random(0), 16, min_scale=0.5)
    want = strip.resize((16, 16), Image.BICUBIC, box=(493, 0, 506, 10))
    assert np.array_equal(np.asarray(got), np.asarray(want))
    tall = strip.transpose(Image.TRANSPOSE)                                     # 10×1000: 10 wide, 13 high
    got = random_resized_crop(tall, random.Random(0), 16, min_scale=0.5)
    assert np.array_equal(np.asarray(got), np.asarray(tall.resize((16, 16), Image.BICUBIC, box=(0, 493, 10, 506))))
