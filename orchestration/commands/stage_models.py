"""`blip2 stage-models --models-root DIR|s3://...`: the paper's models into the layout the presets read."""
from __future__ import annotations

import sys

HELP = ("stage the paper's models (BLIP-large, CLIP ViT-L/14, EVA ViT-g from BLIP-2, bert-base-uncased, OPT-2.7B/"
        "6.7B, FlanT5-XL/XXL) from the Hugging Face Hub or an HF cache into a models root (local or s3://) with a "
        "manifest (_staged.json); resumable")


def add_arguments(parser) -> None:
    from orchestration.staging import MANIFEST, PAPER_MODELS, PAPER_MODELS_ROOT

    parser.epilog = ("Models: " + "; ".join(f"{m.name} <- {m.repo_id}{' ' + m.part if m.part else ''} ({m.used_by})"
                                           for m in PAPER_MODELS)
                     + f". The paper presets read {PAPER_MODELS_ROOT}/<name>; another root: override their model.* "
                     f"and capfilt.* paths. Rerun to resume: models complete in {MANIFEST} are kept. Offline "
                     "(HF_HUB_OFFLINE=1) they come from the HF cache only (HF_HOME / HF_HUB_CACHE or --cache-dir).")
    parser.add_argument("--models-root", help=f"where to stage: a folder or s3://bucket[/prefix] (the presets: "
                                              f"{PAPER_MODELS_ROOT})")
    parser.add_argument("--only", help="comma-separated model names (default: all), e.g. opt-2.7b,eva-vit-g")
    parser.add_argument("--cache-dir", help="HF cache to read and fill (default: huggingface_hub's, HF_HUB_CACHE)")
    parser.add_argument("--list", action="store_true", help="print the models, their repos and what reads them")


def run(args, cfg) -> int:
    from orchestration.staging import PAPER_MODELS, read_manifest, select, stage_models

    if args.list:
        for m in PAPER_MODELS:
            print(f"{m.name:28s} {m.repo_id + (' ' + m.part if m.part else ''):42s} {m.used_by}")
        return 0
    if not args.models_root:
        print("blip2 stage-models: pass --models-root DIR|s3://bucket (the paper presets read s3://blip2-models)",
              file=sys.stderr)
        return 2
    try:
        select(args.only)
    except ValueError as e:
        print(f"blip2 stage-models: {e}", file=sys.stderr)
        return 2
    result = stage_models(args.models_root, args.only, args.cache_dir,
                          log=lambda msg: print(f"blip2 stage-models: {msg}", file=sys.stderr, flush=True))
    staged = read_manifest(args.models_root)["models"]
    print(f"{args.models_root}: {len(result['staged'])} staged, {len(result['kept'])} kept, "
          f"{len(result['failed'])} failed; {sum(e['bytes'] for e in staged.values()) / 1e9:.2f} GB in the manifest")
    for name, error in result["failed"].items():
        print(f"  {name}: {error}")
    return 1 if result["failed"] else 0
