"""Stage-1 weights in and out: export to ``transformers.Blip2ForImageTextRetrieval``, import LAVIS.

Export (:func:`export_retrieval`) writes a ``save_pretrained`` directory that
``Blip2ForImageTextRetrieval.from_pretrained`` loads with no missing or unexpected keys and that
gives the same ITM logits and ITC scores as :class:`training.stage1.Blip2Stage1` (exactly when
``ln_vision`` has HF's eps, ``model.ln_vision_init=copy``; HF's ``post_layernorm`` takes the vision
config's eps, so a fresh ``ln_vision``'s 1e-5 becomes 1e-6, as in transformers' LAVIS conversion):

    ours                          transformers Blip2ForImageTextRetrieval
    vision.model.*                vision_model.*            (EVA / Blip2VisionModel only)
    ln_vision.*                   vision_model.post_layernorm.*
    query_tokens, embeddings.*,   same names
    qformer.*, itm_head.*
    vision_proj.* / text_proj.*   vision_projection.* / text_projection.*

HF has no place for the ITG head or the temperature; they go to ``blip2_extra.safetensors``
(``itg_head.predictions.{transform.*, bias}``, ``temp``; the ITG decoder weight is tied to
``embeddings.word_embeddings.weight``). HF's retrieval model has no CLIP ViT-L tower either, so a
CLIP-based model is refused with an error rather than exported half.

Import from transformers (:func:`training.stage1.load_retrieval`): a plain ``Blip2ForImageTextRetrieval``
directory (a released checkpoint, or our export) becomes a :class:`training.stage1.Blip2Stage1`
by the same renames backwards; ``ln_vision`` is HF's ``post_layernorm`` (its eps). Without
``blip2_extra.safetensors`` the ITG head and temperature keep their fresh values (evaluation,
ITC cosine + ITM logit, uses neither).

Import (:func:`load_lavis_state_dict`) maps a LAVIS ``Blip2Qformer`` state dict (keys
``Qformer.bert.*``, ``Qformer.cls.*``, ``query_tokens``, ``vision_proj``, ``text_proj``,
``itm_head``, ``ln_vision``, ``temp``, optionally ``visual_encoder.*`` for EVA with
``q_bias``/``v_bias`` → HF's fused ``qkv.bias = [q_bias, 0, v_bias]``).
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from pipelines.storage import local_dir

EXTRA_FILE = "blip2_extra.safetensors"
RENAMES_TO_HF = {"vision_proj.": "vision_projection.", "text_proj.": "text_projection.",
                 "ln_vision.": "vision_model.post_layernorm.", "vision.model.": "vision_model."}


def _require_eva(model, what: str) -> None:
    if model.cfg.vision != "eva_vit_g":
        raise ValueError(f"{what}: only the EVA ViT-g encoder (Blip2VisionModel) is supported; transformers' "
                         f"Blip2 models have no place for a {model.cfg.vision!r} (CLIP ViT-L) image encoder")


def retrieval_state_dict(model) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(hf_state_dict, extra)``: our weights under HF retrieval names (fp32), and what HF cannot hold."""
    _require_eva(model, "export to Blip2ForImageTextRetrieval")
    hf, extra = {}, {}
    for key, value in model.state_dict().items():
        value = value.detach().float().contiguous().cpu()
        if key.startswith("itg_head.") or key == "temp":
            if key != "itg_head.predictions.decoder.weight":  # tied to the word embeddings
                extra[key] = value
            continue
        for ours, theirs in RENAMES_TO_HF.items():
            if key.startswith(ours):
                key = theirs + key[len(ours):]
                break
        hf[key] = value
    return hf, extra


def export_retrieval(model, out_dir: str) -> Path:
    """Write ``out_dir`` for ``Blip2ForImageTextRetrieval.from_pretrained`` (+ tokenizer, image
    processor if the encoder dir has one, and ``blip2_extra.safetensors``). Local path only."""
    from safetensors.torch import save_file
    from transformers import Blip2Config, Blip2ForImageTextRetrieval

    sd, extra = retrieval_state_dict(model)
    vision_cfg = model.vision.model.config.to_dict()
    config = Blip2Config(vision_config=vision_cfg, qformer_config=model.qformer.config.to_dict(),
                         num_query_tokens=model.num_queries, image_text_hidden_size=model.cfg.embed_dim)
    hf = Blip2ForImageTextRetrieval(config)
    hf.load_state_dict(sd, strict=True)
    out = Path(out_dir)
    hf.save_pretrained(out)
    save_file(extra, str(out / EXTRA_FILE))
    model.tokenizer.save_pretrained(str(out))
    processor = Path(local_dir(model.cfg.vision_path)) / "preprocessor_config.json"
    if processor.exists():
        shutil.copy(processor, out / processor.name)
    return out


