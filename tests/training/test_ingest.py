"""Ingest: augmentation, caption handling, the deterministic rank slices, bad-sample replacement."""
from __future__ import annotations

import io
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from pipelines.schema import SchemaError
from tests.training.train_fixtures import write_capfilt
from training.ingest import (CLIP_MEAN, CLIP_STD, Augment, IngestSpec, ShardRows, augment_image,
                             batches_per_epoch, epoch_shard_order, iter_epoch, list_shards,
                             rank_read_tasks, read_rows, sample_rng)


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


def test_rank_slices_partition_each_epoch_and_skip_is_exact():
    shards = [ShardRows(f"s{i}", n) for i, n in enumerate([12, 7, 12, 9])]   # 40 rows
    order = epoch_shard_order(shards, seed=0, epoch=0)
    assert order != epoch_shard_order(shards, seed=0, epoch=1) or order != epoch_shard_order(shards, 0, 2)
    assert batches_per_epoch(shards, world=2, batch_size=4) == 5            # 40 // 8

    def rows(tasks):
        return [(t["url"], r) for t in tasks for r in range(t["start"], t["stop"])]

    r0, r1 = (rows(rank_read_tasks(order, r, 2, 4, skip=0, chunk=5)) for r in (0, 1))
    assert len(r0) == len(r1) == 20 and not set(r0) & set(r1)
    assert rows(rank_read_tasks(order, 1, 2, 4, skip=8, chunk=5)) == r1[8:]


def test_read_rows_and_list_shards(tmp_path, corpus):
    write_capfilt(str(tmp_path / "cf"), corpus, rows_per_shard=20)
    shards = list_shards(str(tmp_path / "cf"))
    assert [s.rows for s in shards] == [20, 20, 8]
    got = read_rows({"url": shards[1].url, "start": 5, "stop": 9})
    assert got["key"] == ["000025", "000026", "000027", "000028"]
    with pytest.raises(SchemaError):
        list_shards(str(tmp_path / "nothing-here"))


def test_ray_data_epoch_stream_fixed_batches_resume_and_s3(ray_local, corpus, s3_bucket):
    """Two ranks through real Ray Data on S3 shards: disjoint, complete, fixed-size; skip resumes exactly."""
    uri = f"{s3_bucket}/capfilt"
    write_capfilt(uri, corpus, rows_per_shard=12, bad={5})
    spec = IngestSpec(tuple(list_shards(uri)), seed=0, batch_size=4, image_size=32, min_scale=0.5,
                      max_words=50, map_batch_size=8)
    per_rank = {r: list(iter_epoch(spec, epoch=0, rank=r, world=2)) for r in (0, 1)}
    assert all(len(b) == 6 for b in per_rank.values())                     # 48 // (2*4)
    assert all(b["pixel_values"].shape == (4, 3, 32, 32) for bs in per_rank.values() for b in bs)
    keys = [k for r in (0, 1) for b in per_rank[r] for k in b["key"]]
    assert sorted(keys) == [f"{i:06d}" for i in range(48)]                  # each sample once
    assert sum(b["replaced"] for bs in per_rank.values() for b in bs) == 1  # the bad JPEG, counted
    resumed = list(iter_epoch(spec, epoch=0, rank=1, world=2, skip=8))
    assert [b["key"] for b in resumed] == [b["key"] for b in per_rank[1][2:]]
    for a, b in zip(resumed, per_rank[1][2:]):                             # same pixels and captions
        assert a["text"] == b["text"] and (a["pixel_values"] == b["pixel_values"]).all()
    next_epoch = [k for b in iter_epoch(spec, epoch=1, rank=1, world=2) for k in b["key"]]
    assert next_epoch != [k for b in per_rank[1] for k in b["key"]]         # shard order reshuffled


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
