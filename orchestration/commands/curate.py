"""`blip2 curate`: CLIP-score filter, exact + semantic dedup, NSFW/aesthetic heads over a CapFilt shard set."""
from __future__ import annotations

import json
import sys

HELP = ("curate a CapFilt shard set with its CLIP embeddings: CLIP-score filter, sha256 and semantic (SemDeDup) "
        "dedup, NSFW/aesthetic/watermark filters; every removed row is kept in <output>/_removed (resumable Ray job)")
FLAGS = {"input": "curate.input", "output": "curate.output"}


def add_arguments(parser) -> None:
    parser.add_argument("--input", help="CapFilt shard set (local folder or s3://); default curate.input")
    parser.add_argument("--output", help="curated shard set to write (local folder or s3://); default curate.output")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON instead of the table")


def run(args, cfg) -> int:
    from capfilt.curate import format_summary, run_curate
    from orchestration.ray_session import ensure_ray
    from pipelines.schema import SchemaError

    ensure_ray(cfg.ray)
    try:
        summary = run_curate(cfg.curate, cfg.seed, log=lambda m: print(m, file=sys.stderr, flush=True))
    except (SchemaError, FileNotFoundError) as e:
        print(f"blip2 curate: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1) if args.json else format_summary(summary), flush=True)
    return 0