# -- transformers import ------------------------------------------------------------------
def is_retrieval_dir(path: Path) -> bool:
    """A transformers ``Blip2ForImageTextRetrieval`` directory (``config.json`` says so)."""
    cfg = path / "config.json"
    if not cfg.exists():
        return False
    hf = json.loads(cfg.read_text())
    return hf.get("model_type") == "blip-2" and "Blip2ForImageTextRetrieval" in (hf.get("architectures") or [])


# -- LAVIS import -------------------------------------------------------------------------
_EVA_BLOCK = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv",
              "attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_EVA_TOP = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
            "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
            "patch_embed.proj.bias": "embeddings.patch_embedding.bias"}
_LAVIS_SKIP = {"Qformer.bert.embeddings.position_ids", "Qformer.cls.predictions.decoder.weight",
               "Qformer.cls.predictions.decoder.bias"}  # a buffer and two aliases (tied weights)
_SAME = ("query_tokens", "vision_proj.", "text_proj.", "itm_head.", "ln_vision.", "temp")


def _lavis_qformer_key(key: str) -> str | None:
    if key.startswith("Qformer.cls."):
        return "itg_head." + key[len("Qformer.cls."):]
    if key.startswith("Qformer.bert.embeddings.LayerNorm."):
        return "qformer.layernorm." + key.rsplit(".", 1)[1]
    if key.startswith("Qformer.bert.embeddings."):
        return "embeddings." + key[len("Qformer.bert.embeddings."):]
    if key.startswith("Qformer.bert.encoder."):
        key = "qformer.encoder." + key[len("Qformer.bert.encoder."):]
        return key.replace(".attention.self.", ".attention.attention.").replace(".crossattention.self.",
                                                                                ".crossattention.attention.")
    return None


def _lavis_vision(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """LAVIS EVA keys (``visual_encoder.*``) → ``vision.model.*``; returns (mapped, unmapped keys)."""
    mapped, unknown = {}, []
    for key, value in sd.items():
        name = key[len("visual_encoder."):]
        block = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", name)
        bias = re.fullmatch(r"blocks\.(\d+)\.attn\.q_bias", name)
        if name in _EVA_TOP:
            mapped["vision.model." + _EVA_TOP[name]] = value
        elif bias:
            i = bias.group(1)
            q, v = value, sd[f"visual_encoder.blocks.{i}.attn.v_bias"]
            mapped[f"vision.model.encoder.layers.{i}.self_attn.qkv.bias"] = torch.cat([q, torch.zeros_like(v), v])
        elif re.fullmatch(r"blocks\.\d+\.attn\.v_bias", name):
            continue  # folded into qkv.bias with q_bias
        elif block and block.group(2) in _EVA_BLOCK:
            mapped[f"vision.model.encoder.layers.{block.group(1)}.{_EVA_BLOCK[block.group(2)]}.{block.group(3)}"] = value
        else:
            unknown.append(key)
    return mapped, unknown


def lavis_to_ours(model, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a LAVIS ``Blip2Qformer`` state dict to our keys; unknown keys are an error."""
    ours, unknown = {}, []
    vision = {k: v for k, v in sd.items() if k.startswith("visual_encoder.")}
    if vision:
        _require_eva(model, "LAVIS visual_encoder import")
        mapped, bad = _lavis_vision(vision)
        ours.update(mapped)
        unknown += bad
    for key, value in sd.items():
        if key in _LAVIS_SKIP or key.startswith("visual_encoder."):
            continue
        if key.startswith(_SAME):
            ours[key] = value
        elif (name := _lavis_qformer_key(key)) is not None:
            ours[name] = value
        else:
            unknown.append(key)
    if unknown:
        raise KeyError(f"LAVIS keys with no place in Blip2Stage1: {sorted(unknown)[:20]}")
    return ours


def load_lavis_state_dict(model, sd: dict[str, torch.Tensor]) -> list[str]:
    """Load a LAVIS stage-1 state dict into ``model`` in place; returns the keys taken.

    Every trainable weight must be present (the ITG decoder is tied, so only the word embeddings
    are needed); the frozen encoder is replaced only when ``visual_encoder.*`` keys are given.
    """
    ours = lavis_to_ours(model, sd)
    own = model.state_dict()
    wrong = [k for k, v in ours.items() if k not in own or own[k].shape != v.shape]
    if wrong:
        raise KeyError(f"LAVIS weights that do not fit Blip2Stage1 (name or shape): {wrong[:20]}")
    missing = [k for k in model.trainable_state_dict() if k not in ours]
    if missing:
        raise KeyError(f"LAVIS state dict lacks trainable weights: {missing[:20]}")
    with torch.no_grad():
        for key, value in ours.items():
            own[key].copy_(value)
    return sorted(ours)
