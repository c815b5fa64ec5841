"""Export to transformers' Blip2ForImageTextRetrieval and import of LAVIS-layout state dicts."""
from __future__ import annotations

import pytest
import torch

from tests.training.stage1_helpers import CAPTIONS, build_model, model_config, pixels
from orchestration.tiny_models import build_tiny_models
from training.hf_io import EXTRA_FILE, export_retrieval, load_lavis_state_dict



@pytest.fixture(scope="module")
def eva(tiny_models):
    return tiny_models["vision_eva"]


@pytest.fixture(scope="module")
def trained_like(tiny_models, eva):
    """A model whose fresh parameters are not near zero, so every weight matters in the checks.
    ``ln_vision_init=copy``: HF's post_layernorm eps (1e-6), so the export is exact; a fresh
    ln_vision (LAVIS' 1e-5) becomes 1e-6 there, as in transformers' own LAVIS conversion."""
    m = build_model(model_config(tiny_models, eva, ln_vision_init="copy"), seed=11)
    with torch.no_grad():
        m.query_tokens.normal_(0, 1.0)
        m.itm_head.weight.normal_(0, 1.0)
        m.ln_vision.weight.uniform_(0.5, 1.5)
        m.ln_vision.bias.normal_(0, 0.1)
        m.temp.fill_(0.05)
    return m


@torch.no_grad()
def test_export_loads_into_transformers_with_same_itm_and_itc(trained_like, tmp_path):
    from safetensors.torch import load_file
    from transformers import Blip2ForImageTextRetrieval

    model = trained_like
    out = export_retrieval(model, str(tmp_path / "hf"))
    hf, info = Blip2ForImageTextRetrieval.from_pretrained(out, output_loading_info=True)
    hf.eval()
    assert info["missing_keys"] == set() or not info["missing_keys"]
    assert not info["unexpected_keys"] and not info["mismatched_keys"]

    px = pixels(3, seed=5)
    ids, mask = model.tokenize(CAPTIONS[:3])
    image_embeds, image_feat = model.encode_image(px)
    ours_itm = model.itm_logits(image_embeds, ids, mask)
    theirs_itm = hf(pixel_values=px, input_ids=ids, attention_mask=mask, use_image_text_matching_head=True)
    assert (ours_itm - theirs_itm.logits_per_image).abs().max() <= 1e-5
    assert ours_itm.std() > 1e-3  # non-trivial logits

    text_feat = model.encode_text(CAPTIONS[:3])[2]
    ours_itc = torch.einsum("iqe,te->itq", image_feat, text_feat).amax(-1)
    theirs_itc = hf(pixel_values=px, input_ids=ids, attention_mask=mask, use_image_text_matching_head=False)
    assert (ours_itc - theirs_itc.logits_per_image).abs().max() <= 1e-5

    extra = load_file(str(out / EXTRA_FILE))  # what HF has no place for
    assert set(extra) == {"temp", "itg_head.predictions.bias", "itg_head.predictions.transform.dense.weight",
                          "itg_head.predictions.transform.dense.bias",
                          "itg_head.predictions.transform.LayerNorm.weight",
                          "itg_head.predictions.transform.LayerNorm.bias"}
    assert extra["temp"].item() == pytest.approx(0.05)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out).bos_token == "[DEC]"


@torch.no_grad()
def test_plain_transformers_retrieval_directory_loads_as_stage1(trained_like, tmp_path):
    """A released-style directory: only what Blip2ForImageTextRetrieval.save_pretrained and the
    tokenizer write (no blip2_config.json, no extras) loads with the same ITM logits and ITC scores."""
    from transformers import AutoTokenizer, Blip2ForImageTextRetrieval

    from training.stage1 import Blip2Stage1

    out = export_retrieval(trained_like, str(tmp_path / "hf"))
    plain = tmp_path / "plain"
    Blip2ForImageTextRetrieval.from_pretrained(out).save_pretrained(plain)
    AutoTokenizer.from_pretrained(out).save_pretrained(plain)
    assert not (plain / "blip2_config.json").exists() and not (plain / EXTRA_FILE).exists()
    loaded = Blip2Stage1.from_pretrained(str(plain), frozen_dtype="float32").eval()
    assert (loaded.cfg.num_query_tokens, loaded.cfg.embed_dim, loaded.cfg.image_size) == (
        trained_like.cfg.num_query_tokens, trained_like.cfg.embed_dim, trained_like.cfg.image_size)
    px = pixels(3, seed=5)
    ids, mask = trained_like.tokenize(CAPTIONS[:3])
    assert torch.equal(ids, loaded.tokenize(CAPTIONS[:3])[0])
    embeds, feat = trained_like.encode_image(px)
    embeds2, feat2 = loaded.encode_image(px)
    assert (feat - feat2).abs().max() <= 1e-5
    assert (trained_like.itm_logits(embeds, ids, mask) - loaded.itm_logits(embeds2, ids, mask)).abs().max() <= 1e-5
    assert (trained_like.encode_text(CAPTIONS[:3])[2] - loaded.encode_text(CAPTIONS[:3])[2]).abs().max() <= 1e-5
    # with our extras file next to it, the ITG head and temperature come back too
    again = Blip2Stage1.from_pretrained(str(out), frozen_dtype="float32")
    assert again.temp.item() == pytest.approx(0.05)


