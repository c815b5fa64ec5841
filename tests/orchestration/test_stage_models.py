"""`blip2 stage-models`: the paper's models (tiny, under their real repo ids in an offline HF cache)
staged into a local and an s3:// root, then CapFilt and both training stages run from the staged
root and from the Hub ids through the real loading code."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import fsspec
import pytest
import torch

from orchestration.cli import main
from orchestration.config import available_presets, load_config
from orchestration.staging import BY_NAME, MANIFEST, PAPER_MODELS, PAPER_MODELS_ROOT, read_manifest
from tests.helpers.hf_cache import TINY_FOR_REPO, commit_of
from tests.helpers.shards import write_download_set
from tests.training.train_fixtures import write_capfilt

MODEL_KEYS = ("model.vision_path", "model.qformer_init", "model.llm_path", "capfilt.captioner", "capfilt.ranker")


def _value(cfg, key: str) -> str:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


@pytest.mark.parametrize("preset", [p for p in available_presets() if p.startswith("paper_")])
def test_every_paper_preset_reads_staged_folders_of_the_right_kind(preset):
    cfg = load_config(preset)
    for key in MODEL_KEYS:
        value = _value(cfg, key)
        if not value:
            continue
        assert value.startswith(PAPER_MODELS_ROOT + "/"), f"{preset} {key}={value}"
        name = value.removeprefix(PAPER_MODELS_ROOT + "/")
        assert name in BY_NAME, f"{preset} {key}={value}: stage-models stages no {name!r}"
        assert key.split(".")[1] in BY_NAME[name].used_by or key in BY_NAME[name].used_by
    if cfg.train.stage == 2:
        assert BY_NAME[cfg.model.llm_path.rsplit("/", 1)[1]].repo_id.split("/")[0] == \
            {"opt": "facebook", "t5": "google"}[cfg.model.llm_family]
    if cfg.model.vision_path and cfg.model.vision == "eva_vit_g":
        assert cfg.model.vision_path.endswith("/eva-vit-g")


def _files_ok(root: str, name: str, entry: dict) -> None:
    fs, base = fsspec.core.url_to_fs(root)
    for f in entry["files"]:
        data = fs.cat_file(f"{base}/{name}/{f['path']}")
        assert len(data) == f["bytes"] and hashlib.sha256(data).hexdigest() == f["sha256"]


def test_stage_into_local_and_s3_resume_and_manifest(hf_paper_cache, tiny_models, tmp_path, s3_bucket, capsys):
    local = str(tmp_path / "models")
    assert main(["stage-models", "--models-root", local]) == 0
    manifest = read_manifest(local)["models"]
    assert set(manifest) == {m.name for m in PAPER_MODELS}
    for m in PAPER_MODELS:
        entry = manifest[m.name]
        assert entry["complete"] and entry["repo_id"] == m.repo_id and entry["revision"] == commit_of(m.repo_id)
        _files_ok(local, m.name, entry)
        paths = {f["path"] for f in entry["files"]}
        assert "config.json" in paths and any(p.endswith(".safetensors") for p in paths)
    # the EVA tower is the checkpoint's vision_model, alone, with the BLIP-2 image processor
    from transformers import Blip2VisionModel

    eva = Blip2VisionModel.from_pretrained(f"{local}/eva-vit-g")
    ref = Blip2VisionModel.from_pretrained(tiny_models["vision_eva"])
    assert all(torch.equal(a, b) for a, b in zip(eva.state_dict().values(), ref.state_dict().values()))
    assert {f["path"] for f in manifest["eva-vit-g"]["files"]} == {"config.json", "model.safetensors",
                                                                 "preprocessor_config.json"}
    capsys.readouterr()
    assert main(["stage-models", "--models-root", local]) == 0       # resumes: nothing to do
    assert "0 staged, 8 kept" in capsys.readouterr().out
    # a file lost since: that model (only) is staged again
    Path(local, "opt-2.7b", "config.json").unlink()
    assert main(["stage-models", "--models-root", local, "--only", "opt-2.7b,bert-base-uncased"]) == 0
    assert "1 staged, 1 kept" in capsys.readouterr().out

    assert main(["stage-models", "--models-root", s3_bucket, "--only", "eva-vit-g,opt-2.7b"]) == 0
    remote = read_manifest(s3_bucket)["models"]
    assert set(remote) == {"eva-vit-g", "opt-2.7b"}
    for name, entry in remote.items():
        assert entry["files"] == manifest[name]["files"]
        _files_ok(s3_bucket, name, entry)
    assert fsspec.core.url_to_fs(s3_bucket)[0].exists(f"{s3_bucket}/{MANIFEST}")


def test_a_model_missing_from_the_offline_cache_is_named_with_the_fix(tmp_path, capsys):
    rc = main(["stage-models", "--models-root", str(tmp_path / "m"), "--only", "opt-6.7b",
               "--cache-dir", str(tmp_path / "empty-cache")])
    out = capsys.readouterr().out
    assert rc == 1 and "opt-6.7b" in out and "'facebook/opt-6.7b'" in out and "HF_HUB_OFFLINE=1" in out
    assert main(["stage-models", "--models-root", str(tmp_path / "m"), "--only", "opt-9b"]) == 2
    assert "unknown model 'opt-9b'" in capsys.readouterr().err


def test_models_load_from_hub_ids_in_the_offline_cache(hf_paper_cache, corpus):
    """The presets' model keys take Hub ids as they are (the loaders resolve them in the HF cache)."""
    from PIL import Image

    from training.config import ModelConfig
    from training.llm import load_llm
    from training.stage1 import Blip2Stage1

    cfg = ModelConfig(vision="clip_vit_l", vision_path="openai/clip-vit-large-patch14", qformer_init="bert-base-uncased",
                      image_size=64, frozen_dtype="float32", num_query_tokens=4, embed_dim=16, max_text_len=16)
    model = Blip2Stage1.from_config(cfg)
    out = model(torch.randn(2, 3, 64, 64), ["a red circle", "a blue square"])
    assert torch.isfinite(out["loss"])
    t5, tok = load_llm(ModelConfig(llm_family="t5", llm_path="google/flan-t5-xxl"), torch.float32)
    assert type(t5).__name__ == "T5ForConditionalGeneration" and tok("a")["input_ids"]
    from capfilt.preprocess import load_image_processor

    proc = load_image_processor("Salesforce/blip-image-captioning-large")
    corpus_dir, items = corpus
    assert proc(Image.open(Path(corpus_dir) / items[0].file).convert("RGB"))["pixel_values"][0].shape == (3, 64, 64)


