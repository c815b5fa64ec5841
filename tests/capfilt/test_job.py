"""The CapFilt Ray Data job on local Ray with tiny random BLIP and CLIP models."""
from __future__ import annotations

import json

import dataclasses
import hashlib
import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from capfilt.config import CapFiltConfig
from capfilt.embeddings import embedding_paths
from capfilt.job import RankStage, run_capfilt
from capfilt.ranker import select
from pipelines.schema import CAPFILT, SchemaError
from pipelines.shardio import ShardSet


def job_config(tiny_models, input_uri, output_uri, **kw) -> CapFiltConfig:
    base = dict(input=input_uri, output=output_uri, captioner=str(tiny_models["captioner"]),
                ranker=str(tiny_models["ranker"]), min_length=6, max_length=12, batch_size=4, rank_batch_size=4)
    return CapFiltConfig(**{**base, **kw})


def read_set(uri: str) -> pa.Table:
    ss = ShardSet(uri)
    return pa.concat_tables([ss.read_shard(n, CAPFILT) for n in ss.committed()])


@pytest.fixture(scope="module")
def first_run(ray_local, tiny_models, hostile_input, tmp_path_factory):
    input_uri, expected = hostile_input
    cfg = job_config(tiny_models, input_uri, str(tmp_path_factory.mktemp("capfilt") / "out"))
    summary = run_capfilt(cfg, seed=7, log=lambda m: None)
    return cfg, summary, expected


def test_every_usable_image_once_and_bad_input_counted(first_run):
    cfg, summary, expected = first_run
    table = read_set(cfg.output)
    assert sorted(table.column("key").to_pylist()) == expected["out"]
    assert summary["images_out"] == len(expected["out"])
    assert summary["undecodable"] == expected["undecodable"] and summary["zero_size"] == expected["zero_size"]
    assert summary["rows_not_ok"] == expected["rows_not_ok"]
    assert summary["images_in"] == len(expected["out"]) + expected["undecodable"] + expected["zero_size"]
    assert summary["captions_generated"] == 10 * len(expected["out"])
    assert summary["empty_captions"] >= 1 and summary["truncated_captions"] >= 1
    assert summary["shards_written"] == 4 and ShardSet(cfg.output).committed_indices() == {0, 1, 2, 3}
    manifest = ShardSet(cfg.output).read_manifest()
    assert manifest["schema"] == CAPFILT.tag and manifest["num_rows"] == len(expected["out"])
    assert manifest["summary"]["set"]["images_out"] == len(expected["out"])
    assert all(len(c) == 2 and len(s) == 2 for c, s in zip(table.column("captions").to_pylist(),
                                                           table.column("scores").to_pylist()))
    for row in table.select(["key", "url", "sha256", "image"]).to_pylist():  # carried from the download row
        assert row["url"] == f"http://127.0.0.1:1/{row['key']}"
        assert row["sha256"] == hashlib.sha256(row["image"]).hexdigest()


