"""Stage 2 from a stage-1 checkpoint and from LAVIS state dicts; the side file keeps stage-1 extras."""
from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from safetensors.torch import load_file

from training.config import ModelConfig
from tests.training.train_fixtures import write_trainer_checkpoint
from training.stage2 import Blip2Stage2

TEXTS = ["a red circle", "a blue square above a green triangle"]


@pytest.fixture(scope="module")
def eva(tiny_models):
    return tiny_models["vision_eva"]


def eva_cfg(tiny_models, eva, **kw) -> ModelConfig:
    return ModelConfig(vision="eva_vit_g", vision_path=str(eva), frozen_dtype="float32",
                       image_size=64, qformer_init=str(tiny_models["bert"]), num_query_tokens=8, **kw)


@pytest.fixture(scope="module")
def stage1_dir(tiny_models, eva, tmp_path_factory):
    from training.stage1 import Blip2Stage1

    torch.manual_seed(3)
    model = Blip2Stage1.from_config(eva_cfg(tiny_models, eva))
    with torch.no_grad():  # make every weight distinguishable from a fresh init
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.01)
    out = tmp_path_factory.mktemp("stage1")
    model.save_pretrained(str(out))
    return out, model.eval()


def test_stage1_checkpoint_into_stage2_and_out_to_hf(tiny_models, eva, stage1_dir, tmp_path):
    from transformers import Blip2ForConditionalGeneration

    path, stage1 = stage1_dir
    cfg = dataclasses.replace(eva_cfg(tiny_models, eva), stage1_checkpoint=str(path), llm_family="opt",
                              llm_path=str(tiny_models["opt"]))
    model = Blip2Stage2.from_config(cfg).eval()
    saved = load_file(str(path / "model.safetensors"))
    for key in ("query_tokens", "ln_vision.weight", "qformer.layernorm.weight",
                "qformer.encoder.layer.0.crossattention.attention.key.weight",
                "qformer.encoder.layer.3.output_query.dense.weight"):
        assert torch.equal(model.state_dict()[key], saved[key]), key
    assert model.cfg.ln_vision_init == stage1.cfg.ln_vision_init == "fresh"
    assert model.ln_vision.eps == stage1.ln_vision.eps == 1e-5  # stage 1's trained ln_vision, with its eps
    # the query path gives stage 1's query outputs (ln_vision eps: stage 1 1e-5, HF EVA 1e-6)
    px = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        feats = model.ln_vision(model.vision(px))
        ours = model.qformer(query_embeds=model.query_tokens.expand(2, -1, -1), encoder_hidden_states=feats,
                             encoder_attention_mask=torch.ones(feats.shape[:2], dtype=torch.long)).last_hidden_state
        from training.qformer import run_qformer

        theirs = run_qformer(stage1.qformer, stage1.query_tokens.expand(2, -1, -1), stage1.num_queries, None,
                             stage1.ln_vision(stage1.vision(px)))
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    # text-only stage-1 parts are kept, not lost
    expected_extra = {k for k in saved if k.startswith(("embeddings.", "itm_head.", "itg_head.", "vision_proj.",
                                                        "text_proj.")) or k == "temp"
                      or re.match(r"qformer\.encoder\.layer\.\d+\.(intermediate|output)\.", k)}
    assert expected_extra and set(model.extra) == expected_extra
    model.save_pretrained(tmp_path / "hf")
    extra = load_file(str(tmp_path / "hf" / "blip2_extra.safetensors"))
    assert set(extra) == expected_extra and torch.equal(extra["temp"], saved["temp"])
    hf = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "hf")
    assert torch.equal(hf.qformer.encoder.layer[0].crossattention.attention.key.weight,
                       saved["qformer.encoder.layer.0.crossattention.attention.key.weight"])
    assert torch.equal(hf.vision_model.post_layernorm.weight, saved["ln_vision.weight"])
    reloaded = Blip2Stage2.from_pretrained(tmp_path / "hf")
    assert set(reloaded.extra) == expected_extra and reloaded.ln_vision.eps == 1e-5
    assert torch.equal(reloaded.ln_vision.weight, saved["ln_vision.weight"])


