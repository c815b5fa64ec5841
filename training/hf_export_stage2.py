"""Stage-2 checkpoints in and out: ours ↔ HF ``Blip2ForConditionalGeneration`` ↔ LAVIS.

Our module names already are HF's (``query_tokens``, ``qformer.*``, ``language_projection.*``,
``language_model.*``) except two: the frozen EVA tower ``vision.model.*`` is HF's
``vision_model.*`` and our trainable ``ln_vision`` is HF's ``vision_model.post_layernorm``.

Directory layouts written by ``save_stage2``:

* ``eva_vit_g`` — a plain HF directory: ``config.json`` (``Blip2Config``), ``model.safetensors``,
  ``generation_config.json``, ``Blip2Processor`` + tokenizer files; plus ``blip2_config.json``
  (our ModelConfig) and, when the model came from stage 1, ``blip2_extra.safetensors``.
* ``clip_vit_l`` — HF's ``Blip2VisionModel`` cannot hold a CLIP tower (CLIP has a pre-LayerNorm,
  separate q/k/v projections and quick-GELU), so there is deliberately **no** ``config.json``
  (plain transformers refuses the directory instead of silently using a random EVA tower):
  ``vision_model/`` (the ``CLIPVisionModel`` already truncated by one layer), ``language_model/``,
  ``qformer.safetensors`` (``ln_vision``, ``query_tokens``, ``qformer``, ``language_projection``),
  ``blip2_hf_config.json`` (``Blip2Config`` of the rest), processor files, ``blip2_config.json``.

``blip2_extra.safetensors`` holds what HF's class has no place for, under stage-1 names:
``embeddings.*`` (Q-Former word/position embeddings), the Q-Former's text FFNs
(``qformer.encoder.layer.N.intermediate/output``), ``vision_proj``, ``text_proj``, ``itm_head``,
``itg_head``, ``temp``.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pipelines.storage import local_dir
from training.config import ModelConfig, saved_ln_vision_init

EXTRA_FILE = "blip2_extra.safetensors"
OUR_CONFIG = "blip2_config.json"
_TEXT_FFN = re.compile(r"^qformer\.encoder\.layer\.\d+\.(intermediate|output)\.")


# -- stage 1 → stage 2 ----------------------------------------------------------------------
def read_stage1_checkpoint(path: str) -> dict:
    """``{"config": ModelConfig dict, "state_dict": trainable stage-1 weights}`` of a stage-1 model
    dir (``Blip2Stage1.save_pretrained``) or of a stage-1 Ray Train checkpoint."""
    root = Path(local_dir(path))
    trainer = read_trainer_checkpoint(root)
    if trainer is not None:
        return {"config": trainer[0].get("model", {}), "state_dict": trainer[1]}
    weights = root / "model.safetensors"
    if not weights.exists():
        raise FileNotFoundError(f"{path}: not a stage-1 checkpoint (no model.safetensors or trainable.safetensors)")
    config = json.loads((root / OUR_CONFIG).read_text()) if (root / OUR_CONFIG).exists() else {}
    return {"config": config, "state_dict": load_file(str(weights))}


def split_stage1_state_dict(state_dict: dict[str, torch.Tensor], stage2_keys) -> tuple[dict, dict]:
    """(weights stage 2 uses, the text-only rest). The Q-Former's text FFNs are the rest."""
    keep = set(stage2_keys)
    mine = {k: v for k, v in state_dict.items() if k in keep and not _TEXT_FFN.match(k)}
    return mine, {k: v.detach().cpu().contiguous() for k, v in state_dict.items() if k not in mine}


def bert_to_qformer(qformer: nn.Module, bert_path: str) -> None:
    """Initialise the Q-Former from BERT (paper §3.1): self-attention and FFN (into the query
    FFN); cross-attention stays randomly initialised."""
    root = Path(local_dir(bert_path))
    if (root / "model.safetensors").exists():
        bert = load_file(str(root / "model.safetensors"))
    else:
        from transformers import AutoModel

        bert = AutoModel.from_pretrained(str(root), trust_remote_code=False).state_dict()
    mapped = {}
    for k, v in bert.items():
        k = k.removeprefix("bert.")
        if k.startswith("embeddings.LayerNorm."):
            mapped[k.replace("embeddings.LayerNorm.", "layernorm.")] = v
        elif k.startswith("encoder.layer."):
            k = k.replace(".attention.self.", ".attention.attention.")
            k = re.sub(r"\.(intermediate|output)\.", r".\1_query.", k) if ".attention." not in k else k
            mapped[k] = v
    own = qformer.state_dict()
    qformer.load_state_dict({k: v for k, v in mapped.items() if k in own and own[k].shape == v.shape}, strict=False)