def test_kept_captions_are_the_top_two_by_plain_clip(first_run, tiny_models):
    """Recompute all 11 CLIP scores with a plain transformers loop; the job kept the best two."""
    from transformers import CLIPModel, CLIPProcessor

    cfg, summary, _ = first_run
    model = CLIPModel.from_pretrained(tiny_models["ranker"]).eval()
    proc = CLIPProcessor.from_pretrained(tiny_models["ranker"])
    limit = model.config.text_config.max_position_embeddings
    rows = read_set(cfg.output).to_pylist()
    kept_scores = []
    for row in rows:
        image = Image.open(io.BytesIO(row["image"])).convert("RGB")
        texts = [c["caption"] for c in row["candidates"]]
        assert texts[0] == row["original_caption"] and len(texts) == 11
        assert [c["synthetic"] for c in row["candidates"]] == [False] + [True] * 10
        scores = []
        for text in texts:
            enc = proc(text=[text], images=image, return_tensors="pt", truncation=True, max_length=limit)
            with torch.no_grad():
                out = model(**enc)
            content = [t for t in enc["input_ids"][0].tolist() if t not in proc.tokenizer.all_special_ids]
            scores.append(float((out.image_embeds * out.text_embeds).sum()) if content else float("-inf"))
        got = [c["score"] for c in row["candidates"]]
        np.testing.assert_allclose(got, scores, atol=1e-4)
        best = select(texts, np.array(scores), keep=2)
        assert row["captions"] == [texts[i] for i in best]
        np.testing.assert_allclose(row["scores"], [scores[i] for i in best], atol=1e-4)
        finite = sorted({s for s in scores if np.isfinite(s)}, reverse=True)
        assert row["scores"][0] == pytest.approx(finite[0], abs=1e-4) and row["scores"][0] >= row["scores"][1]
        kept_scores += row["scores"]
        if row["key"] == "odd/empty-caption":
            assert scores[0] == float("-inf") and "" not in row["captions"]
    assert summary["mean_kept_score"] == pytest.approx(np.mean(kept_scores), abs=1e-4)
    share = np.mean([r["original_caption"] in r["captions"] for r in rows])
    assert summary["original_kept_share"] == pytest.approx(share)


def test_embeddings_in_clip_retrieval_layout(first_run, tiny_models):
    from transformers import CLIPModel, CLIPProcessor

    cfg, _, _ = first_run
    out = ShardSet(cfg.output)
    model = CLIPModel.from_pretrained(tiny_models["ranker"]).eval()
    proc = CLIPProcessor.from_pretrained(tiny_models["ranker"])
    for name in out.committed():
        shard = out.read_shard(name, CAPFILT)
        index = int(name[5:10])
        paths = embedding_paths(index)
        if shard.num_rows == 0:
            assert not out.fs.exists(out.path(paths["img_emb"]))
            continue
        img = np.load(io.BytesIO(out.fs.cat(out.path(paths["img_emb"]))))
        txt = np.load(io.BytesIO(out.fs.cat(out.path(paths["text_emb"]))))
        meta = pq.read_table(io.BytesIO(out.fs.cat(out.path(paths["metadata"]))))
        assert img.shape == txt.shape == (shard.num_rows, model.config.projection_dim)
        assert meta.column("key").to_pylist() == shard.column("key").to_pylist()
        assert meta.column("caption").to_pylist() == [c[0] for c in shard.column("captions").to_pylist()]
        np.testing.assert_allclose(np.linalg.norm(img.astype(np.float32), axis=1), 1.0, atol=2e-3)
        first = Image.open(io.BytesIO(shard.column("image")[0].as_py())).convert("RGB")
        with torch.no_grad():
            ref = model.get_image_features(**proc(images=first, return_tensors="pt")).pooler_output[0]
        np.testing.assert_allclose(img[0], torch.nn.functional.normalize(ref, dim=0).numpy(), atol=2e-3)
        cos = (img.astype(np.float32) * txt.astype(np.float32)).sum(1)
        np.testing.assert_allclose(cos, [s[0] for s in shard.column("scores").to_pylist()], atol=5e-3)


def test_same_seed_same_captions_whatever_the_batching_and_s3_output(first_run, s3_bucket):
    """Other batch sizes, the ranker in the captioner actors and an s3:// output (moto)
    reproduce the captions exactly; resume skips all."""
    cfg, _, _ = first_run
    other = dataclasses.replace(cfg, output=f"{s3_bucket}/capfilt", batch_size=3, rank_batch_size=5,
                                colocate_ranker=True)
    summary = run_capfilt(other, seed=7, log=lambda m: None)
    assert summary["shards_written"] == 4
    a = {r["key"]: r["candidates"] for r in read_set(cfg.output).to_pylist()}
    b = {r["key"]: r["candidates"] for r in read_set(other.output).to_pylist()}
    assert a.keys() == b.keys()
    for key in a:
        assert [c["caption"] for c in a[key]] == [c["caption"] for c in b[key]], key
        np.testing.assert_allclose([c["score"] for c in a[key]], [c["score"] for c in b[key]], atol=1e-5)
    again = run_capfilt(other, seed=7, log=lambda m: None)
    assert again["shards_skipped"] == 4 and again["shards_written"] == 0
    assert again["set"]["images_out"] == summary["images_out"]