def test_export_refuses_clip_encoder(tiny_models, tmp_path):
    model = build_model(model_config(tiny_models, vision="clip_vit_l", vision_path=str(tiny_models["vision"])))
    with pytest.raises(ValueError, match="no place for a 'clip_vit_l'"):
        export_retrieval(model, str(tmp_path / "hf"))
    with pytest.raises(ValueError, match="clip_vit_l"):  # LAVIS EVA weights cannot go into a CLIP tower
        load_lavis_state_dict(model, {"visual_encoder.cls_token": torch.zeros(1, 1, 48)})


def to_lavis_layout(model) -> dict[str, torch.Tensor]:
    """Written independently in LAVIS' own key layout (blip2_qformer.py + eva_vit.py)."""
    sd = {}
    for k, v in model.state_dict().items():
        v = v.clone()
        if k.startswith("vision.model."):
            name = k[len("vision.model."):]
            name = name.replace("embeddings.class_embedding", "cls_token").replace(
                "embeddings.position_embedding", "pos_embed").replace("embeddings.patch_embedding", "patch_embed.proj")
            name = name.replace("encoder.layers.", "blocks.").replace("layer_norm1", "norm1").replace(
                "layer_norm2", "norm2").replace("self_attn.projection", "attn.proj")
            if name.endswith("self_attn.qkv.bias"):
                d = v.shape[0] // 3
                sd["visual_encoder." + name.replace("self_attn.qkv.bias", "attn.q_bias")] = v[:d]
                sd["visual_encoder." + name.replace("self_attn.qkv.bias", "attn.v_bias")] = v[2 * d:]
                continue
            sd["visual_encoder." + name.replace("self_attn.qkv", "attn.qkv")] = v
        elif k.startswith("qformer.layernorm."):
            sd["Qformer.bert.embeddings.LayerNorm." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("embeddings."):
            sd["Qformer.bert." + k] = v
        elif k.startswith("qformer.encoder."):
            name = k.replace("attention.attention.", "attention.self.").replace("crossattention.attention.",
                                                                                 "crossattention.self.")
            sd["Qformer.bert.encoder." + name[len("qformer.encoder."):]] = v
        elif k.startswith("itg_head."):
            sd["Qformer.cls." + k[len("itg_head."):]] = v
        else:
            sd[k] = v
    sd["Qformer.bert.embeddings.position_ids"] = torch.arange(64)[None]
    sd["Qformer.cls.predictions.decoder.bias"] = sd["Qformer.cls.predictions.bias"]
    assert any(k.endswith("attn.q_bias") for k in sd) and "ln_vision.weight" in sd
    return sd


@torch.no_grad()
def test_lavis_state_dict_imports_and_reproduces_outputs(trained_like, tiny_models, eva, tmp_path):
    source = trained_like
    lavis = to_lavis_layout(source)
    other_eva = build_tiny_models(tmp_path, seed=9, only=["vision_eva"])["vision_eva"]
    target = build_model(model_config(tiny_models, other_eva, ln_vision_init="copy"), seed=12)  # the source's eps
    px = pixels(3, seed=6)
    assert (target.encode_image(px)[0] - source.encode_image(px)[0]).abs().max() > 1e-2  # different before
    taken = load_lavis_state_dict(target, lavis)
    assert "vision.model.encoder.layers.0.self_attn.qkv.bias" in taken
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
    negatives = (torch.tensor([1, 2, 0]), torch.tensor([2, 0, 1]))
    a, b = source(px, CAPTIONS[:3], itm_negatives=negatives), target(px, CAPTIONS[:3], itm_negatives=negatives)
    for k in a:
        assert abs(a[k].item() - b[k].item()) < 1e-6, k
    with pytest.raises(KeyError, match="no place"):
        load_lavis_state_dict(target, {**lavis, "Qformer.bert.pooler.dense.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match="lacks"):
        load_lavis_state_dict(target, {k: v for k, v in lavis.items() if k != "itm_head.weight"})


def test_every_transformers_load_refuses_remote_code_explicitly():
    """Issue 32 L11: transformers asks on a TTY (and runs a folder's code on `y`) unless told False."""
    import ast
    from pathlib import Path

    own = {"Blip2Stage1", "Blip2Stage2", "FrozenImageEncoder", "Model"}  # the project's loaders: they call these
    root = Path(__file__).resolve().parents[2]
    missing = []
    for path in [p for d in ("capfilt", "pipelines", "training", "orchestration") for p in (root / d).rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "from_pretrained" and ast.unparse(node.func.value) not in own
                    and not any(k.arg == "trust_remote_code" and getattr(k.value, "value", None) is False
                                for k in node.keywords)):
                missing.append(f"{path.relative_to(root)}:{node.lineno}")
    assert missing == []
