"""`blip2 demo`: the whole pipeline end to end on the embedded synthetic corpus (CPU, minutes)."""
from __future__ import annotations

HELP = ("end-to-end demo: synthetic corpus served on 127.0.0.1 -> download -> capfilt -> train stage 1/2 "
        "-> eval -> HTML shard report -> export to transformers, with tiny models on local Ray")


def add_arguments(parser) -> None:
    parser.add_argument("--workdir", default="runs/demo", help="where everything is written (default runs/demo)")
    parser.add_argument("--images", type=int, default=512, help="training images in the synthetic corpus")
    parser.add_argument("--heldout", type=int, default=64, help="held-out images for the retrieval check")
    parser.add_argument("--stage1-steps", type=int, default=600)
    parser.add_argument("--stage2-steps", type=int, default=150)
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers")
    parser.add_argument("--teach-steps", type=int, default=None,
                        help="optimizer steps teaching each tiny model the shapes world (default: tiny_teacher's)")


def run(args, cfg) -> int:
    import json
    from pathlib import Path

    from orchestration.demo import format_summary, run_demo

    result = run_demo(Path(args.workdir), images=args.images, heldout=args.heldout,
                      stage1_steps=args.stage1_steps, stage2_steps=args.stage2_steps, seed=cfg.seed,
                      workers=args.workers, teach_steps=args.teach_steps,
                      extra=args.overrides)
    Path(result["workdir"], "demo_summary.json").write_text(json.dumps(result, indent=1))
    print(format_summary(result))
    return 0
