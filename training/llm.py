"""The frozen LLM of stage 2: loading it (OPT or FlanT5), its dtype, and HF's ``<image>`` token.

Below both ``training.stage2`` (the model) and ``training.hf_export_stage2`` (its HF layout), so
neither has to import the other for these.
"""
from __future__ import annotations

import torch

from pipelines.storage import local_dir
from training.config import ModelConfig
from training.encoders import DTYPES

IMAGE_TOKEN = "<image>"    # HF placeholder the query outputs replace (Blip2Processor's token)


def resolve_llm_dtype(cfg: ModelConfig, cuda: bool) -> torch.dtype:
    """``auto``: fp16 for OPT, bf16 for FlanT5 (fp16 overflows in T5) on GPU; fp32 on CPU."""
    if cfg.llm_dtype != "auto":
        return DTYPES[cfg.llm_dtype]
    if not cuda:
        return torch.float32
    return torch.float16 if cfg.llm_family == "opt" else torch.bfloat16


def load_llm(cfg: ModelConfig, dtype: torch.dtype):
    """The frozen LLM and its tokenizer from ``cfg.llm_path`` (OPT: BOS is always prepended)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    path = local_dir(cfg.llm_path)
    if cfg.llm_family == "opt":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=False)
    else:  # FlanT5 runs with exact GELU (not the checkpoint's gelu_new), as LAVIS and HF's BLIP-2 conversion
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
        config.dense_act_fn = "gelu"
        model = AutoModelForSeq2SeqLM.from_pretrained(path, config=config, dtype=dtype, trust_remote_code=False)
    kwargs = {"add_bos_token": True} if cfg.llm_family == "opt" else {}  # LAVIS/HF OPT inputs start with BOS
    return model, AutoTokenizer.from_pretrained(path, **kwargs, trust_remote_code=False)


def add_image_token(tokenizer, language_model) -> int:
    """Register HF's ``<image>`` placeholder; grow the vocabulary only if it has no spare row.

    Real OPT/FlanT5 checkpoints have spare embedding rows, tiny ones do not; a new row is set to
    the mean of the others (deterministic, so a stage-2 model rebuilt from config is identical).
    """
    from transformers import AddedToken

    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, normalized=False, special=True)], special_tokens=True)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    old = language_model.get_input_embeddings().weight.shape[0]
    if image_id >= old:
        language_model.resize_token_embeddings(image_id + 1, mean_resizing=False)
        with torch.no_grad():
            for emb in {language_model.get_input_embeddings(), language_model.get_output_embeddings()}:
                if emb is not None:
                    emb.weight[old:] = emb.weight[:old].mean(0)
    return image_id
