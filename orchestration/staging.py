"""The paper's models, staged from the Hugging Face Hub (or an HF cache) into a models root.

Each model lands in ``<root>/<name>/`` in the ``save_pretrained`` layout the presets read
(``s3://blip2-models/opt-2.7b`` ...); ``<root>/_staged.json`` records what was staged: repo id,
commit, and every file with its bytes and sha256. A model whose entry is complete and whose
files are all there (same sizes) is skipped, so a rerun resumes. Downloads go through
huggingface_hub (``snapshot_download``), so ``HF_HUB_OFFLINE``, ``HF_HOME`` / ``HF_HUB_CACHE`` and
``HF_TOKEN`` apply as everywhere in the HF stack.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import fsspec

from pipelines.storage import hub_snapshot, is_local

MANIFEST = "_staged.json"
PAPER_MODELS_ROOT = "s3://blip2-models"   # what the paper presets name


@dataclass(frozen=True)
class PaperModel:
    name: str              # folder under the models root
    repo_id: str
    used_by: str           # the config keys that read it
    part: str = ""         # "": the repo as saved; "vision_model": that tower of a Blip2 checkpoint


PAPER_MODELS = (
    PaperModel("blip-image-captioning-large", "Salesforce/blip-image-captioning-large", "capfilt.captioner"),
    # one CLIPModel folder: the ranker, and CLIPVisionModel.from_pretrained reads its vision tower
    PaperModel("clip-vit-large-patch14", "openai/clip-vit-large-patch14",
               "capfilt.ranker; model.vision_path with vision=clip_vit_l"),
    PaperModel("eva-vit-g", "Salesforce/blip2-opt-2.7b", "model.vision_path with vision=eva_vit_g",
               part="vision_model"),
    PaperModel("bert-base-uncased", "bert-base-uncased", "model.qformer_init"),
    PaperModel("opt-2.7b", "facebook/opt-2.7b", "model.llm_path (paper_stage2_opt2_7b)"),
    PaperModel("opt-6.7b", "facebook/opt-6.7b", "model.llm_path (paper_stage2_opt6_7b)"),
    PaperModel("flan-t5-xl", "google/flan-t5-xl", "model.llm_path (paper_stage2_flant5xl)"),
    PaperModel("flan-t5-xxl", "google/flan-t5-xxl", "model.llm_path (paper_stage2_flant5xxl)"),
)
BY_NAME = {m.name: m for m in PAPER_MODELS}

# configs and tokenizers (vocab.txt, merges.txt, spiece.model); weights as safetensors, else
# PyTorch .bin. TF/Flax/ONNX/Rust weights and READMEs are never fetched.
META_PATTERNS = ["*.json", "*.txt", "*.model"]
SAFETENSORS = ["*.safetensors"]
TORCH_BIN = ["pytorch_model*.bin"]


def select(only: str | list[str] | None) -> list[PaperModel]:
    names = [n.strip() for n in only.split(",")] if isinstance(only, str) else list(only or [])
    unknown = [n for n in names if n and n not in BY_NAME]
    if unknown:
        raise ValueError(f"unknown model {unknown[0]!r}; models: {', '.join(BY_NAME)}")
    return [m for m in PAPER_MODELS if not names or m.name in names]


def _matches(path: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(Path(path).name, p) for p in patterns)


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def _snapshot(repo_id: str, patterns: list[str], cache_dir: str | None) -> Path:
    return Path(hub_snapshot(repo_id, allow_patterns=patterns, cache_dir=cache_dir))


def whole_repo(m: PaperModel, cache_dir: str | None, work: Path) -> tuple[Path, list[str], str]:
    """(folder, files to stage, commit): configs + tokenizer + one format of weights, read in place
    from the HF cache (``work`` is unused: nothing is derived)."""
    snap = _snapshot(m.repo_id, META_PATTERNS + SAFETENSORS, cache_dir)
    files = [f for f in _files(snap) if _matches(f, META_PATTERNS + SAFETENSORS)]
    if any(_matches(f, SAFETENSORS) for f in files):
        files = [f for f in files if not f.endswith(".bin.index.json")]
    else:
        snap = _snapshot(m.repo_id, META_PATTERNS + TORCH_BIN, cache_dir)
        files = [f for f in _files(snap) if _matches(f, META_PATTERNS + TORCH_BIN)]
    if not any(_matches(f, SAFETENSORS + TORCH_BIN) for f in files):
        raise FileNotFoundError(f"{m.repo_id} at {snap}: no weights (*.safetensors or pytorch_model*.bin); "
                                "the cache holds part of the repo only: rerun where the Hub is reachable")
    return snap, files, snap.name


def vision_tower(m: PaperModel, cache_dir: str | None, work: Path) -> tuple[Path, list[str], str]:
    """The ``vision_model`` of a Blip2 checkpoint as a ``Blip2VisionModel`` folder; only the weight
    shards holding it are fetched, and only its tensors are read."""
    import torch
    from transformers import Blip2Config, Blip2VisionModel

    prefix = f"{m.part}."
    snap = _snapshot(m.repo_id, ["config.json", "preprocessor_config.json", "*.index.json"], cache_dir)
    shards = []
    for index, patterns in (("model.safetensors.index.json", SAFETENSORS), ("pytorch_model.bin.index.json", TORCH_BIN)):
        if (snap / index).exists():
            weight_map = json.loads((snap / index).read_text())["weight_map"]
            shards = sorted({f for k, f in weight_map.items() if k.startswith(prefix)})
            break
    if not shards:  # a single-file checkpoint
        shards = ["model.safetensors"] if _snapshot(m.repo_id, SAFETENSORS, cache_dir).joinpath(
            "model.safetensors").exists() else ["pytorch_model.bin"]
    snap = _snapshot(m.repo_id, shards, cache_dir)
    missing = [s for s in shards if not (snap / s).exists()]
    if missing:
        raise FileNotFoundError(f"{m.repo_id} at {snap}: weight shard {missing[0]} is not in the cache")
    state = {}
    for shard in shards:
        if shard.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(str(snap / shard), "pt") as f:
                state.update({k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)})
        else:
            sd = torch.load(snap / shard, map_location="cpu", mmap=True, weights_only=True)
            state.update({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)})
    config = Blip2Config.from_pretrained(str(snap), trust_remote_code=False).vision_config
    with torch.device("meta"):
        tower = Blip2VisionModel(config)
    tower.load_state_dict(state, strict=True, assign=True)  # every tensor present, in its stored dtype
    out = work / m.name
    tower.save_pretrained(out)
    if (snap / "preprocessor_config.json").exists():
        shutil.copyfile(snap / "preprocessor_config.json", out / "preprocessor_config.json")
    return out, _files(out), snap.name


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(root: str) -> dict:
    fs, base = fsspec.core.url_to_fs(root)
    path = f"{base.rstrip('/')}/{MANIFEST}"
    return json.loads(fs.cat_file(path)) if fs.exists(path) else {"models": {}}


def _write_manifest(root: str, manifest: dict) -> None:
    fs, base = fsspec.core.url_to_fs(root)
    if is_local(fs):
        fs.makedirs(base, exist_ok=True)
    with fs.open(f"{base.rstrip('/')}/{MANIFEST}", "w") as f:
        json.dump(manifest, f, indent=1)


def is_staged(root: str, name: str, entry: dict | None) -> bool:
    """The entry is complete and every file it lists is under ``root/name`` with its size."""
    if not entry or not entry.get("complete"):
        return False
    fs, base = fsspec.core.url_to_fs(root)
    folder = f"{base.rstrip('/')}/{name}"
    found = {p[len(folder) + 1:]: info["size"] for p, info in fs.find(folder, detail=True).items()} \
        if fs.exists(folder) else {}
    return all(found.get(f["path"]) == f["bytes"] for f in entry["files"])


def stage_one(m: PaperModel, root: str, cache_dir: str | None, log: Callable[[str], None]) -> dict:
    fs, base = fsspec.core.url_to_fs(root)
    dest = f"{base.rstrip('/')}/{m.name}"
    with tempfile.TemporaryDirectory(prefix="blip2-stage-") as tmp:
        src, files, commit = (vision_tower if m.part else whole_repo)(m, cache_dir, Path(tmp))
        if fs.exists(dest):  # a partial earlier copy: no stale file may survive next to the new ones
            fs.rm(dest, recursive=True)
        entries = []
        for name in files:
            local = src / name
            entries.append({"path": name, "bytes": local.stat().st_size, "sha256": _sha256(local)})
            if is_local(fs):
                fs.makedirs(str(Path(dest, name).parent), exist_ok=True)
            fs.put_file(str(local), f"{dest}/{name}")
    total = sum(e["bytes"] for e in entries)
    log(f"staged {m.name:28s} {m.repo_id}@{commit[:12]}{' (' + m.part + ')' if m.part else ''}: "
        f"{len(entries)} files, {total / 1e9:.2f} GB")
    return {"repo_id": m.repo_id, "revision": commit, "part": m.part, "used_by": m.used_by, "files": entries,
            "bytes": total, "complete": True, "staged_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def stage_models(root: str, only: str | list[str] | None = None, cache_dir: str | None = None,
                 log: Callable[[str], None] = print) -> dict:
    """Stage the selected paper models into ``root`` (local folder or ``s3://``); returns
    ``{"staged": [...], "kept": [...], "failed": {name: error}}``. A model that cannot be staged
    (not in an offline cache, no weights) is reported and the others still run."""
    models = select(only)
    manifest = read_manifest(root)
    out: dict = {"staged": [], "kept": [], "failed": {}}
    for m in models:
        if is_staged(root, m.name, manifest["models"].get(m.name)):
            log(f"kept   {m.name:28s} (complete in {MANIFEST})")
            out["kept"].append(m.name)
            continue
        try:
            entry = stage_one(m, root, cache_dir, log)
        except (FileNotFoundError, OSError, ValueError) as e:
            log(f"FAILED {m.name:28s} {e}")
            out["failed"][m.name] = str(e)
            continue
        manifest["models"][m.name] = entry
        _write_manifest(root, manifest)   # after each model: an interrupted run keeps what it finished
        out["staged"].append(m.name)
    return out