# -- HF ---------------------------------------------------------------------------------------
def hf_state_dict(model) -> dict[str, torch.Tensor]:
    """Every weight under ``Blip2ForConditionalGeneration`` names (EVA encoders only)."""
    sd = {f"vision_model.{k}": v for k, v in model.vision.model.state_dict().items()}
    sd["vision_model.post_layernorm.weight"] = model.ln_vision.weight.detach()
    sd["vision_model.post_layernorm.bias"] = model.ln_vision.bias.detach()
    sd.update(_non_vision_state_dict(model))
    return sd


def _non_vision_state_dict(model) -> dict[str, torch.Tensor]:
    sd = {"query_tokens": model.query_tokens.detach()}
    for name in ("qformer", "language_projection", "language_model"):
        sd.update({f"{name}.{k}": v for k, v in getattr(model, name).state_dict().items()})
    return sd


def hf_config(model, with_vision: bool = True):
    from transformers import Blip2Config, Blip2VisionConfig

    vision = model.vision.model.config.to_dict() if with_vision else Blip2VisionConfig().to_dict()
    return Blip2Config(vision_config=vision, qformer_config=model.qformer.config.to_dict(),
                       text_config=model.language_model.config.to_dict(),
                       num_query_tokens=model.query_tokens.shape[1], image_token_index=model.image_token_id)


def _processor(model):
    from transformers import Blip2Processor

    return Blip2Processor(image_processor=model.image_processor, tokenizer=model.tokenizer,
                          num_query_tokens=model.query_tokens.shape[1])