@pytest.mark.slow
def test_capfilt_and_both_stages_from_the_staged_s3_root_and_hub_ids(hf_paper_cache, corpus, tmp_path, s3_bucket,
                                                                     ray_local, capsys):
    """CapFilt with the captioner and ranker from the staged s3:// root; stage 1 from the staged
    EVA tower and BERT; stage 2 from the staged EVA tower and OPT-2.7B by its Hub id."""
    root = f"{s3_bucket}/models"
    assert main(["stage-models", "--models-root", root,
                 "--only", "blip-image-captioning-large,clip-vit-large-patch14,eva-vit-g,bert-base-uncased"]) == 0

    write_download_set(str(tmp_path / "download"), corpus, shards=1, per_shard=4)
    capsys.readouterr()
    assert main(["capfilt", "--config", "tiny", "--input", str(tmp_path / "download"),
                 "--output", str(tmp_path / "capfilt-out"), "--json", f"capfilt.captioner={root}/blip-image-captioning-large",
                 f"capfilt.ranker={root}/clip-vit-large-patch14", "capfilt.batch_size=2", "capfilt.rank_batch_size=2",
                 "capfilt.min_length=12", "capfilt.max_length=12"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out[out.index("{"):])["set"]["images_out"] >= 1

    data = tmp_path / "capfilt"
    write_capfilt(str(data), (corpus[0], corpus[1][:8]), rows_per_shard=8)
    common = [f"train.input={data}", f"train.output={tmp_path / 'runs'}", "train.num_workers=1", "train.batch_size=4",
              "train.steps=2", "train.warmup_steps=1", "train.checkpoint_every=2", "ingest.map_batch_size=8",
              "model.vision=eva_vit_g", f"model.vision_path={root}/eva-vit-g"]
    assert main(["train", "--stage", "1", "--config", "tiny", *common, "train.name=s1",
                 f"model.qformer_init={root}/bert-base-uncased"]) == 0
    assert main(["train", "--stage", "2", "--config", "tiny", *common, "train.name=s2",
                 f"model.stage1_checkpoint={tmp_path / 'runs' / 's1' / 'final'}", "model.llm_path=facebook/opt-2.7b"]) == 0
    assert (tmp_path / "runs" / "s2" / "final").is_dir()


def test_the_tiny_cache_stands_for_every_staged_repo():
    assert {m.repo_id for m in PAPER_MODELS} == set(TINY_FOR_REPO)
