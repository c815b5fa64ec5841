"""`blip2 caption IMG... --model DIR`: one caption per image from a stage-2 model."""
from __future__ import annotations

HELP = "caption images with a stage-2 model (our checkpoint, HF Blip2ForConditionalGeneration dir or LAVIS state dict)"


def add_arguments(parser) -> None:
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--model", required=True, help="checkpoint dir (local or s3://) or LAVIS .pth/.safetensors (then the "
                                                        "model.vision_path/llm_path/qformer_init overrides name the rest)")
    parser.add_argument("--prompt", default=None, help="text the caption continues (default: eval.caption_prompt)")
    add_generation_arguments(parser)


def add_generation_arguments(parser) -> None:
    parser.add_argument("--num-beams", type=int, default=None, help="beam width (default: eval.num_beams)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: eval.max_new_tokens")
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


def run(args, cfg) -> int:
    from orchestration import api

    gen = {"num_beams": args.num_beams or cfg.eval.num_beams, "max_new_tokens": args.max_new_tokens or cfg.eval.max_new_tokens}
    prompt = cfg.eval.caption_prompt if args.prompt is None else args.prompt
    return over_images(args, "caption", "pred_caption", lambda image: api.caption(
        image, model=args.model, prompt=prompt, device=args.device, config=cfg.model, **gen),
        lambda: api.load_model(args.model, args.device, config=cfg.model))
