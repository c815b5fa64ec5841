"""`blip2 rehearse --config PRESET`: a preset's models at real size, a few steps of its job, the run's needs."""
from __future__ import annotations

import sys

HELP = ("dry run of a preset at its real model sizes (staged weights, else random ones from the real configs): a few "
        "steps of its job through the job's own code; reports parameters, FLOPs per sample, peak memory per device "
        "and the projected wall time on the preset's cluster")


def add_arguments(parser) -> None:
    parser.epilog = ("The job is the preset's train.stage (capfilt for a preset with no model.vision_path, e.g. "
                     "paper_corpus). --device meta builds the models without weights (sizes only); on a CPU, fp16 "
                     "parts run in bf16 and the wall time is projected from counted FLOPs at an assumed MFU.")
    parser.add_argument("--job", choices=("capfilt", "stage1", "stage2"), default=None,
                        help="what to rehearse (default: from the preset)")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda or meta")
    parser.add_argument("--batch", type=int, default=0, help="samples per rehearsal step (default 2)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps after the counted warm-up step")
    parser.add_argument("--workdir", default="runs/rehearse",
                        help="where random stand-ins for unstaged models are built once (default runs/rehearse)")
    parser.add_argument("--gpu", choices=("A100", "H100", "H200"), default=None,
                        help="the cluster's GPU for the projection (default: H100 for *_h100 presets, else A100)")
    parser.add_argument("--mfu", type=float, default=0.33,
                        help="assumed model FLOPs utilisation for the CPU projection (default 0.33: stage 1's "
                             "measured MFU on an H100, README Performance)")
    parser.add_argument("--json", metavar="OUT", help="also write the figures as JSON")


def run(args, cfg) -> int:
    import json

    from orchestration.rehearse import run_rehearsal

    if not args.config:
        print("blip2 rehearse: pass --config PRESET (e.g. paper_stage1_vitl)", file=sys.stderr)
        return 2
    try:
        result = run_rehearsal(cfg, args.config, job=args.job, device=args.device, batch=args.batch, steps=args.steps,
                               work=args.workdir, gpu=args.gpu, mfu=args.mfu,
                               log=lambda m: print(f"blip2 rehearse: {m}", file=sys.stderr, flush=True))
    except (ValueError, OSError) as e:
        print(f"blip2 rehearse: {e}", file=sys.stderr)
        return 2
    print(result["report"], flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({k: v for k, v in result.items() if k != "report"}, f, indent=1, default=str)
    return 0 if result["device"] == "meta" or result["row"].get("finite", True) else 1
