"""`blip2 capfilt`: caption, rank and filter a downloaded shard set (a Ray Data job)."""
from __future__ import annotations

import json
import sys

HELP = ("CapFilt: BLIP writes N nucleus-sampled captions per downloaded image, CLIP ranks them with the "
        "original caption, the best two are kept (resumable Ray Data job)")
FLAGS = {"input": "capfilt.input", "output": "capfilt.output"}


def add_arguments(parser) -> None:
    parser.add_argument("--input", help="download shard set, img2dataset output folder (webdataset, parquet or files "
                        "format) or WebDataset folder; local or s3://; default capfilt.input")
    parser.add_argument("--output", help="CapFilt shard set to write (local folder or s3://); default capfilt.output")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON instead of the table")


def run(args, cfg) -> int:
    from capfilt.job import format_summary, run_capfilt
    from orchestration.ray_session import ensure_ray
    from pipelines.adapters import InputLimits
    from pipelines.schema import SchemaError

    ensure_ray(cfg.ray)
    try:
        summary = run_capfilt(cfg.capfilt, cfg.seed, log=lambda m: print(m, file=sys.stderr, flush=True),
                              limits=InputLimits.of(cfg.download))  # an img2dataset/WebDataset sample's caps
    except (SchemaError, FileNotFoundError) as e:
        print(f"blip2 capfilt: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1) if args.json else format_summary(summary), flush=True)
    return 0
