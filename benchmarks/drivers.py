"""The download, CapFilt and curate drivers at N and 10N shards, side by side (CPU, local Ray).

For each N in --sizes: a URL list of N rows (one row per shard: ``download.rows_per_shard=1``),
each URL on 127.0.0.1 that the address guard refuses (``blocked``: a counted outcome, no packet
sent), so every shard is real but tiny. Then for each stage, in order (download -> capfilt, tiny
random models -> curate): --precommit of the shards (default 95 %) are committed first by the
stage's own per-shard writer called in this process (download: the plan by ``run_download``'s
planner, then ``commit_failed``; capfilt: ``write_output_shard``; curate: ``ScoreStage.score_shard``
+ ``write_curated_shard``), so the 2 cores need not run 12k tasks per stage; then, each run a fresh
driver process running the real ``run_*``:

    kill     the stage, killed with SIGKILL once half of the shards left are committed
    resume   the stage again: skips the committed shards, runs the rest, writes the manifest
    again    the stage on the complete set: listing, resume-skip of every shard, manifest (the
             whole driver path, no task work)

and reports each driver's start-up (from the ``run_*`` call to its "N shards, M already done,
K to run" line, i.e. input checks, plan and listing, before the first task), wall time and peak
RSS (VmHWM, Ray's own processes not included), and the 10N / N ratios. The shards hold no images (every row is blocked), so CapFilt and curate run
their drivers, Ray Data plans and writer tasks over empty shards, not the models.

    .venv/bin/python benchmarks/drivers.py --sizes 1200 12000 --cpus 2
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STAGES = ("download", "capfilt", "curate")


def vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def child(stage: str, work: Path, cpus: int) -> None:
    """One driver run (a fresh process): prints {"seconds", "peak_mb", "summary"} as JSON."""
    import ray

    from orchestration.config import RayConfig
    from orchestration.ray_session import ensure_ray

    ensure_ray(RayConfig(num_cpus=cpus, log_to_driver=False))
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    marks = []

    def quiet(message: str) -> None:   # the drivers' "N shards, M already done, K to run" line ends start-up
        if not marks and (" to run" in message or " to write" in message):
            marks.append(time.time())

    started = time.time()
    if stage == "download":
        from pipelines.config import DownloadConfig
        from pipelines.download import run_download

        s = run_download(DownloadConfig(input=str(work / "urls.parquet"), output=str(work / "download"),
                                        rows_per_shard=1), progress=False, log=quiet)
        summary = {"complete": s["complete"], "shards": s["shards"], "rows": s["output_rows"]}
    elif stage == "capfilt":
        from capfilt.config import CapFiltConfig
        from capfilt.job import run_capfilt

        s = run_capfilt(CapFiltConfig(input=str(work / "download"), output=str(work / "capfilt"),
                                      captioner=str(work / "models" / "captioner"), ranker=str(work / "models" / "ranker"),
                                      colocate_ranker=True, caption_num_cpus=0.5), seed=0, log=quiet)
        summary = {"shards": s["shards"], "skipped": s["shards_skipped"], "images_in": s["set"]["images_in"]}
    else:
        from capfilt.curate import run_curate
        from capfilt.curate_config import CurateConfig

        s = run_curate(CurateConfig(input=str(work / "capfilt"), output=str(work / "curated")), seed=0, log=quiet)
        summary = {"shards": s["shards"], "skipped": s["shards_skipped"], "accounted": s["set"]["accounted"]}
    seconds = time.time() - started
    print(json.dumps({"seconds": seconds, "startup": (marks or [time.time()])[0] - started, "peak_mb": vm_hwm_mb(),
                      "summary": summary}), flush=True)
    ray.shutdown()


def committed(folder: Path) -> int:
    commits = folder / "_commits"
    return len(os.listdir(commits)) if commits.exists() else 0


def spawn(stage: str, work: Path, cpus: int, kill_at: int | None = None) -> dict:
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    cmd = [sys.executable, __file__, "--child", stage, "--workdir", str(work), "--cpus", str(cpus)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True,
                         start_new_session=True)
    out = {"stage": stage, "folder": {"download": "download", "capfilt": "capfilt", "curate": "curated"}[stage]}
    if kill_at is not None:
        while p.poll() is None and committed(work / out["folder"]) < kill_at:
            time.sleep(0.2)
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)   # the driver and the Ray it started, as a dead node would
            p.wait()
            out["killed_at"] = committed(work / out["folder"])
            return out
    text = p.communicate()[0]
    if p.returncode:
        raise SystemExit(f"{stage} failed (rc {p.returncode}): {text[-2000:]}")
    return {**out, **json.loads(text.strip().splitlines()[-1])}


def precommit(stage: str, work: Path, n: int, share: float) -> None:
    """Commit the first ``share`` of the stage's shards with its own per-shard writer (in-process)."""
    count = int(n * share)
    if stage == "download":
        from pipelines.config import DownloadConfig
        from pipelines.download import commit_failed, run_download
        from pipelines.download_plan import load_plan, read_plan
        from pipelines.shardio import ShardSet

        cfg = DownloadConfig(input=str(work / "urls.parquet"), output=str(work / "download"), rows_per_shard=1)
        run_download(cfg, progress=False, plan_only=True, log=lambda m: None)
        shards = ShardSet(cfg.output)
        plan = load_plan(read_plan(shards), cfg.output)
        keys, parts = plan.keys(), list(plan.partitions())[:count]
        for start in range(0, len(parts), 256):
            wave = parts[start:start + 256]
            marks = plan.marks(wave)
            for p in wave:
                commit_failed(shards, p, plan.units[p.unit], marks[p.index], keys, "precommitted by the benchmark")
    elif stage == "capfilt":
        from capfilt.config import CapFiltConfig
        from capfilt.job import write_output_shard
        from pipelines.adapters import open_download_source

        cfg = CapFiltConfig(input=str(work / "download"), output=str(work / "capfilt"))
        src = open_download_source(cfg.input)
        for i in range(count):
            write_output_shard(src, cfg.output, i, None, cfg)
    else:
        from capfilt.curate import NoMarks, Plan, ScoreStage, write_curated_shard
        from capfilt.curate_config import CurateConfig
        from pipelines.curation import SCORES_DIR

        cfg = CurateConfig(input=str(work / "capfilt"), output=str(work / "curated"))
        scorer = ScoreStage(cfg, cfg.input, cfg.output)
        plan = Plan(cfg, None, f"{cfg.output}/{SCORES_DIR}")
        for i in range(count):
            scorer.score_shard(i)
            write_curated_shard(plan, cfg.input, cfg.output, i, NoMarks(), None)