def test_rerun_rewrites_a_lost_shard_with_the_same_captions(first_run):
    """Resume: only the missing shard runs again, and it comes back with the same content
    (scores to float round-off: the ranker's batches are composed differently this time)."""
    cfg, _, _ = first_run
    out = ShardSet(cfg.output)
    before = out.read_shard("part-00001.parquet", CAPFILT).to_pylist()
    out.fs.rm(out.path("part-00001.parquet"))
    summary = run_capfilt(cfg, seed=7, log=lambda m: None)
    assert summary["shards_written"] == 1 and summary["shards_skipped"] == 3
    after = out.read_shard("part-00001.parquet", CAPFILT).to_pylist()
    assert [(r["key"], r["captions"], r["image"]) for r in after] == [(r["key"], r["captions"], r["image"]) for r in before]
    np.testing.assert_allclose([r["scores"] for r in after], [r["scores"] for r in before], atol=1e-5)
    assert summary["set"]["images_out"] == out.read_manifest()["num_rows"]


def test_wrong_input_schema_fails_before_any_model_loads(tmp_path, hostile_input):
    bad = tmp_path / "bad"
    bad.mkdir()
    table = ShardSet(hostile_input[0]).read_shard("part-00000.parquet").drop_columns(["status"])
    pq.write_table(table, bad / "part-00000.parquet")
    cfg = CapFiltConfig(input=str(bad), output=str(tmp_path / "out"), captioner="/nonexistent/captioner",
                        ranker="/nonexistent/ranker")
    with pytest.raises(SchemaError, match="missing column 'status'"):
        run_capfilt(cfg, seed=0, log=lambda m: None)
    assert not (tmp_path / "out").exists()


def test_keep_original_puts_the_web_caption_first(tiny_models):
    """The demo switch: original first, then the best synthetic caption (through the real stage)."""
    cfg = CapFiltConfig(captioner=str(tiny_models["captioner"]), ranker=str(tiny_models["ranker"]),
                        keep_original=True)
    stage = RankStage(cfg)
    n = 3
    synthetic = np.empty(n, dtype=object)
    synthetic[:] = [[f"a {c} circle {i}" for i in range(10)] for c in ("red", "blue", "green")]
    batch = {"key": np.array(["a", "b", "c"], dtype=object), "caption": np.array(["a red square"] * n, dtype=object),
             "policy": np.array(["web"] * n, dtype=object), "human_captions": np.array(["[]"] * n, dtype=object),
             "outcome": np.array(["ok"] * n, dtype=object), "synthetic": synthetic,
             "rank_pixels": np.random.default_rng(0).normal(size=(n, 3, 64, 64)).astype(np.float32)}
    out = stage(batch)
    kept = [json.loads(k) for k in out["kept"]]
    scores = [json.loads(s) for s in out["cand_scores"]]
    assert [k[0] for k in kept] == [0] * n
    for i in range(n):
        assert kept[i][1] == 1 + int(np.argmax(scores[i][1:]))


