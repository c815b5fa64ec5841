"""`blip2 train`: presets, refusals, and stage 2 as a Ray job with the real BLIP-2 models on the tiny preset."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from orchestration.cli import main
from orchestration.config import available_presets, load_config
from orchestration.submit import submit
from tests.training.train_fixtures import write_capfilt
from training.metrics import read_metrics
from training.stage1 import Blip2Stage1


@pytest.mark.parametrize("preset", available_presets())
def test_every_preset_loads_with_valid_keys_and_types(preset):
    cfg = load_config(preset)
    t = cfg.train
    if preset.startswith("paper_stage"):
        assert t.global_batch % (t.batch_size * t.num_workers) == 0      # accumulation is whole
        assert t.steps in (250_000, 80_000) and t.warmup_steps == 2000 and t.lr == 1e-4
        assert t.min_lr == (1e-5 if t.stage == 1 else 5e-5)
        assert t.global_batch in ({1: (2320, 1680), 2: (1920, 1520)}[t.stage])
        assert t.use_gpu and t.precision in ("fp16", "bf16")


@pytest.mark.parametrize("preset", [p for p in available_presets() if p.startswith("paper_")])
def test_paper_presets_train_on_the_papers_mix_resolution_and_precision(preset):
    """The fidelity review's F1–F5 as preset values: 384-px storage, human captions at LAVIS' share,
    the frozen LLM in train mode and in its own dtype (OPT fp16, FlanT5 bf16), and LAVIS' fp16 AMP
    for the trainable parts on A100 (the H100 presets: bf16, in the differences table)."""
    cfg = load_config(preset)
    assert (cfg.download.image_size, cfg.download.resize_mode, cfg.download.resize_only_if_bigger) == \
        (384, "keep_ratio", True)
    if not preset.startswith("paper_stage"):
        return
    assert cfg.ingest.human_captions == "each" and cfg.ingest.caption_pick == "random" and not cfg.ingest.source_weights
    assert cfg.model.llm_train_mode and cfg.model.frozen_dtype == "float16" and cfg.model.frozen_weights == "linear"
    assert cfg.train.precision == ("bf16" if preset.endswith("_h100") else "fp16")
    if cfg.train.stage == 2:
        assert cfg.model.llm_dtype == {"opt": "float16", "t5": "bfloat16"}[cfg.model.llm_family]


def test_stage2_without_stage1_checkpoint_is_refused(capsys):
    assert main(["train", "--stage", "2", "--config", "tiny", "model.stage1_checkpoint="]) == 2
    assert "stage1_checkpoint" in capsys.readouterr().err


def test_bad_input_is_a_clear_error(ray_local, tmp_path, corpus, capsys):
    assert main(["train", "--config", "tiny", f"train.input={tmp_path / 'missing'}"]) == 2
    assert "no committed shards" in capsys.readouterr().err
    write_capfilt(str(tmp_path / "small"), (corpus[0], corpus[1][:6]), rows_per_shard=6)
    assert main(["train", "--config", "tiny", f"train.input={tmp_path / 'small'}", "train.batch_size=4"]) == 2
    assert "6 samples cannot fill one global batch of 8" in capsys.readouterr().err


def _tiny_overrides(tiny_models, data: Path, out: Path) -> list[str]:
    return [f"model.vision_path={tiny_models['vision']}", f"model.qformer_init={tiny_models['bert']}",
            f"model.llm_path={tiny_models['opt']}", f"train.input={data}", f"train.output={out}",
            "train.batch_size=4", "train.checkpoint_every=2", "train.warmup_steps=1", "ingest.map_batch_size=8"]


@pytest.mark.slow
def test_blip2_submit_train_stage2_from_a_stage1_model(ray_head, tiny_models, corpus, tmp_path):
    """Stage 2 from a stage-1 model (the save_pretrained layout a stage-1 run ends with) through
    `blip2 submit train --stage 2` on a real head node's job server. `blip2 train --stage 1`
    itself runs in the demo test (tests/orchestration/test_demo.py), which checks its outputs."""
    data = tmp_path / "capfilt"
    write_capfilt(str(data), corpus, rows_per_shard=16)
    common = _tiny_overrides(tiny_models, data, tmp_path / "runs")
    stage1 = tmp_path / "stage1"
    Blip2Stage1.from_config(load_config("tiny", common).model).save_pretrained(str(stage1))

    # (RAY_OVERRIDE_JOB_RUNTIME_ENV: ensure_ray's ray.init(runtime_env=WORKER_ENV) inside a job
    # repeats the job's env_vars keys, which Ray refuses unless told to merge them)
    lines: list[str] = []
    _, rc = submit(ray_head.dashboard_url, "train",
                   ["--stage", "2", "--config", "tiny", *common, "train.steps=2", "train.num_workers=1",
                    "train.name=s2", f"model.stage1_checkpoint={stage1}"],
                   python=sys.executable, echo=lines.append, poll_s=2, timeout_s=500,
                   env_vars={"RAY_OVERRIDE_JOB_RUNTIME_ENV": "1"})
    log = "\n".join(lines)
    assert rc == 0, log[-4000:]
    assert "submitted" in log and "loss_lm" in log and "final model:" in log   # the job's summary, streamed
    rows2 = read_metrics(str(tmp_path / "runs" / "s2"))
    assert [r["step"] for r in rows2] == [1, 2] and all("loss_lm" in r for r in rows2)
    assert json.loads((tmp_path / "runs" / "s2" / "checkpoint_00000002" / "state.json").read_text())["step"] == 2
    assert (tmp_path / "runs" / "s2" / "final").is_dir()
