"""`blip2 submit <command> [args...]`: run any blip2 command as a Ray job on a cluster."""
from __future__ import annotations

import argparse
import os
import sys

HELP = "run a blip2 command on a Ray cluster through its job server (ray job submit, repo as working_dir)"


def add_arguments(parser) -> None:
    parser.add_argument("--address", default=None,
                        help="job server (dashboard) URL, e.g. http://127.0.0.1:8265; default $RAY_ADDRESS")
    parser.add_argument("--no-wait", action="store_true", help="return once submitted instead of following logs")
    parser.add_argument("--python", default="python", help="python on the cluster nodes (default: python)")
    parser.add_argument("--timeout", type=float, default=None, help="stop the job after this many seconds")
    parser.add_argument("job_command", metavar="COMMAND", help="the blip2 command to run, e.g. capfilt")
    parser.add_argument("job_args", nargs=argparse.REMAINDER, help="its arguments")


def run(args, cfg) -> int:
    from orchestration.submit import submit

    address = args.address or os.environ.get("RAY_ADDRESS")
    if not address:
        print("blip2 submit: no job server; pass --address http://HOST:8265 or set RAY_ADDRESS", file=sys.stderr)
        return 2
    # --config and key=value overrides belong to the submitted command, not to `submit`.
    job_args = list(args.job_args) + (["--config", args.config] if args.config else []) + list(args.overrides)
    _, code = submit(address, args.job_command, job_args, wait=not args.no_wait, python=args.python,
                     timeout_s=args.timeout, echo=lambda m: print(m, flush=True))
    return code
