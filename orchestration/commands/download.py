"""`blip2 download`: URL lists → Parquet shards of downloaded, resized images (local or s3://)."""
from __future__ import annotations

import sys

HELP = "download image-text URL lists (COCO/VG/CC3M/CC12M/SBU/LAION) into Parquet shards; resumable"
DEFAULT_PRESET = None
FLAGS = {"input": "download.input", "source": "download.source", "output": "download.output", "policy": "download.policy"}


def add_arguments(parser) -> None:
    parser.epilog = ("Security: private, loopback, link-local and non-http(s) targets are refused (also after "
                     "redirects and DNS) and counted as 'blocked'; download.allow_hosts='[127.0.0.1]' exempts "
                     "hosts/CIDRs, e.g. the local demo server (the tiny preset sets it). Bounds: every URL ends "
                     "within download.deadline seconds per attempt and download.max_bytes. Resume: run the same "
                     "command again; committed shards are skipped.")
    parser.add_argument("--input", help="URL list: file, glob or folder (local or s3://); sets download.input")
    parser.add_argument("--source", help="auto, coco, vg, cc3m, cc12m, sbu, laion, generic; sets download.source")
    parser.add_argument("--output", help="output shard set: folder or s3://bucket/prefix; sets download.output")
    parser.add_argument("--policy", help="captions: auto (the source's), web or human; sets download.policy")
    parser.add_argument("--plan-only", action="store_true",
                        help="read the lists and write the plan (partitions, duplicates, merged captions), download nothing")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress line")


def run(args, cfg) -> int:
    from orchestration.ray_session import ensure_ray
    from pipelines.download import format_summary, run_download
    from pipelines.schema import SchemaError
    from pipelines.sources import open_url_lists

    d = cfg.download
    if not d.input:
        print("blip2 download: no URL list; pass --input LIST (or download.input=...)", file=sys.stderr)
        return 2
    if d.allow_hosts:
        print(f"blip2 download: address guard allows {', '.join(d.allow_hosts)} (download.allow_hosts)",
              file=sys.stderr)
    try:
        lists = open_url_lists(d.input, d.source, d.url_prefix, d.policy)  # bad input fails here, before Ray starts
        ensure_ray(cfg.ray)
        summary = run_download(d, seed=cfg.seed, progress=not args.no_progress, lists=lists,
                               plan_only=args.plan_only, log=lambda m: print(m, file=sys.stderr))
    except (SchemaError, ValueError, FileNotFoundError) as e:
        print(f"blip2 download: {e}", file=sys.stderr)
        return 2
    print(format_summary(summary, d.output))
    return 0 if summary.get("plan_only") or summary["complete"] else 1