def test_human_rows_pass_through_with_every_caption_and_web_rows_are_ranked(ray_local, tiny_models, corpus, tmp_path):
    from pipelines.schema import DOWNLOAD
    from tests.helpers.shards import download_row, write_set

    root, items = corpus
    img = [(root / it.file).read_bytes() for it in items[:5]]
    human = {"coco/0": ["a man's dog, running!", "a dog on a beach", "the dog runs"],
             "coco/3": [f"human caption {k}" for k in range(5)], "vg/9": ["trees line the street"]}
    shards = [[download_row("coco/0", human["coco/0"][0], img[0], source="coco", policy="human", captions=human["coco/0"]),
               {**download_row("laion/0", "web alt text", img[1], source="laion"),
                "meta": {"similarity": 0.33, "punsafe": 0.02, "pwatermark": 0.7, "width": 800, "height": 600,
                         "license": "cc-by", "nsfw": "UNLIKELY"}},
               download_row("coco/3", human["coco/3"][0], img[2], source="coco", policy="human", captions=human["coco/3"]),
               download_row("coco/1", human["coco/0"][1], None, "merged", source="coco", policy="human",
                            duplicate_of="coco/0")],
              [download_row("vg/9", human["vg/9"][0], img[3], source="vg", policy="human", captions=human["vg/9"]),
               download_row("laion/1", "another alt text", img[4], source="laion")]]
    src = write_set(str(tmp_path / "dl"), DOWNLOAD, shards)
    cfg = job_config(tiny_models, src.uri, str(tmp_path / "out"), colocate_ranker=True)
    summary = run_capfilt(cfg, seed=3, log=lambda m: None)
    rows = {r["key"]: r for r in read_set(cfg.output).to_pylist()}
    assert sorted(rows) == ["coco/0", "coco/3", "laion/0", "laion/1", "vg/9"]
    for key, captions in human.items():
        r = rows[key]
        assert r["policy"] == "human" and r["captions"] == captions and len(r["scores"]) == len(captions)
        assert [c["caption"] for c in r["candidates"]] == captions and not any(c["synthetic"] for c in r["candidates"])
        assert r["url"] == f"http://127.0.0.1:1/{key}" and r["sha256"]
    for key in ("laion/0", "laion/1"):
        assert rows[key]["policy"] == "web" and len(rows[key]["captions"]) == 2 and len(rows[key]["candidates"]) == 11
    assert summary["human_images_out"] == 3 and summary["human_captions_out"] == 9 and summary["web_images_out"] == 2
    assert summary["captions_generated"] == 20  # the two web images only
    assert rows["laion/0"]["meta"]["pwatermark"] == pytest.approx(0.7) and rows["laion/1"]["meta"] is None
    from pipelines.inspect import inspect_shards
    from pipelines.report import format_text

    ins = inspect_shards(cfg.output)  # the list's metadata shows up in the report
    assert ins.meta_scores["pwatermark"].n == 1 and ins.meta_tags["nsfw"] == {"UNLIKELY": 1}
    assert "list pwatermark" in format_text(ins) and ins.policies == {"human": 3, "web": 2}
    # Human images are still embedded (search and curation use every image).
    for index, keys in ((0, ["coco/0", "laion/0", "coco/3"]), (1, ["vg/9", "laion/1"])):
        paths = embedding_paths(index)
        emb = np.load(io.BytesIO(ShardSet(cfg.output).fs.cat(ShardSet(cfg.output).path(paths["img_emb"]))))
        assert emb.shape[0] == len(keys) and np.all(np.abs(emb).sum(axis=1) > 0)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["webdataset", "parquet", "files"])
def test_capfilt_runs_on_img2dataset_folders_as_they_are(ray_local, tiny_models, img2dataset_folders, tmp_path, fmt):
    folders, captions = img2dataset_folders
    cfg = job_config(tiny_models, str(folders[fmt]), str(tmp_path / "out"), colocate_ranker=True)
    summary = run_capfilt(cfg, seed=0, log=lambda m: None)
    rows = read_set(cfg.output).to_pylist()
    assert sorted(r["url"] for r in rows) == sorted(captions)  # every image img2dataset fetched, once
    assert all(r["original_caption"] == captions[r["url"]] and len(r["captions"]) == 2 for r in rows)
    assert summary["rows_in"] == 14 and summary["rows_not_ok"] == 2 and summary["images_out"] == 12
    assert ShardSet(cfg.output).committed_indices() == {0, 1, 2}  # one output shard per img2dataset shard
    again = run_capfilt(cfg, seed=0, log=lambda m: None)
    assert again["shards_written"] == 0


