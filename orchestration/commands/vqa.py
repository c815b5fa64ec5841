"""`blip2 vqa IMG... --question Q --model DIR`: answer a question about each image."""
from __future__ import annotations

from orchestration.commands.caption import add_generation_arguments, over_images

HELP = "answer a question about images with a stage-2 model (beam 5, length penalty -1, the paper's prompts)"


def add_arguments(parser) -> None:
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--question", required=True)
    parser.add_argument("--model", required=True, help="checkpoint dir (local or s3://) or LAVIS .pth/.safetensors")
    parser.add_argument("--prompt", default=None,
                        help='template with {} for the question (default: OPT "Question: {} Answer:", '
                             'FlanT5 "Question: {} Short answer:")')
    parser.add_argument("--length-penalty", type=float, default=-1.0)
    add_generation_arguments(parser)


def run(args, cfg) -> int:
    from orchestration import api

    gen = {"num_beams": args.num_beams or cfg.eval.num_beams, "length_penalty": args.length_penalty}
    if args.max_new_tokens:
        gen["max_new_tokens"] = args.max_new_tokens
    return over_images(args, "vqa", "pred_answer", lambda image: api.vqa(
        image, args.question, model=args.model, prompt=args.prompt, device=args.device, config=cfg.model, **gen),
        lambda: api.load_model(args.model, args.device, config=cfg.model))
