"""`blip2 eval`: one paper table row per ``--benchmark`` (VQAv2, OK-VQA, GQA, NoCaps, COCO captions,
Flickr30K and COCO retrieval), or a plain ``--task`` (retrieval | caption | vqa) on COCO-format files."""
from __future__ import annotations

import dataclasses
import json
import sys

from training.evaluate.benchmarks import BENCHMARKS, TASK_DEFAULTS

HELP = ("evaluate a model: --benchmark (one paper table row, printed beside the paper's figure) or "
        "--task retrieval (stage 1) | caption | vqa (stage 2, vs the model page)")


def add_arguments(parser) -> None:
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--benchmark", choices=sorted(BENCHMARKS),
                       help="; ".join(f"{k}: {b.inputs}" for k, b in BENCHMARKS.items()))
    which.add_argument("--task", choices=sorted(TASK_DEFAULTS))
    parser.add_argument("--model", required=True,
                        help="model directory: ours (save_pretrained layout) or transformers' Blip2ForConditionalGeneration"
                             " / Blip2ForImageTextRetrieval; local or s3://")
    parser.add_argument("--annotations",
                        help="retrieval/caption: LAVIS list, COCO/NoCaps captions JSON or Karpathy dataset_*.json "
                             "(eval.split); vqa: the annotations (with --questions) or a LAVIS list")
    parser.add_argument("--questions", help="vqa: the VQAv2 / OK-VQA questions JSON; gqa: the balanced questions JSON")
    parser.add_argument("--images", required=True, help="image folder the annotation paths are relative to")
    parser.add_argument("--out", help="results JSON (local or s3://); default: print only")
    parser.add_argument("--answers-out",
                        help="vqa/gqa: the answers in the benchmark's official results format (VQA evaluation "
                             "server, GQA eval.py); needed for VQAv2 test-dev, which has no answers to score")


def _load_model(task: str, path: str, device: str):
    if task == "retrieval":
        from training.stage1 import Blip2Stage1 as Model
    else:
        from training.stage2 import Blip2Stage2 as Model
    from training.evaluate.data import load_overrides

    return Model.from_pretrained(path, **load_overrides(device)).to(device).eval()


def _read(bench, args, ecfg):
    """The benchmark's items from its files; (items, scored: whether they carry answers)."""
    from training.evaluate import data

    if bench.reader == "gqa":
        source = args.questions or args.annotations
        if not source:
            raise ValueError("gqa needs --questions testdev_balanced_questions.json")
        items = data.load_gqa(source)
    elif bench.reader == "vqa":
        if args.questions:
            items = data.load_vqa(args.questions, args.annotations, ecfg.vqa_image_name)
        elif args.annotations:
            items = data.load_vqa(args.annotations, None, ecfg.vqa_image_name)
        else:
            raise ValueError("vqa needs --questions (and --annotations), or a LAVIS list as --annotations")
    else:
        if not args.annotations:
            raise ValueError(f"{args.benchmark or args.task} needs --annotations")
        items = data.load_caption_annotations(args.annotations, ecfg.split)
        if bench.metric == "nocaps" and not all(i.domain for i in items):
            raise ValueError(f"{args.annotations}: nocaps needs a domain per image (nocaps_val_4500_captions.json)")
    return items


def run(args, cfg) -> int:
    from training.evaluate import data
    from training.evaluate.results import paper_model, results_table, write_results
    from training.evaluate.retrieval import resolve_device

    ecfg = cfg.eval
    bench = BENCHMARKS[args.benchmark] if args.benchmark else TASK_DEFAULTS[args.task]
    task = bench.task
    folder = data.ImageFolder(args.images)
    try:
        items = _read(bench, args, ecfg)
    except (OSError, ValueError, KeyError) as e:
        print(f"blip2 eval: cannot read the annotations: {e}", file=sys.stderr)
        return 2
    if ecfg.limit:
        items = items[: ecfg.limit]
    if not items:
        print("blip2 eval: the annotations hold nothing to evaluate", file=sys.stderr)
        return 2
    unscored = task == "vqa" and not any(q.answers for q in items)  # VQAv2 test-dev: answers for the server
    if unscored and not args.answers_out:
        print("blip2 eval: these questions carry no answers to score (test-dev): give --answers-out to write "
              "the file the evaluation server scores", file=sys.stderr)
        return 2
    device = resolve_device(ecfg.device)
    try:
        model = _load_model(task, args.model, device)
    except (OSError, ValueError, KeyError) as e:
        print(f"blip2 eval: cannot load the {task} model from {args.model}: {e}", file=sys.stderr)
        return 2
    name = args.benchmark or args.task
    print(f"blip2 eval: {name} on {len(items)} {'questions' if task == 'vqa' else 'images'} "
          f"with {args.model} ({device})", flush=True)
    benchmark = args.benchmark
    if benchmark == "vqav2" and unscored:
        benchmark = "vqav2_test-dev"
    row = paper_model(model, ecfg.paper_model) if benchmark else None
    try:
        metrics = _evaluate(args, cfg, bench, model, items, folder, unscored)
    except (FileNotFoundError, ValueError) as e:  # a missing or undecodable image, an empty set
        print(f"blip2 eval: {e}", file=sys.stderr)
        return 1
    if args.answers_out and task == "vqa":
        from training.evaluate.vqa import official_results

        answers = {p["question_id"]: p["answer"] for p in metrics["predictions"]}
        _write_json(args.answers_out, official_results(answers, bench.metric))
        print(f"answers          {args.answers_out} ({len(answers)}, official results format)")
    if unscored:
        print(f"scored by the evaluation server; {results_table(task, {}, benchmark, row, bench.metric)}")
    else:
        print(results_table(task, metrics, benchmark, row, bench.metric))
    if args.out:
        write_results(args.out, task, metrics,
                      {"model": args.model, "annotations": args.annotations, "questions": args.questions,
                       "images": args.images, "eval_config": dataclasses.asdict(ecfg)}, benchmark, row)
        print(f"results          {args.out}")
    return 0


def _write_json(uri: str, payload) -> None:
    import fsspec

    with fsspec.open(uri, "w") as f:
        json.dump(payload, f)


def _evaluate(args, cfg, bench, model, items, folder, unscored: bool) -> dict:
    ecfg = cfg.eval
    if bench.task == "retrieval":
        from training.evaluate.retrieval import evaluate_retrieval

        use_ray = ecfg.runner == "ray" or (ecfg.runner == "auto" and len(items) >= ecfg.ray_min_images)
        if use_ray:
            from orchestration.ray_session import ensure_ray

            ensure_ray(cfg.ray)
        return evaluate_retrieval(model, items, folder, ecfg, model_dir=args.model, use_ray=use_ray)
    if bench.task == "caption":
        from training.evaluate.captioning import evaluate_captioning

        return evaluate_captioning(model, items, folder, ecfg)
    from training.evaluate.vqa import answer_questions, evaluate_vqa, vqa_prompt

    if unscored:
        answers = answer_questions(model, items, folder, ecfg)
        return {"questions": len(items), "prompt": vqa_prompt(model, ecfg), "num_beams": ecfg.vqa_num_beams,
                "length_penalty": ecfg.vqa_length_penalty,
                "predictions": [{"question_id": k, "answer": v} for k, v in answers.items()]}
    return evaluate_vqa(model, items, folder, ecfg, metric=bench.metric)
