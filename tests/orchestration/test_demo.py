"""The README's first command, shrunk: every step of `blip2 demo` runs and leaves its outputs."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from pipelines.schema import CAPFILT, DOWNLOAD
from pipelines.shardio import ShardSet
from training.metrics import read_metrics


@pytest.mark.slow
def test_demo_runs_the_whole_chain(tmp_path):
    work = tmp_path / "demo"
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "orchestration.cli", "demo", "--workdir", str(work), "--images", "48",
         "--heldout", "16", "--stage1-steps", "4", "--stage2-steps", "2", "--workers", "1", "--teach-steps", "3"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
    screen = proc.stdout  # what a user sees: stdout and stderr in the order they came
    assert proc.returncode == 0, screen[-6000:]
    assert "blip2 demo finished" in screen and "chance" in screen
    # the one-screen summary is the last thing printed, and Ray's worker logs stay off the screen
    assert screen.rstrip().splitlines()[-1] == "=" * 74, screen[-3000:]
    assert "Reporting training result" not in screen and "RayTrainWorker" not in screen, screen[-3000:]

    summary = json.loads((work / "demo_summary.json").read_text())
    download, capfilt = ShardSet(str(work / "download")), ShardSet(str(work / "capfilt"))
    assert download.read_manifest()["schema"] == DOWNLOAD.tag
    assert download.read_manifest()["num_rows"] == 48 + 2 + 4  # every URL: the two broken ones, the 4 re-posts
    assert download.read_manifest()["summary"]["by_status"]["http_error"] == 2
    assert capfilt.read_manifest()["schema"] == CAPFILT.tag and capfilt.read_manifest()["num_rows"] == 48 + 4
    curated, removed = ShardSet(str(work / "curated")), ShardSet(str(work / "curated" / "_removed"))
    cur = summary["curation"]["set"]
    assert cur["rows_in"] == 52 and cur["kept"] + cur["removed"] == 52 and cur["accounted"]
    assert curated.read_manifest()["num_rows"] == cur["kept"] and removed.read_manifest()["num_rows"] == cur["removed"]
    assert cur["by_reason"]["exact_duplicate"] >= 1 and cur["by_reason"]["clip_score"] >= 1   # re-posts, low scores
    # a barely taught CLIP embeds the images almost alike, so semantic dedup may keep only a few
    assert len(summary["search"]["hits"]) == min(3, cur["kept"]) >= 1 and "curate: 52 rows in" in screen
    assert os.path.getsize(summary["search_page"]) > 1000 and os.path.getsize(summary["curated_report"]) > 1000
    metrics = summary["metrics"]
    assert metrics["images"] == 16 and metrics["chance"]["txt_r1"] == pytest.approx(100 / metrics["texts"])
    assert {"txt_r1", "img_r1"} <= set(metrics["itc"])  # ITC-only beside the re-ranked recall
    for path in [summary["report"], *summary["loss_curves"]]:
        assert os.path.getsize(path) > 1000, path
    assert (work / "train" / "stage2" / "final" / "blip2_config.json").exists()

    # `blip2 train --stage 1` (1 worker here): per-step metrics of every loss, their CSV and curve,
    # a checkpoint of the trainable weights only (the frozen tower is not saved), the final model
    run1 = work / "train" / "stage1"
    rows = read_metrics(str(run1))
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(k in rows[0] for k in ("loss_itc", "loss_itm", "loss_itg", "lr", "samples_per_s", "tokens_per_s",
                                      "data_wait_s"))
    assert all(abs(r["loss"] - (r["loss_itc"] + r["loss_itm"] + r["loss_itg"])) < 1e-4 for r in rows)
    assert (run1 / "metrics.csv").read_text().splitlines()[0].startswith("step,epoch,lr,loss")
    assert (run1 / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ckpt = sorted(run1.glob("checkpoint_0*"))[-1]
    assert ckpt.name == "checkpoint_00000004" and (ckpt / "rng_rank0.safetensors").exists()
    assert not any(k.startswith("vision.") for k in load_file(str(ckpt / "trainable.safetensors")))
    assert (run1 / "final" / "blip2_config.json").exists()
    assert "loss_itc" in screen and "final model:" in screen and "resuming" not in screen

    # taught copies of the captioner, ranker and OPT, cached for the next run
    for name in ("captioner", "ranker", "opt"):
        assert json.loads((work / "models" / "taught" / name / ".complete").read_text())["steps"] == 3
    # CapFilt ran with the paper's settings and was scored against the truth: 12 of the 48 web captions
    # describe another image (one may still name the same colours and shapes)
    truth = summary["capfilt"]
    assert truth["rows"] == 48 and 36 <= truth["web_right"] < 48 and 0 <= truth["kept_right"] <= 48
    assert capfilt.read_manifest()["config"]["capfilt"]["keep_original"] is False
    # the stage-2 model exported for transformers, captioned by it and by `blip2 caption`
    assert (work / "stage2-hf" / "config.json").exists()
    assert len(summary["captions"]) == 4 and summary["captions_named"]["of"] == 16
    for c in summary["captions"]:
        assert isinstance(c["transformers"], str) and isinstance(c["blip2_caption"], str)
        assert f"{c['image']}\t" in screen  # `blip2 caption`'s own output line