def save_stage2(model, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if model.cfg.vision == "eva_vit_g":
        from transformers import Blip2ForConditionalGeneration

        with torch.device("meta"):  # the shell only: our tensors are assigned, nothing is copied
            hf = Blip2ForConditionalGeneration(hf_config(model))
        hf.load_state_dict(hf_state_dict(model), strict=True, assign=True)
        hf.save_pretrained(out)
    else:
        model.vision.model.save_pretrained(out / "vision_model")
        model.language_model.save_pretrained(out / "language_model")
        trainable = {k: v.detach().contiguous() for k, v in _non_vision_state_dict(model).items()
                     if not k.startswith("language_model.")}
        trainable.update({f"ln_vision.{k}": v.detach() for k, v in model.ln_vision.state_dict().items()})
        save_file(trainable, str(out / "qformer.safetensors"))
        (out / "blip2_hf_config.json").write_text(hf_config(model, with_vision=False).to_json_string())
    _processor(model).save_pretrained(out)
    (out / OUR_CONFIG).write_text(json.dumps(dataclasses.asdict(model.cfg), indent=2))
    if model.extra:
        save_file({k: v.contiguous() for k, v in model.extra.items()}, str(out / EXTRA_FILE))


def _model_config(root: Path, overrides: dict, hf_cfg) -> ModelConfig:
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    saved = json.loads((root / OUR_CONFIG).read_text()) if (root / OUR_CONFIG).exists() else {}
    cfg = ModelConfig(**{k: v for k, v in saved.items() if k in known})
    cfg.ln_vision_init = saved_ln_vision_init(saved)  # a plain HF directory: its post_layernorm, HF's eps
    if not saved:  # a plain HF directory: describe it in our terms
        cfg.vision = "eva_vit_g"
        cfg.image_size = hf_cfg.vision_config.image_size
        cfg.frozen_dtype = "float16" if torch.cuda.is_available() else "float32"
    cfg.llm_family = "opt" if hf_cfg.use_decoder_only_language_model else "t5"
    cfg.num_query_tokens = hf_cfg.num_query_tokens
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown model config keys {unknown}; valid: {sorted(known)}")
    cfg = dataclasses.replace(cfg, **overrides)
    cfg.validate()
    return cfg


def load_stage2(cls, path: str, overrides: dict):
    """Our checkpoint (EVA or CLIP layout) or a plain HF ``Blip2ForConditionalGeneration`` dir."""
    from transformers import Blip2Config, Blip2Processor

    from training.encoders import DTYPES, LAVIS_LN_EPS, FrozenImageEncoder, cast_tower
    from training.llm import add_image_token, resolve_llm_dtype

    root = Path(path)
    clip_layout = (root / "blip2_hf_config.json").exists()
    hf_dir = (root / "config.json").exists() and json.loads((root / "config.json").read_text()).get("model_type") == "blip-2"
    if not (clip_layout or hf_dir):
        raise FileNotFoundError(f"{path}: neither a Blip2ForConditionalGeneration directory nor our checkpoint")
    hf_cfg = Blip2Config.from_json_file(str(root / ("blip2_hf_config.json" if clip_layout else "config.json")))
    cfg = _model_config(root, overrides, hf_cfg)
    processor = Blip2Processor.from_pretrained(str(root), trust_remote_code=False)
    if clip_layout:
        parts = _load_clip_layout(root, hf_cfg)
    else:
        from transformers import Blip2ForConditionalGeneration

        # load once in the frozen parts' dtype when they share one (a 7B LLM need not pass through
        # fp32); HF keeps query_tokens/qformer in fp32, the other trainable parts are upcast below
        llm_dtype = resolve_llm_dtype(cfg, torch.cuda.is_available())
        same = cfg.freeze_vision and DTYPES[cfg.frozen_dtype] == llm_dtype
        hf = Blip2ForConditionalGeneration.from_pretrained(str(root), dtype=llm_dtype if same else torch.float32, trust_remote_code=False)
        ln = hf.vision_model.post_layernorm.float()
        hf.vision_model.post_layernorm = nn.Identity()
        parts = {"vision": hf.vision_model, "ln_vision": ln, "query_tokens": hf.query_tokens.data.float(),
                 "qformer": hf.qformer.float(), "language_projection": hf.language_projection.float(),
                 "language_model": hf.language_model}
    if cfg.ln_vision_init == "fresh":  # trained from a fresh ln_vision: LAVIS' eps, not HF's
        parts["ln_vision"].eps = LAVIS_LN_EPS
    trainable_vision = not cfg.freeze_vision
    tower = cast_tower(parts["vision"], DTYPES["float32" if trainable_vision else cfg.frozen_dtype], cfg.frozen_weights)
    vision = FrozenImageEncoder(cfg.vision, tower, None, trainable=trainable_vision)
    llm = parts["language_model"].to(resolve_llm_dtype(cfg, torch.cuda.is_available()))
    tokenizer = processor.tokenizer
    image_id = hf_cfg.image_token_index if hf_cfg.image_token_index is not None else add_image_token(tokenizer, llm)
    extra = load_file(str(root / EXTRA_FILE)) if (root / EXTRA_FILE).exists() else {}
    return cls(cfg, vision, parts["ln_vision"], parts["query_tokens"], parts["qformer"], parts["language_projection"],
               llm, tokenizer, processor.image_processor, image_id, extra)


def _load_clip_layout(root: Path, hf_cfg) -> dict:
    from transformers import (AutoModelForCausalLM, AutoModelForSeq2SeqLM, Blip2QFormerModel,
                              CLIPVisionModel)

    vision = CLIPVisionModel.from_pretrained(str(root / "vision_model"), dtype=torch.float32, trust_remote_code=False)
    auto = AutoModelForCausalLM if hf_cfg.use_decoder_only_language_model else AutoModelForSeq2SeqLM
    llm = auto.from_pretrained(str(root / "language_model"), dtype=torch.float32, trust_remote_code=False)
    sd = load_file(str(root / "qformer.safetensors"))
    hf_cfg.qformer_config.encoder_hidden_size = vision.config.hidden_size  # Blip2Config assumes an EVA width
    qformer = Blip2QFormerModel(hf_cfg.qformer_config)
    qformer.load_state_dict({k[len("qformer."):]: v for k, v in sd.items() if k.startswith("qformer.")})
    projection = nn.Linear(*sd["language_projection.weight"].shape[::-1])
    projection.load_state_dict({"weight": sd["language_projection.weight"], "bias": sd["language_projection.bias"]})
    ln = nn.LayerNorm(sd["ln_vision.weight"].shape[0])
    ln.load_state_dict({"weight": sd["ln_vision.weight"], "bias": sd["ln_vision.bias"]})
    return {"vision": vision, "ln_vision": ln, "query_tokens": sd["query_tokens"], "qformer": qformer,
            "language_projection": projection, "language_model": llm}


# -- LAVIS ------------------------------------------------------------------------------------
# LAVIS Blip2OPT/Blip2T5 names → ours (the same renames as transformers' convert_blip_2 script).
_LAVIS_RULES = [
    (r"^Qformer\.bert\.embeddings\.LayerNorm\.", "qformer.layernorm."),
    (r"^Qformer\.bert\.embeddings\.", "embeddings."),
    (r"^Qformer\.bert\.encoder\.(.*)\.(attention|crossattention)\.self\.", r"qformer.encoder.\1.\2.attention."),
    (r"^Qformer\.bert\.", "qformer."),
    (r"^Qformer\.cls\.predictions\.", "itg_head."),
    (r"^(opt|t5)_proj\.", "language_projection."),
    (r"^(opt|t5)_model\.", "language_model."),
    (r"^visual_encoder\.cls_token$", "vision.model.embeddings.class_embedding"),
    (r"^visual_encoder\.pos_embed$", "vision.model.embeddings.position_embedding"),
    (r"^visual_encoder\.patch_embed\.proj\.", "vision.model.embeddings.patch_embedding."),
    (r"^visual_encoder\.blocks\.(\d+)\.norm(\d)\.", r"vision.model.encoder.layers.\1.layer_norm\2."),
    (r"^visual_encoder\.blocks\.(\d+)\.attn\.qkv\.", r"vision.model.encoder.layers.\1.self_attn.qkv."),
    (r"^visual_encoder\.blocks\.(\d+)\.attn\.proj\.", r"vision.model.encoder.layers.\1.self_attn.projection."),
    (r"^visual_encoder\.blocks\.(\d+)\.mlp\.", r"vision.model.encoder.layers.\1.mlp."),
]


# a buffer and a tied alias (= Qformer.bert.embeddings.word_embeddings.weight)
_LAVIS_SKIP = {"Qformer.bert.embeddings.position_ids", "Qformer.cls.predictions.decoder.weight"}


def lavis_to_ours(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename LAVIS keys; EVA's separate ``q_bias``/``v_bias`` become HF's fused ``qkv.bias``."""
    out = {}
    for key, value in state_dict.items():
        if key in _LAVIS_SKIP:
            continue
        m = re.match(r"^visual_encoder\.blocks\.(\d+)\.attn\.(q|v)_bias$", key)
        if m:
            if m.group(2) == "q":
                v_bias = state_dict[key.replace("q_bias", "v_bias")]
                out[f"vision.model.encoder.layers.{m.group(1)}.self_attn.qkv.bias"] = torch.cat(
                    [value, torch.zeros_like(value), v_bias])
            continue
        for pattern, repl in _LAVIS_RULES:
            new = re.sub(pattern, repl, key)
            if new != key:
                key = new
                break
        out[key] = value
    return out


def _read_state_dict(source) -> dict[str, torch.Tensor]:
    if isinstance(source, dict):
        return source
    path = local_dir(str(source))
    if str(path).endswith(".safetensors"):
        return load_file(path)
    blob = torch.load(path, map_location="cpu", weights_only=True)
    return blob.get("model", blob) if isinstance(blob, dict) else blob


def load_lavis_stage2(cls, source, cfg: ModelConfig):
    """Build from ``cfg`` (encoder + LLM), then load a LAVIS stage-2 state dict over it. LAVIS saves
    only trainable weights, so frozen ones come from ``cfg``'s paths unless the dict has them."""
    state_dict = lavis_to_ours(_read_state_dict(source))
    model = cls.from_config(dataclasses.replace(cfg, stage1_checkpoint=""))
    own = model.state_dict()
    frozen = {k: v for k, v in state_dict.items() if k in own and k.startswith(("vision.", "language_model."))}
    trainable = {k: v for k, v in state_dict.items() if k in own and k not in frozen and not _TEXT_FFN.match(k)}
    model.load_trainable_state_dict(trainable, strict_keys=("query_tokens", "ln_vision.", "qformer.",
                                                            "language_projection."))
    if frozen:
        with torch.no_grad():
            for k, v in frozen.items():
                own[k].copy_(v.to(own[k].dtype))
    model.extra = {k: v for k, v in state_dict.items() if k not in trainable and k not in frozen}
    return model


# -- export -----------------------------------------------------------------------------------
def read_trainer_checkpoint(root: Path) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """``(config, trainable weights)`` of a Ray Train checkpoint (``training.checkpoint`` layout:
    ``trainable.safetensors`` + ``state.json`` + ``config.json`` = ``{"seed", "train", "model"}``)."""
    if not ((root / "trainable.safetensors").exists() and (root / "state.json").exists()):
        return None
    config = json.loads((root / "config.json").read_text()) if (root / "config.json").exists() else {}
    return config, load_file(str(root / "trainable.safetensors"))


def model_config_from_saved(saved: dict, overrides: dict) -> ModelConfig:
    """A checkpoint's saved ``model`` section (keys this version does not know are dropped) + ``overrides``."""
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    return dataclasses.replace(ModelConfig(**{k: v for k, v in saved.items() if k in known}), **overrides)