def test_precomputed_captions_are_ranked_by_the_lists_scores(ray_local, tiny_models, corpus, tmp_path):
    from pipelines.schema import DOWNLOAD
    from tests.helpers.shards import download_row, write_set

    root, items = corpus
    given = {"laion/0": (["a dog", "a brown dog", "a dog on grass", "a dog"], [0.30, 0.35, 0.32, 0.30]),
             "laion/1": (["a cat", "a grey cat"], [0.20, 0.10])}
    rows = [{**download_row(k, f"alt text {i}", (root / items[i].file).read_bytes(), source="laion"),
             "meta": {"synthetic_captions": caps, "synthetic_scores": scores}}
            for i, (k, (caps, scores)) in enumerate(given.items())]
    rows.append(download_row("laion/2", "alt text 2", (root / items[2].file).read_bytes(), source="laion"))
    src = write_set(str(tmp_path / "dl"), DOWNLOAD, [rows])
    cfg = job_config(tiny_models, src.uri, str(tmp_path / "out"), precomputed=True, captioner="/no/captioner")
    summary = run_capfilt(cfg, seed=0, log=lambda m: None)
    out = {r["key"]: r for r in read_set(cfg.output).to_pylist()}
    assert out["laion/0"]["captions"] == ["a brown dog", "a dog on grass"]
    assert out["laion/0"]["scores"] == pytest.approx([0.35, 0.32])
    assert out["laion/1"]["captions"] == ["a cat", "a grey cat"] and "laion/2" not in out  # none to rank
    assert summary["captions_generated"] == 0 and summary["too_few_captions"] == 1
    cands = out["laion/0"]["candidates"]
    assert cands[0]["caption"] == "alt text 0" and not cands[0]["synthetic"] and all(c["synthetic"] for c in cands[1:])


def test_a_bad_sample_or_shard_of_a_webdataset_input_never_sinks_the_job(ray_local, tiny_models, corpus, tmp_path):
    """Issue 32 D6 (the review's combo_crash / combo_truncated): every shard commits, rows add up."""
    from tests.helpers.tars import tar_bytes

    root, items = corpus
    jpg = [(root / it.file).read_bytes() for it in items[:5]]
    full = tar_bytes([m for k in range(3) for m in ((f"t{k}.jpg", jpg[k]), (f"t{k}.txt", b"a caption"))])
    d = tmp_path / "wds"
    d.mkdir()
    (d / "00000.tar").write_bytes(tar_bytes([("g.jpg", jpg[3]), ("g.txt", b"a good caption")]))
    (d / "00001.tar").write_bytes(tar_bytes([("a.jpg", jpg[4]), ("a.json", b'{"caption": 123}'), ("b.jpg", jpg[0]),
                                             ("b.txt", b"b"), ("a.jpg", jpg[4]), ("a.txt", b"again")]))
    (d / "00002.tar").write_bytes(full[:len(full) // 2])
    cfg = job_config(tiny_models, str(d), str(tmp_path / "out"), colocate_ranker=True)
    summary = run_capfilt(cfg, seed=0, log=lambda m: None)
    assert ShardSet(cfg.output).committed_indices() == {0, 1, 2}
    assert (summary["rows_in"], summary["rows_not_ok"], summary["images_in"]) == (7, 2, 5)  # a, and t2: cut short
    assert summary["unreadable_shards"] == 1
    assert sorted(read_set(cfg.output).column("key").to_pylist()) == [
        "webdataset/a#2", "webdataset/b", "webdataset/g", "webdataset/t0", "webdataset/t1"]
    assert run_capfilt(cfg, seed=0, log=lambda m: None)["shards_written"] == 0
