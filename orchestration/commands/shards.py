"""`blip2 shards inspect|search|export`: look at, search and convert shard sets."""
from __future__ import annotations

import json
import sys

HELP = ("inspect a shard set (local or s3://; img2dataset and WebDataset folders too): stats, --verify, --sample, "
        "--html; search it by text or image (faiss over its CLIP embeddings); export it as WebDataset tars")
FLAGS = {"index": "search.index"}  # shards search --index


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

    q = sub.add_parser("search", help="top-k rows for a text or image query (faiss index, built incrementally)",
                       description="Update the faiss index over the set's CLIP image embeddings (only shards it "
                                   "does not hold yet are added), embed the query with the CapFilt ranker "
                                   "(capfilt.ranker) and print the top-k rows.")
    q.add_argument("path", help="CapFilt or curated shard set: local path, file:// or s3://")
    what = q.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", help="a text query (CLIP text tower)")
    what.add_argument("--image", help="an image file to search with (CLIP image tower)")
    q.add_argument("-k", type=int, default=None, help="hits to return (default search.k)")
    q.add_argument("--index", help="index folder (default search.index, else <path>/_index)")
    q.add_argument("--html", metavar="OUT", help="write the hits as an HTML page with thumbnails")
    q.add_argument("--json", metavar="OUT", help="also write the hits as JSON")

    e = sub.add_parser("export", help="write a CapFilt shard set as WebDataset .tar shards (open_clip, webdataset)",
                       description="NNNNN.tar per shard with <key>.jpg, .txt (best caption) and .json (captions, "
                                   "scores, source, url, meta), plus sizes.json; resumable (existing tars are kept).")
    e.add_argument("path", help="CapFilt (or curated) shard set: local path, file:// or s3://")
    e.add_argument("output", help="folder for the .tar shards: local path or s3://")
    e.add_argument("--format", choices=["webdataset"], default="webdataset")


def run(args, cfg) -> int:
    if args.shards_command == "search":
        return _search(args, cfg)
    if args.shards_command == "export":
        return _export(args, cfg)
    from pipelines.inspect import inspect_shards
    from pipelines.report import format_text

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


def _search(args, cfg) -> int:
    from capfilt.search import format_hits, run_search, write_search_page
    from orchestration.ray_session import ensure_ray

    try:
        ensure_ray(cfg.ray)   # the index is trained and filled by Ray tasks
        result = run_search(args.path, cfg.search, cfg.capfilt.ranker, text=args.text, image_path=args.image, k=args.k,
                            log=lambda m: print(m, file=sys.stderr, flush=True))
    except (FileNotFoundError, ValueError) as e:
        print(f"blip2 shards search: {e}", file=sys.stderr)
        return 2
    print(format_hits(result))
    if args.html:
        print(f"HTML page        {write_search_page(args.path, result, args.html)}")
    if args.json:
        hits = [{k: v for k, v in h.__dict__.items() if k != "image"} for h in result["hits"]]
        with open(args.json, "w") as f:
            json.dump({"query": result["query"], "index": result["index"], "hits": hits}, f, indent=1)
    return 0


def _export(args, cfg) -> int:
    from orchestration.ray_session import ensure_ray
    from pipelines.schema import SchemaError
    from pipelines.webdataset_export import export_webdataset

    try:
        ensure_ray(cfg.ray)
        summary = export_webdataset(args.path, args.output, log=lambda m: print(m, file=sys.stderr))
    except (SchemaError, FileNotFoundError, ValueError) as e:
        print(f"blip2 shards export: {e}", file=sys.stderr)
        return 2
    print(f"webdataset → {args.output}: {summary['tars']} tars, {summary['samples']} samples "
          f"({summary['written']} written now)\n  open_clip: --train-data '{summary['pattern']}' "
          f"--train-num-samples {summary['samples']} --dataset-type webdataset")
    return 0
