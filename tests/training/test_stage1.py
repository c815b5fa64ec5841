"""Blip2Stage1: the trainer-facing interface, gradients, degenerate batches, checkpoints."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.training.stage1_helpers import CAPTIONS, build_model, model_config, pixels


@pytest.fixture(scope="module")
def eva(tiny_models):
    return tiny_models["vision_eva"]


@pytest.fixture(scope="module")
def cfg(tiny_models, eva):
    return model_config(tiny_models, eva)


def test_forward_returns_the_three_losses_and_their_sum(cfg):
    model = build_model(cfg)
    out = model(pixels(4), CAPTIONS[:4], generator=torch.Generator().manual_seed(0))
    assert set(out) == {"loss", "loss_itc", "loss_itm", "loss_itg"}
    for v in out.values():
        assert v.ndim == 0 and v.dtype == torch.float32 and torch.isfinite(v)
    assert torch.allclose(out["loss"], out["loss_itc"] + out["loss_itm"] + out["loss_itg"])
    # untrained: ITC near log(B), ITG near log(V), ITM near log(2)
    assert abs(out["loss_itc"].item() - math.log(4)) < 0.5
    assert abs(out["loss_itg"].item() - math.log(len(model.tokenizer))) < 1.0
    assert abs(out["loss_itm"].item() - math.log(2)) < 0.5


def test_shapes_and_normalisation(cfg):
    model = build_model(cfg)
    image_embeds, image_feat = model.encode_image(pixels(3))
    assert image_embeds.shape == (3, 65, model.vision.width) and image_embeds.dtype == torch.float32
    assert image_feat.shape == (3, 8, 32)
    assert torch.allclose(image_feat.norm(dim=-1), torch.ones(3, 8), atol=1e-5)
    ids, mask, text_feat = model.encode_text(CAPTIONS[:3])
    assert ids.shape == mask.shape and ids.shape[0] == 3 and (ids[:, 0] == model.tokenizer.cls_token_id).all()
    assert text_feat.shape == (3, 32) and torch.allclose(text_feat.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert model.itm_logits(image_embeds, ids, mask).shape == (3, 2)
    assert model.tokenizer.bos_token == "[DEC]" and model.tokenizer.bos_token_id == len(model.tokenizer) - 1
    long = model.encode_text(["red " * 100])[0]
    assert long.shape[1] == cfg.max_text_len


def test_batch_of_one_and_duplicate_captions_are_finite(cfg):
    model = build_model(cfg)
    one = model(pixels(1), ["a red circle"])
    assert all(torch.isfinite(v) for v in one.values())
    same = model(pixels(3), ["a red circle"] * 3)  # every other caption is a duplicate: no negatives
    assert all(torch.isfinite(v) for v in same.values())
    same["loss"].backward()
    assert torch.isfinite(model.itm_head.weight.grad).all()


def test_gradients_reach_trainable_parts_and_never_the_frozen_encoder(cfg):
    model = build_model(cfg).train()
    frozen_before = {k: v.clone() for k, v in model.vision.state_dict().items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert not any(p.requires_grad for p in model.vision.parameters())
    assert model.training and not model.vision.model.training  # frozen tower stays in eval mode
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    out = model(pixels(4), CAPTIONS[:4], generator=torch.Generator().manual_seed(0))
    out["loss"].backward()
    named = dict(model.named_parameters())
    for name in ["temp", "ln_vision.weight", "ln_vision.bias", "query_tokens", "vision_proj.weight",
                 "text_proj.weight", "itm_head.weight", "itg_head.predictions.transform.dense.weight",
                 "embeddings.word_embeddings.weight", "qformer.encoder.layer.0.crossattention.attention.key.weight",
                 "qformer.encoder.layer.1.intermediate_query.dense.weight",
                 "qformer.encoder.layer.1.intermediate.dense.weight"]:
        g = named[name].grad
        assert g is not None and g.abs().sum() > 0, name
    assert all(p.grad is None for p in model.vision.parameters())
    opt.step()
    for k, v in model.vision.state_dict().items():
        assert torch.equal(v, frozen_before[k]), k


def test_save_and_load_roundtrip(cfg, tmp_path):
    from training.stage1 import Blip2Stage1

    model = build_model(cfg, seed=3)
    with torch.no_grad():
        model.temp.fill_(0.05)
    sd = model.trainable_state_dict()
    assert sd and not any(k.startswith("vision.") for k in sd)
    model.save_pretrained(str(tmp_path / "ckpt"))
    assert {"model.safetensors", "blip2_config.json"} <= {p.name for p in (tmp_path / "ckpt").iterdir()}
    loaded = Blip2Stage1.from_pretrained(str(tmp_path / "ckpt")).eval()
    for k, v in model.trainable_state_dict().items():
        assert torch.equal(v, loaded.trainable_state_dict()[k]), k
    gen = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    a = model(pixels(3), CAPTIONS[:3], generator=gen())
    b = loaded(pixels(3), CAPTIONS[:3], generator=gen())
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    # the decoder stays tied to the word embeddings after loading
    assert loaded.itg_head.predictions.decoder.weight is loaded.embeddings.word_embeddings.weight
    with pytest.raises(KeyError):
        loaded.load_trainable_state_dict({**sd, "bogus": torch.zeros(1)})


def test_save_and_load_through_s3(cfg, s3_bucket):
    """Checkpoints may live on S3 (moto on 127.0.0.1): written with fsspec, read through a local cache."""
    from training.stage1 import Blip2Stage1

    model = build_model(cfg, seed=4)
    uri = f"{s3_bucket}/stage1/ckpt"
    model.save_pretrained(uri)
    loaded = Blip2Stage1.from_pretrained(uri)
    for k, v in model.trainable_state_dict().items():
        assert torch.equal(v, loaded.trainable_state_dict()[k]), k


def test_clip_encoder_and_half_precision_frozen_tower(tiny_models, cfg):
    """CLIP ViT (no post-LN: fresh ln_vision, eps 1e-5) and a bf16 frozen tower feeding the fp32 Q-Former."""
    clip = build_model(model_config(tiny_models, vision="clip_vit_l", vision_path=str(tiny_models["vision"])))
    assert clip.ln_vision.eps == 1e-5 and torch.equal(clip.ln_vision.weight, torch.ones(clip.vision.width))
    out = clip(pixels(2), CAPTIONS[:2])
    assert all(torch.isfinite(v) for v in out.values())

    half = build_model(model_config(tiny_models, eva=cfg.vision_path, frozen_dtype="bfloat16"))
    assert half.vision.dtype == torch.bfloat16
    assert half.ln_vision.eps == 1e-5 and half.ln_vision.weight.dtype == torch.float32
    image_embeds, image_feat = half.encode_image(pixels(2))
    assert image_embeds.dtype == torch.float32 and image_feat.dtype == torch.float32
    full_embeds, _ = build_model(cfg).encode_image(pixels(2))
    assert (image_embeds - full_embeds).abs().max() < 0.1  # same tower, bf16 rounding only
    out = half(pixels(2), CAPTIONS[:2])
    assert all(torch.isfinite(v) and v.dtype == torch.float32 for v in out.values())


def blip2_like_tower(eva: Path, out: Path) -> Path:
    """The EVA tower with a trained-looking final LayerNorm, as in a BLIP-2 checkpoint."""
    from transformers import Blip2VisionModel

    model = Blip2VisionModel.from_pretrained(eva)
    with torch.no_grad():
        model.post_layernorm.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(0))
        model.post_layernorm.bias.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    model.save_pretrained(out)
    return out


def test_ln_vision_starts_fresh_unless_asked_to_copy(tiny_models, eva, tmp_path):
    """A new stage 1 starts ln_vision as LAVIS (1, 0, eps 1e-5), whatever the tower's own final
    LayerNorm holds; ``ln_vision_init=copy`` takes that one (weights and eps) to continue from it."""
    from safetensors.torch import load_file

    from training.stage1 import Blip2Stage1

    tower = blip2_like_tower(eva, tmp_path / "tower")
    trained = load_file(str(tower / "model.safetensors"))
    fresh = build_model(model_config(tiny_models, tower))
    assert fresh.cfg.ln_vision_init == "fresh" and fresh.ln_vision.eps == 1e-5
    assert torch.equal(fresh.ln_vision.weight, torch.ones(fresh.vision.width))
    assert torch.equal(fresh.ln_vision.bias, torch.zeros(fresh.vision.width))
    copy = build_model(model_config(tiny_models, tower, ln_vision_init="copy"))
    assert copy.ln_vision.eps == copy.vision.model.config.layer_norm_eps
    assert torch.equal(copy.ln_vision.weight, trained["post_layernorm.weight"])
    assert torch.equal(copy.ln_vision.bias, trained["post_layernorm.bias"])
    assert not isinstance(copy.vision.model.post_layernorm, torch.nn.LayerNorm)  # not applied twice
    # each kind reloads with the eps it trained with
    for model, name in ((fresh, "fresh"), (copy, "copy")):
        model.save_pretrained(str(tmp_path / name))
        assert Blip2Stage1.from_pretrained(str(tmp_path / name)).ln_vision.eps == model.ln_vision.eps
    with pytest.raises(ValueError, match="eva_vit_g"):
        model_config(tiny_models, vision="clip_vit_l", vision_path=str(tiny_models["vision"]),
                     ln_vision_init="copy").validate()
