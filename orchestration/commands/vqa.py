"""`blip2 vqa IMG... --question Q --model DIR`: answer a question about each image."""
from __future__ import annotations

from orchestration.commands.inference import add_generation_arguments, over_images

HELP = "answer a question about images with a stage-2 model (beam 5, length penalty -1, the paper's prompts)"
FLAGS = {"prompt": "eval.vqa_prompt", "length_penalty": "eval.vqa_length_penalty", "num_beams": "eval.vqa_num_beams",
         "max_new_tokens": "eval.vqa_max_new_tokens"}


def add_arguments(parser) -> None:
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--question", required=True)
    parser.add_argument("--model", required=True, help="checkpoint dir (local or s3://) or LAVIS .pth/.safetensors")
    parser.add_argument("--prompt", default=None,
                        help='template with {} for the question; sets eval.vqa_prompt (default: OPT '
                             '"Question: {} Answer:", FlanT5 "Question: {} Short answer:")')
    parser.add_argument("--length-penalty", type=float, default=None, help="sets eval.vqa_length_penalty (-1)")
    add_generation_arguments(parser)


def run(args, cfg) -> int:
    from orchestration import api

    return over_images(args, "vqa", "pred_answer", lambda image: api.vqa(
        image, args.question, model=args.model, device=args.device, config=cfg.model, settings=cfg.eval),
        lambda: api.load_model(args.model, args.device, config=cfg.model))
