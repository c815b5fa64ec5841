"""`blip2 eval`: retrieval (stage 1), captioning and VQA (stage 2) on COCO-format files."""
from __future__ import annotations

import dataclasses
import sys

HELP = "evaluate a model: --task retrieval (stage 1) | caption | vqa (stage 2); prints a table vs the model page"


def add_arguments(parser) -> None:
    parser.add_argument("--task", required=True, choices=("retrieval", "caption", "vqa"))
    parser.add_argument("--model", required=True, help="model directory (save_pretrained layout; local or s3://)")
    parser.add_argument("--annotations", required=True,
                        help="retrieval/caption: Karpathy list or COCO captions JSON; vqa: VQAv2 annotations "
                             "(with --questions) or a LAVIS-style list with questions and answers")
    parser.add_argument("--questions", help="vqa: the VQAv2 questions JSON")
    parser.add_argument("--images", required=True, help="image folder the annotation paths are relative to")
    parser.add_argument("--out", help="results JSON (local or s3://); default: print only")


def _load_model(task: str, path: str, device: str):
    if task == "retrieval":
        from training.stage1 import Blip2Stage1 as Model
    else:
        from training.stage2 import Blip2Stage2 as Model
    from training.evaluate.data import load_overrides

    return Model.from_pretrained(path, **load_overrides(device)).to(device).eval()


def run(args, cfg) -> int:
    from training.evaluate import data
    from training.evaluate.results import results_table, write_results
    from training.evaluate.retrieval import resolve_device

    ecfg = cfg.eval
    folder = data.ImageFolder(args.images)
    try:
        if args.task == "vqa":
            items = (data.load_vqa(args.questions, args.annotations, ecfg.vqa_image_name) if args.questions
                     else data.load_vqa(args.annotations, None, ecfg.vqa_image_name))
        else:
            items = data.load_caption_annotations(args.annotations)
    except (OSError, ValueError, KeyError) as e:
        print(f"blip2 eval: cannot read the annotations: {e}", file=sys.stderr)
        return 2
    if ecfg.limit:
        items = items[: ecfg.limit]
    if not items:
        print("blip2 eval: the annotations hold nothing to evaluate", file=sys.stderr)
        return 2
    device = resolve_device(ecfg.device)
    try:
        model = _load_model(args.task, args.model, device)
    except (OSError, ValueError, KeyError) as e:
        print(f"blip2 eval: cannot load the {args.task} model from {args.model}: {e}", file=sys.stderr)
        return 2
    print(f"blip2 eval: {args.task} on {len(items)} {'questions' if args.task == 'vqa' else 'images'} "
          f"with {args.model} ({device})", flush=True)
    try:
        metrics = _evaluate(args, cfg, model, items, folder)
    except (FileNotFoundError, ValueError) as e:  # a missing or undecodable image, an empty set
        print(f"blip2 eval: {e}", file=sys.stderr)
        return 1
    print(results_table(args.task, metrics))
    if args.out:
        write_results(args.out, args.task, metrics,
                      {"model": args.model, "annotations": args.annotations, "questions": args.questions,
                       "images": args.images, "eval_config": dataclasses.asdict(ecfg)})
        print(f"results          {args.out}")
    return 0


def _evaluate(args, cfg, model, items, folder) -> dict:
    ecfg = cfg.eval
    if args.task == "retrieval":
        from training.evaluate.retrieval import evaluate_retrieval

        use_ray = ecfg.runner == "ray" or (ecfg.runner == "auto" and len(items) >= ecfg.ray_min_images)
        if use_ray:
            from orchestration.ray_session import ensure_ray

            ensure_ray(cfg.ray)
        return evaluate_retrieval(model, items, folder, ecfg, model_dir=args.model, use_ray=use_ray)
    if args.task == "caption":
        from training.evaluate.captioning import evaluate_captioning

        return evaluate_captioning(model, items, folder, ecfg)
    from training.evaluate.vqa import evaluate_vqa

    return evaluate_vqa(model, items, folder, ecfg)
