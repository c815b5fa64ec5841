"""What `blip2 caption` and `blip2 vqa` share: their generation flags and the loop over images."""
from __future__ import annotations


def add_generation_arguments(parser) -> None:
    parser.add_argument("--num-beams", type=int, default=None, help="beam width; sets eval.num_beams (caption) "
                                                                      "or eval.vqa_num_beams (vqa)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="sets eval.max_new_tokens (caption) or "
                                                                         "eval.vqa_max_new_tokens (vqa)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per image")


def emit(args, image: str, key: str, value: str) -> None:
    import json

    print(json.dumps({"image": image, key: value}) if args.json else f"{image}\t{value}", flush=True)


def over_images(args, command: str, key: str, infer, load) -> int:
    """``load()`` the model, then ``infer(image)[key]`` for every image. A model that cannot be
    loaded is one line and exit status 2; an unreadable image is reported and counted, the rest
    still run (exit status 1 if any failed)."""
    import sys

    try:
        load()
    except (OSError, ValueError, KeyError) as e:  # missing dir/file, not a model, wrong format
        print(f"blip2 {command}: cannot load --model {args.model}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    failed = 0
    for image in args.images:
        try:
            result = infer(image)
        except ValueError as e:
            print(f"blip2 {command}: {e}", file=sys.stderr)
            failed += 1
            continue
        emit(args, image, key, result[key])
    if failed:
        print(f"blip2 {command}: {failed} of {len(args.images)} images failed", file=sys.stderr)
    return 1 if failed else 0
