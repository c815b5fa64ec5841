"""A pre-populated Hugging Face cache: tiny models under the paper's real repo ids.

The layout is huggingface_hub's own (``models--org--name/blobs/<sha256>``,
``snapshots/<commit>/<file>`` links to the blobs, ``refs/main`` holding the commit), so with
``HF_HUB_OFFLINE=1`` ``from_pretrained("facebook/opt-2.7b")`` and ``snapshot_download`` read it
as they read a cache the Hub filled. tests/conftest.py points ``HF_HUB_CACHE`` at a session
folder before anything imports huggingface_hub.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


def commit_of(repo_id: str) -> str:
    """A fixed 40-hex 'commit' per repo (what a manifest must record)."""
    return hashlib.sha1(f"tiny:{repo_id}".encode()).hexdigest()


def add_to_cache(cache: str | os.PathLike, repo_id: str, folder: str | os.PathLike) -> Path:
    """Put every file of ``folder`` into ``cache`` as revision ``main`` of model ``repo_id``."""
    repo = Path(cache) / f"models--{repo_id.replace('/', '--')}"
    commit = commit_of(repo_id)
    snapshot = repo / "snapshots" / commit
    for src in sorted(p for p in Path(folder).rglob("*") if p.is_file() and not p.name.startswith(".")):
        blob = repo / "blobs" / hashlib.sha256(src.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            shutil.copyfile(src, blob)
        link = snapshot / src.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def build_tiny_blip2(out: Path, tiny_models: dict) -> Path:
    """A tiny ``Blip2ForConditionalGeneration`` (as ``Salesforce/blip2-opt-2.7b`` is stored: sharded
    safetensors with an index, a BLIP image processor), its vision tower the tiny EVA's weights."""
    import torch
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2QFormerConfig, Blip2VisionModel,
                              BlipImageProcessor, OPTConfig)

    from orchestration.tiny_models import CLIP_MEAN, CLIP_STD, IMAGE_SIZE

    eva = Blip2VisionModel.from_pretrained(tiny_models["vision_eva"])
    qformer = Blip2QFormerConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                 encoder_hidden_size=eva.config.hidden_size)
    cfg = Blip2Config(vision_config=eva.config.to_dict(), qformer_config=qformer.to_dict(),
                      text_config=OPTConfig.from_pretrained(tiny_models["opt"]).to_dict(), num_query_tokens=4)
    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration(cfg)
    model.vision_model.load_state_dict(eva.state_dict())
    model.save_pretrained(out, max_shard_size="200KB")  # several shards: staging reads the index
    BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=CLIP_MEAN,
                       image_std=CLIP_STD).save_pretrained(out)
    return out


# repo id -> the tiny model standing for it (a tiny_models name, or "blip2" for build_tiny_blip2)
TINY_FOR_REPO = {
    "Salesforce/blip-image-captioning-large": "captioner",
    "openai/clip-vit-large-patch14": "ranker",
    "Salesforce/blip2-opt-2.7b": "blip2",
    "bert-base-uncased": "bert",
    "facebook/opt-2.7b": "opt",
    "facebook/opt-6.7b": "opt",
    "google/flan-t5-xl": "t5",
    "google/flan-t5-xxl": "t5",
}


def populate_paper_models(cache: str | os.PathLike, tiny_models: dict, work: Path) -> dict[str, Path]:
    """Every repo of the paper's run in ``cache`` as a tiny model; repo id -> snapshot folder."""
    blip2 = build_tiny_blip2(work / "blip2", tiny_models)
    return {repo: add_to_cache(cache, repo, blip2 if name == "blip2" else tiny_models[name])
            for repo, name in TINY_FOR_REPO.items()}
