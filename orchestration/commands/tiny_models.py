"""`blip2 tiny-models`: build the tiny random models the `tiny` preset points at."""
from __future__ import annotations

HELP = "build tiny random models (save_pretrained layout) for CPU runs of the whole pipeline"


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="runs/tiny-models", help="output folder (default: runs/tiny-models)")


def run(args, cfg) -> int:
    from orchestration.tiny_models import build_tiny_models

    for name, path in build_tiny_models(args.out, seed=cfg.seed).items():
        print(f"{name:>11}: {path}")
    return 0
