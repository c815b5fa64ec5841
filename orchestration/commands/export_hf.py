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


def run(args, cfg) -> int:
    import json
    import sys
    from pathlib import Path

    from training.export import export

    try:
        out = export(args.checkpoint, args.out, model_overrides(args, cfg))
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"blip2 export-hf: {e}", file=sys.stderr)
        return 1
    files = sorted(p.name for p in Path(out).iterdir())
    print(json.dumps({"out": str(out), "files": files}, indent=2))
    return 0
