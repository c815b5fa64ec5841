"""`blip2 export-hf`: stage-2 model dirs and Ray Train checkpoints → plain transformers directories."""
from __future__ import annotations


import pytest
import torch
from PIL import Image
from safetensors import safe_open

from orchestration.cli import main
from training.config import ModelConfig
from tests.training.train_fixtures import write_trainer_checkpoint
from training.stage2 import Blip2Stage2


@pytest.fixture(scope="module")
def eva(tiny_models):
    return tiny_models["vision_eva"]


def cfg_for(tiny_models, eva) -> ModelConfig:
    return ModelConfig(vision="eva_vit_g", vision_path=str(eva), frozen_dtype="float32",
                       image_size=64, qformer_init=str(tiny_models["bert"]), num_query_tokens=8,
                       llm_family="opt", llm_path=str(tiny_models["opt"]))


def test_export_training_checkpoint_to_hf(tiny_models, eva, tmp_path, capsys):
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    torch.manual_seed(2)
    model = Blip2Stage2.from_config(cfg_for(tiny_models, eva)).eval()
    ckpt = write_trainer_checkpoint(tmp_path / "checkpoint_00000010", model, step=10, stage=2)
    assert main(["export-hf", str(ckpt), str(tmp_path / "hf")]) == 0
    assert "model.safetensors" in capsys.readouterr().out
    hf = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    processor = Blip2Processor.from_pretrained(tmp_path / "hf")
    images = [Image.new("RGB", (64, 64), c) for c in ((250, 130, 10), (30, 170, 60))]
    inputs = processor(images=images, text=["a photo of"] * 2, return_tensors="pt")
    gen = dict(max_new_tokens=6, min_new_tokens=6, num_beams=1, do_sample=False)
    theirs = hf.generate(**inputs, **gen)[:, inputs["input_ids"].shape[1]:]
    assert torch.equal(model.generate_ids(inputs["pixel_values"], "a photo of", **gen), theirs)
    assert torch.equal(hf.query_tokens, model.query_tokens.detach())


def test_export_our_dir_with_dtype_override_and_refusals(tiny_models, eva, tmp_path, capsys):
    from transformers import Blip2ForConditionalGeneration

    Blip2Stage2.from_config(cfg_for(tiny_models, eva)).save_pretrained(tmp_path / "ours")
    assert main(["export-hf", str(tmp_path / "ours"), str(tmp_path / "hf16"), "model.llm_dtype=float16"]) == 0
    with safe_open(str(tmp_path / "hf16" / "model.safetensors"), "pt") as f:
        assert f.get_slice("language_model.model.decoder.embed_tokens.weight").get_dtype() == "F16"
        assert f.get_slice("qformer.layernorm.weight").get_dtype() == "F32"  # the Q-Former stays fp32, as in HF
    Blip2ForConditionalGeneration.from_pretrained(tmp_path / "hf16")  # loads cleanly
    capsys.readouterr()
    assert main(["export-hf", str(tmp_path / "nothing-here"), str(tmp_path / "x")]) == 1
    assert "neither a training checkpoint nor a stage-2 model directory" in capsys.readouterr().err


@pytest.mark.parametrize("stage", [1])
def test_export_stage1_goes_to_retrieval_model(tiny_models, eva, tmp_path, stage):
    pytest.importorskip("training.hf_io")
    from transformers import Blip2ForImageTextRetrieval

    from training.stage1 import Blip2Stage1

    Blip2Stage1.from_config(cfg_for(tiny_models, eva)).save_pretrained(str(tmp_path / "s1"))
    assert main(["export-hf", str(tmp_path / "s1"), str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "blip2_extra.safetensors").exists()
    Blip2ForImageTextRetrieval.from_pretrained(tmp_path / "hf")
