"""`blip2 train --stage 1|2`: Q-Former pre-training on Ray Train (resumes a run with the same output/name)."""
from __future__ import annotations

import sys

HELP = "pre-train the Q-Former (stage 1 or 2) on Ray Train; re-running with the same output/name resumes"
DEFAULT_PRESET = "tiny"
FLAGS = {"stage": "train.stage"}


def add_arguments(parser) -> None:
    parser.add_argument("--stage", type=int, choices=(1, 2), default=None,
                        help="1: representation learning (ITC/ITM/ITG), 2: generative with a frozen LLM "
                             "(default: train.stage)")


def latest_checkpoint(run_uri: str) -> str | None:
    """The newest ``checkpoint_*`` directory of a run (what Ray Train will restore), if any."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(run_uri)
    found = sorted(p for p in fs.glob(f"{root}/checkpoint_0*") if fs.isdir(p)) if fs.exists(root) else []
    return found[-1] if found else None


def run(args, cfg) -> int:
    from orchestration.ray_session import ensure_ray
    from pipelines.schema import SchemaError
    from training.loop import run_training, run_uri
    from training.metrics import plot_loss_curve, read_metrics, summary

    if cfg.train.stage == 2 and not cfg.model.stage1_checkpoint:
        print("blip2 train: stage 2 needs model.stage1_checkpoint=<stage-1 run>/final "
              "(the Q-Former is initialised from it)", file=sys.stderr)
        return 2
    ensure_ray(cfg.ray)
    uri = run_uri(cfg.train)
    print(f"blip2 train: stage {cfg.train.stage}, {cfg.train.num_workers} worker(s), run dir {uri}")
    previous = latest_checkpoint(uri)
    if previous:
        print(f"blip2 train: resuming from {previous}")
    try:
        result = run_training(cfg.model, cfg.train, cfg.ingest, cfg.tracking, seed=cfg.seed)
    except (SchemaError, ValueError) as e:  # bad input: a clear message, no traceback
        print(f"blip2 train: {e}", file=sys.stderr)
        return 2
    if result.error is not None:
        print(f"blip2 train: failed: {result.error}", file=sys.stderr)
        return 1
    rows = read_metrics(uri)
    if rows:
        plot_loss_curve(rows, f"{uri}/loss_curve.png")
    print(summary(rows))
    print(f"checkpoint: {result.checkpoint.path if result.checkpoint else '-'}")
    finished = bool(rows) and rows[-1]["step"] >= cfg.train.steps
    print(f"final model: {uri}/final" if finished else
          f"stopped at step {rows[-1]['step'] if rows else 0} of {cfg.train.steps}: run again to resume")
    print(f"metrics: {uri}/metrics.jsonl, {uri}/metrics.csv, {uri}/loss_curve.png")
    return 0
