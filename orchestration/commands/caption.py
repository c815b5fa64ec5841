"""`blip2 caption IMG... --model DIR`: one caption per image from a stage-2 model."""
from __future__ import annotations

from orchestration.commands.inference import add_generation_arguments, over_images

HELP = "caption images with a stage-2 model (our checkpoint, HF Blip2ForConditionalGeneration dir or LAVIS state dict)"
FLAGS = {"prompt": "eval.caption_prompt", "num_beams": "eval.num_beams", "max_new_tokens": "eval.max_new_tokens"}


def add_arguments(parser) -> None:
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--model", required=True, help="checkpoint dir (local or s3://) or LAVIS .pth/.safetensors (then the "
                                                        "model.vision_path/llm_path/qformer_init overrides name the rest)")
    parser.add_argument("--prompt", default=None, help="text the caption continues; sets eval.caption_prompt")
    add_generation_arguments(parser)


def run(args, cfg) -> int:
    from orchestration import api

    return over_images(args, "caption", "pred_caption", lambda image: api.caption(
        image, model=args.model, device=args.device, config=cfg.model, settings=cfg.eval),
        lambda: api.load_model(args.model, args.device, config=cfg.model))
