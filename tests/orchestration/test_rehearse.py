"""`blip2 rehearse`: the tiny preset through each job's own code (fast), and a paper preset's real
sizes on the meta device (no memory). The real-size CPU rehearsals are a benchmark (README)."""
from __future__ import annotations

import json

import pytest

from orchestration.cli import main


@pytest.mark.parametrize("job", ["stage1", "stage2", "capfilt"])
def test_rehearse_the_tiny_preset(job, tiny_models, tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = main(["rehearse", "--config", "tiny", "--device", "cpu", "--job", job, "--json", str(out),
               "--workdir", str(tmp_path / "work"), f"model.vision_path={tiny_models['vision']}",
               f"model.qformer_init={tiny_models['bert']}", f"model.llm_path={tiny_models['opt']}",
               "model.stage1_checkpoint=", f"capfilt.captioner={tiny_models['captioner']}",
               f"capfilt.ranker={tiny_models['ranker']}"])
    text = capsys.readouterr().out
    assert rc == 0, text
    result = json.loads(out.read_text())
    row, proj = result["row"], result["projection"]
    assert row["flops_per_sample"] > 0 and row["samples_per_s"] > 0 and row["frozen_params"] > 0
    assert "GFLOP per sample (counted" in text and "< 6 days stage 1" in text
    assert not (tmp_path / "work" / "models").exists()  # every model was found: no random stand-in built
    if job == "capfilt":
        assert row["trainable_params"] == 0 and "projected_s" not in proj
    else:
        assert row["finite"] and row["trainable_params"] > 0 and row["activation_bytes_per_sample"] > 0
        assert proj["peak_mem_bytes_computed"] > row["weight_bytes"] and proj["projected_s"] > 0
        assert "an assumption, not a measurement" in text


def test_rehearse_a_paper_preset_on_the_meta_device(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["rehearse", "--config", "paper_stage2_flant5xxl", "--device", "meta", "--json", str(out)]) == 0
    row = json.loads(out.read_text())["row"]
    # the paper's Table 1: 108M trainable, 12.1B in all for ViT-g + FlanT5-XXL
    assert 107e6 < row["trainable_params"] < 109e6 and 11.9e9 < row["frozen_params"] < 12.1e9
    assert "meta device" in capsys.readouterr().out