def prepare(work: Path, n: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from orchestration.tiny_models import build_tiny_models

    work.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"url": [f"http://127.0.0.1:9/{i}.jpg" for i in range(n)],
                             "caption": [f"caption {i}" for i in range(n)]}), work / "urls.parquet")
    build_tiny_models(work / "models", only=["captioner", "ranker"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1200, 12000])
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--precommit", type=float, default=0.95, help="share of shards committed before the runs")
    ap.add_argument("--child", choices=STAGES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, Path(args.workdir), args.cpus)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench-drivers-"))
    print(f"machine: {os.cpu_count()} cores; load before: {os.getloadavg()[0]:.2f} (1-min average)", flush=True)
    results = {}
    for n in args.sizes:
        work = root / f"n{n}"
        prepare(work, n)
        for stage in args.stages:
            t = time.time()
            precommit(stage, work, n, args.precommit)
            print(f"  {n} shards, {stage}: {args.precommit:.0%} precommitted in {time.time() - t:.0f} s", flush=True)
            left = n - int(n * args.precommit)
            runs = {"kill": spawn(stage, work, args.cpus, kill_at=n - left + left // 2)}
            runs["resume"] = spawn(stage, work, args.cpus)
            runs["again"] = spawn(stage, work, args.cpus)
            results[(stage, n)] = runs
            print(f"  {n} shards, {stage}: " + "; ".join(f"{k} {json.dumps(v)}" for k, v in runs.items()), flush=True)
    lo, hi = min(args.sizes), max(args.sizes)
    print(f"\ndrivers at {lo} and {hi} shards (1 row each): start-up s, wall s, driver peak RSS MB; "
          f"x = {hi} / {lo}")
    print(f"{'stage':>9} {'shards':>6} {'killed at':>9} {'resume up':>9} {'resume s':>8} {'resume MB':>9} "
          f"{'again up':>8} {'again s':>7} {'again MB':>8} {'x up':>6} {'x MB':>6}")
    for stage in args.stages:
        for n in args.sizes:
            r, base = results[(stage, n)], results[(stage, lo)]
            up = lambda x: x.get("startup", x["seconds"])  # noqa: E731
            print(f"{stage:>9} {n:>6} {r['kill'].get('killed_at', 'done')!s:>9} {up(r['resume']):>9.2f} "
                  f"{r['resume']['seconds']:>8.1f} {r['resume']['peak_mb']:>9.0f} {up(r['again']):>8.2f} "
                  f"{r['again']['seconds']:>7.2f} {r['again']['peak_mb']:>8.0f} "
                  f"{up(r['resume']) / up(base['resume']):>6.2f} {r['resume']['peak_mb'] / base['resume']['peak_mb']:>6.2f}")
    print(f"load after: {os.getloadavg()[0]:.2f} (1-min average)")


if __name__ == "__main__":
    main()
