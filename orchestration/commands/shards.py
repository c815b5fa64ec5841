"""`blip2 shards inspect PATH`: statistics, consistency and a visual report of a shard set."""
from __future__ import annotations

import json
import sys

HELP = "inspect a download or CapFilt shard set (local or s3://): stats, --verify, --sample, --html"


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="shards_command", metavar="ACTION", required=True)
    p = sub.add_parser("inspect", help="print statistics and manifest/checksum consistency",
                       description="Stream over every shard (row group by row group) and print one screen "
                                   "of statistics. Exit code 1 when --verify finds an inconsistency.")
    p.add_argument("path", help="shard set folder: local path, file:// or s3://")
    p.add_argument("--html", metavar="OUT", help="write a self-contained HTML report (charts + thumbnails)")
    p.add_argument("--sample", type=int, default=0, metavar="N", help="print the first N rows")
    p.add_argument("--verify", action="store_true",
                   help="re-read every shard: sha256 vs manifest, schema, full decode; exit 1 on any problem")
    p.add_argument("--thumbnails", type=int, default=24, metavar="N", help="images in the HTML grid (default 24)")
    p.add_argument("--json", metavar="OUT", help="also write the statistics as JSON")


def run(args, cfg) -> int:
    from pipelines.inspect import format_text, inspect_shards

    ins = inspect_shards(args.path, sample=args.sample, verify=args.verify,
                         thumbnails=args.thumbnails if args.html else 0)
    print(format_text(ins))
    if args.html:
        from pipelines.report import write_html

        print(f"HTML report      {write_html(ins, args.html)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(ins.to_dict(), f, indent=1, default=str)
    if not ins.shards:
        print(f"blip2 shards inspect: {args.path} holds no committed shards", file=sys.stderr)
        return 1
    return 1 if args.verify and not ins.ok else 0