def to_lavis(model: Blip2Stage2, family: str) -> dict[str, torch.Tensor]:
    """What LAVIS' Blip2OPT/Blip2T5 would save (trainable weights only), written from LAVIS' names."""
    out = {}
    for key, value in model.trainable_state_dict().items():
        if key == "qformer.layernorm.weight" or key == "qformer.layernorm.bias":
            key = "Qformer.bert.embeddings.LayerNorm." + key.rsplit(".", 1)[1]
        elif key.startswith("qformer."):
            key = "Qformer.bert." + key[len("qformer."):]
            key = key.replace(".attention.attention.", ".attention.self.").replace(
                ".crossattention.attention.", ".crossattention.self.")
        elif key.startswith("language_projection."):
            key = f"{family}_proj." + key[len("language_projection."):]
        out[key] = value.clone()
    return out


@pytest.mark.parametrize("family", ["opt", "t5"])
def test_lavis_stage2_state_dict(tiny_models, eva, tmp_path, family):
    cfg = dataclasses.replace(eva_cfg(tiny_models, eva), llm_family=family, llm_path=str(tiny_models[family]))
    torch.manual_seed(7)
    source = Blip2Stage2.from_config(cfg).eval()
    lavis = to_lavis(source, family)
    assert "Qformer.bert.encoder.layer.0.crossattention.self.query.weight" in lavis and f"{family}_proj.weight" in lavis
    lavis["Qformer.bert.encoder.layer.0.intermediate.dense.weight"] = torch.zeros(128, 64)  # stage-1 text FFN
    torch.save({"model": lavis}, tmp_path / "lavis.pth")
    torch.manual_seed(8)  # a different fresh init underneath
    loaded = Blip2Stage2.from_lavis(tmp_path / "lavis.pth", cfg).eval()
    px = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded.lm_outputs(px, TEXTS, [1, 2])["logits"],
                                   source.lm_outputs(px, TEXTS, [1, 2])["logits"], atol=0, rtol=0)
    assert set(loaded.extra) == {"qformer.encoder.layer.0.intermediate.dense.weight"}


def test_lavis_eva_keys_fuse_qkv_bias():
    from training.hf_export_stage2 import lavis_to_ours

    q, v = torch.arange(4.0), torch.arange(4.0) + 10
    out = lavis_to_ours({"visual_encoder.blocks.2.attn.q_bias": q, "visual_encoder.blocks.2.attn.v_bias": v,
                         "visual_encoder.blocks.2.attn.proj.weight": torch.ones(1),
                         "visual_encoder.blocks.2.norm1.bias": torch.ones(1),
                         "visual_encoder.cls_token": torch.ones(1), "t5_proj.bias": torch.ones(1),
                         "opt_model.lm_head.weight": torch.ones(1)})
    assert torch.equal(out["vision.model.encoder.layers.2.self_attn.qkv.bias"], torch.cat([q, torch.zeros(4), v]))
    assert set(out) == {"vision.model.encoder.layers.2.self_attn.qkv.bias",
                        "vision.model.encoder.layers.2.self_attn.projection.weight",
                        "vision.model.encoder.layers.2.layer_norm1.bias",
                        "vision.model.embeddings.class_embedding", "language_projection.bias",
                        "language_model.lm_head.weight"}


def test_stage1_ray_train_checkpoint_as_starting_point(tiny_models, eva, stage1_dir, tmp_path):
    """``model.stage1_checkpoint`` may also name a stage-1 checkpoint_* folder of a Ray Train run."""
    _, stage1 = stage1_dir
    ckpt = write_trainer_checkpoint(tmp_path / "checkpoint_00000100", stage1, step=100, stage=1)
    cfg = dataclasses.replace(eva_cfg(tiny_models, eva), qformer_init="", stage1_checkpoint=str(ckpt),
                              llm_family="t5", llm_path=str(tiny_models["t5"]))
    model = Blip2Stage2.from_config(cfg)
    for key in ("query_tokens", "qformer.encoder.layer.2.crossattention.attention.value.weight"):
        assert torch.equal(model.state_dict()[key], stage1.state_dict()[key]), key
    assert "itm_head.weight" in model.extra and "temp" in model.extra
