"""`blip2 export-hf CKPT OUT`: write a transformers directory for a checkpoint.

Stage 2 → ``Blip2ForConditionalGeneration`` (+ ``blip2_extra.safetensors`` with the stage-1 parts
HF has no place for); stage 1 → ``Blip2ForImageTextRetrieval`` (the stage-1 exporter).
"""
from __future__ import annotations

HELP = "export a checkpoint as a Hugging Face Blip2ForConditionalGeneration (stage 2) / Blip2ForImageTextRetrieval (stage 1) directory"


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", help="checkpoint directory (local or s3://)")
    parser.add_argument("out", help="output directory")


def model_overrides(args, cfg) -> dict:
    """The ``model.*`` keys given on the command line, typed by the config system."""
    keys = {o.split("=", 1)[0].removeprefix("model.") for o in args.overrides if o.startswith("model.")}
    return {k: getattr(cfg.model, k) for k in keys}


def is_stage1(root) -> bool:
    """A stage-1 model dir (``qformer_config.json``) or a Ray Train checkpoint of stage 1."""
    import json

    if (root / "qformer_config.json").exists():
        return True
    if (root / "state.json").exists() and (root / "config.json").exists():
        return json.loads((root / "config.json").read_text()).get("train", {}).get("stage") == 1
    return False


def export_stage1(root, out: str, overrides: dict):
    from training.hf_io import export_retrieval
    from training.stage1 import Blip2Stage1

    if (root / "qformer_config.json").exists():
        model = Blip2Stage1.from_pretrained(str(root), **overrides)
    else:
        from training.hf_export_stage2 import _model_config_from, read_trainer_checkpoint

        config, weights = read_trainer_checkpoint(root)
        model = Blip2Stage1.from_config(_model_config_from(config.get("model", {}), overrides))
        model.load_trainable_state_dict(weights)
    return export_retrieval(model, out)


def run(args, cfg) -> int:
    import json
    import sys
    from pathlib import Path

    from pipelines.remote import local_dir
    from training.hf_export_stage2 import export_hf

    root = Path(local_dir(args.checkpoint))
    overrides = model_overrides(args, cfg)
    try:
        if is_stage1(root):
            out = export_stage1(root, args.out, overrides)
        else:
            out = export_hf(str(root), args.out, overrides)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"blip2 export-hf: {e}", file=sys.stderr)
        return 1
    files = sorted(p.name for p in Path(out).iterdir())
    print(json.dumps({"out": str(out), "files": files}, indent=2))
    return 0
