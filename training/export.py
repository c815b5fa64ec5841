"""Export a checkpoint as a transformers directory: stage 2 (a Ray Train checkpoint, our model
directory or an HF directory) → ``Blip2ForConditionalGeneration``, stage 1 →
``Blip2ForImageTextRetrieval``. Above both stages and their HF layouts (``training.hf_io``,
``training.hf_export_stage2``), which never import it."""
from __future__ import annotations

import json
from pathlib import Path

from pipelines.storage import local_dir
from training.hf_export_stage2 import model_config_from_saved, read_trainer_checkpoint
from training.hf_io import export_retrieval
from training.stage1 import Blip2Stage1
from training.stage2 import Blip2Stage2


def export(checkpoint: str, out: str | Path, overrides: dict | None = None) -> Path:
    """Either stage's checkpoint (local or s3://) → its transformers directory ``out``."""
    root = Path(local_dir(str(checkpoint)))
    overrides = overrides or {}
    return export_stage1(root, str(out), overrides) if is_stage1(root) else export_hf(str(root), out, overrides)


def is_stage1(root: Path) -> bool:
    """A stage-1 model dir (``qformer_config.json``) or a Ray Train checkpoint of stage 1."""
    if (root / "qformer_config.json").exists():
        return True
    if (root / "state.json").exists() and (root / "config.json").exists():
        return json.loads((root / "config.json").read_text()).get("train", {}).get("stage") == 1
    return False


def export_stage1(root: Path, out: str, overrides: dict) -> Path:
    """A stage-1 model dir or Ray Train checkpoint → ``Blip2ForImageTextRetrieval`` directory."""
    if (root / "qformer_config.json").exists():
        model = Blip2Stage1.from_pretrained(str(root), **overrides)
    else:
        config, weights = read_trainer_checkpoint(root)
        model = Blip2Stage1.from_config(model_config_from_saved(config.get("model", {}), overrides))
        model.load_trainable_state_dict(weights)
    return export_retrieval(model, out)



def export_hf(checkpoint: str, out: str | Path, overrides: dict | None = None) -> Path:
    """Write the HF directory for a stage-2 checkpoint: one of our/HF directories (re-saved, which
    also checks that it loads) or a Ray Train checkpoint (trainable weights + the run's config)."""
    root = Path(local_dir(str(checkpoint)))
    overrides = overrides or {}
    trainer = read_trainer_checkpoint(root)
    if trainer is not None:
        config, weights = trainer
        if "language_projection.weight" not in weights:
            raise ValueError(f"{checkpoint}: a stage-1 checkpoint (no language_projection)")
        model = Blip2Stage2.from_config(model_config_from_saved(config.get("model", {}), overrides))
        model.load_trainable_state_dict(weights)
    elif (root / "config.json").exists() or (root / "blip2_hf_config.json").exists():
        model = Blip2Stage2.from_pretrained(str(root), **overrides)
    else:
        raise FileNotFoundError(f"{checkpoint}: neither a training checkpoint nor a stage-2 model directory")
    if model.cfg.vision != "eva_vit_g":
        raise ValueError("a clip_vit_l image encoder has no place in Blip2ForConditionalGeneration "
                         "(CLIP's pre-LayerNorm and q/k/v layout differ from Blip2VisionModel); "
                         "use the checkpoint directory itself with Blip2Stage2.from_pretrained")
    model.save_pretrained(Path(out))
    return Path(out)
