"""Stage 2 (paper §3.3): generative learning against a frozen LLM.

The Q-Former's query outputs ``[B, Q, 768]`` go through ``Linear(768, d_llm)`` and are prepended
to the LLM's input embeddings as soft visual prompts.

* OPT (decoder-only): target = caption + "\\n"; loss only on caption tokens (queries, BOS, the
  optional prompt and padding carry no loss); at most ``max_text_len`` text tokens (BOS included).
* FlanT5 (encoder-decoder): prefix LM. Each caption is split at a random word boundary
  ``k ~ U{0, …, n_words-1}`` (so the suffix is never empty and a prefix may be empty, which also
  trains plain captioning); queries + prefix go to the encoder, the suffix (+ ``</s>``) is the
  decoder target.

Submodule names follow ``transformers.Blip2ForConditionalGeneration`` (``query_tokens``,
``qformer``, ``language_projection``, ``language_model``) so that a checkpoint *is* an HF
directory (see ``training.hf_export_stage2``); the frozen tower is ``vision``
(``FrozenImageEncoder``) with its final LayerNorm split out as the trainable ``ln_vision``.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.storage import local_dir
from training.config import ModelConfig, saved_ln_vision_init
from training.encoders import FrozenImageEncoder, make_ln_vision
from training.hf_export_stage2 import (bert_to_qformer, load_lavis_stage2, load_stage2, read_stage1_checkpoint,
                                      save_stage2, split_stage1_state_dict)
from training.llm import add_image_token, load_llm, resolve_llm_dtype

IGNORE = -100              # label value that carries no loss
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# -- text batches: which tokens carry loss --------------------------------------------------
def _pad(rows: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([[value] * (width - len(r)) + r if left else r + [value] * (width - len(r)) for r in rows],
                        dtype=torch.long)


def causal_lm_batch(tokenizer, texts: list[str], max_len: int, prompt: str = "") -> dict[str, torch.Tensor]:
    """OPT targets: ``[BOS] prompt+caption \\n``, right-padded, truncated to ``max_len`` tokens.

    Returns ``input_ids``, ``attention_mask`` and ``labels`` (all ``[B, T]`` long); ``labels``
    equals ``input_ids`` except on padding and, with a prompt, on BOS + prompt (``IGNORE``). As
    LAVIS' ``blip2_opt``: without a prompt the BOS stays a target (the last query predicts it).
    """
    n_prompt = 1 + len(tokenizer(prompt, add_special_tokens=False).input_ids) if prompt else 0
    ids, labels = [], []
    for text in texts:
        full = prompt + text  # as LAVIS' prompt + caption: a prompt ends with its own space
        row = ([tokenizer.bos_token_id] + tokenizer(full + "\n", add_special_tokens=False).input_ids)[:max_len]
        ids.append(row)
        labels.append([IGNORE] * min(n_prompt, len(row)) + row[n_prompt:])
    mask = [[1] * len(r) for r in ids]
    return {"input_ids": _pad(ids, tokenizer.pad_token_id), "attention_mask": _pad(mask, 0),
            "labels": _pad(labels, IGNORE)}


def split_caption(text: str, k: int) -> tuple[str, str]:
    """Prefix = the first ``k`` words, suffix = the rest (``0 <= k < n_words``)."""
    words = text.split()
    return " ".join(words[:k]), " ".join(words[k:])


def random_split_points(texts: list[str], generator: torch.Generator | None = None) -> list[int]:
    """One split per caption, uniform over ``{0, …, n_words-1}`` (torch RNG: reproducible, checkpointed)."""
    return [int(torch.randint(0, max(len(t.split()), 1), (1,), generator=generator)) for t in texts]


def prefix_lm_batch(tokenizer, texts: list[str], split_points: list[int], max_len: int,
                    prompt: str = "") -> dict[str, torch.Tensor]:
    """FlanT5 prefix LM: encoder ``input_ids``/``attention_mask`` hold ``prompt prefix </s>``;
    ``labels`` hold ``suffix </s>`` (``IGNORE`` on padding) with ``decoder_attention_mask``."""
    pairs = [split_caption(t, k) for t, k in zip(texts, split_points)]
    enc = tokenizer([" ".join(filter(None, (prompt, p))) for p, _ in pairs], padding="longest",
                    truncation=True, max_length=max_len, return_tensors="pt")
    dec = tokenizer([s for _, s in pairs], padding="longest", truncation=True, max_length=max_len,
                    return_tensors="pt")
    return {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask,
            "labels": dec.input_ids.masked_fill(dec.attention_mask == 0, IGNORE),
            "decoder_attention_mask": dec.attention_mask}


# -- building blocks ------------------------------------------------------------------------
def stage2_qformer_config(cfg: ModelConfig, vision_width: int, stage1_dir: str = ""):
    """The Q-Former's ``Blip2QFormerConfig``: the stage-1 checkpoint's (``qformer_config.json``)
    when there is one, else built from the BERT init like stage 1 does; without the text FFNs,
    which stage 2 never runs (``Blip2ForConditionalGeneration``'s Q-Former has none)."""
    from transformers import AutoConfig, Blip2QFormerConfig

    from training.qformer import qformer_config

    saved = Path(local_dir(stage1_dir)) / "qformer_config.json" if stage1_dir else None
    if saved is not None and saved.exists():
        qcfg = Blip2QFormerConfig.from_json_file(str(saved))
    else:
        bert = AutoConfig.from_pretrained(local_dir(cfg.qformer_init), trust_remote_code=False)
        qcfg = qformer_config(bert, bert.vocab_size, vision_width, cfg.cross_attention_frequency, bert.pad_token_id)
    qcfg.use_qformer_text_input = False
    qcfg.encoder_hidden_size = vision_width
    return qcfg


def blip_image_processor(image_size: int):
    """HF BLIP-2's preprocessing: RGB, bicubic resize to a square, CLIP mean/std."""
    from transformers import BlipImageProcessorPil

    return BlipImageProcessorPil(size={"height": image_size, "width": image_size},
                                 image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), do_convert_rgb=True)


class Blip2Stage2(nn.Module):
    """Frozen image encoder → ln_vision → Q-Former(queries) → projection → frozen LLM.

    Trainable: ``ln_vision``, ``query_tokens``, ``qformer``, ``language_projection`` (and the
    image encoder when ``cfg.freeze_vision`` is False). The LLM never requires grad.
    """

    def __init__(self, cfg: ModelConfig, vision: FrozenImageEncoder, ln_vision: nn.LayerNorm,
                 query_tokens: torch.Tensor, qformer: nn.Module, language_projection: nn.Linear,
                 language_model: nn.Module, tokenizer, image_processor, image_token_id: int,
                 extra: dict[str, torch.Tensor] | None = None):
        super().__init__()
        self.cfg = cfg
        self.vision = vision
        self.ln_vision = ln_vision
        self.query_tokens = nn.Parameter(query_tokens)
        self.qformer = qformer
        self.language_projection = language_projection
        self.language_model = language_model
        self.language_model.requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_token_id = image_token_id
        # stage-1 parts stage 2 does not use (text embeddings, text FFNs, ITM/ITG heads, temp):
        # carried to `blip2_extra.safetensors` so an export loses nothing (a dict keeps them out of state_dict)
        self.extra = dict(extra or {})

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: ModelConfig) -> "Blip2Stage2":
        """Frozen encoder from ``vision_path``, frozen LLM from ``llm_path``; Q-Former, queries and
        ``ln_vision`` from ``stage1_checkpoint`` when set (else BERT-initialised from ``qformer_init``)."""
        from transformers import Blip2QFormerModel

        cfg = dataclasses.replace(cfg)
        cfg.validate()
        if not cfg.llm_path or not cfg.vision_path:
            raise ValueError("stage 2 needs model.llm_path (the frozen LLM) and model.vision_path (the image encoder)")
        if not (cfg.stage1_checkpoint or cfg.qformer_init):
            raise ValueError("stage 2 needs model.stage1_checkpoint (or model.qformer_init for a BERT-initialised Q-Former)")
        stage1 = read_stage1_checkpoint(cfg.stage1_checkpoint) if cfg.stage1_checkpoint else None
        if stage1 is not None and not cfg.qformer_init:
            cfg.qformer_init = stage1["config"].get("qformer_init", "")
        if stage1 is not None:  # stage 1's trained ln_vision is loaded below; its eps must be stage 1's too
            cfg.ln_vision_init = saved_ln_vision_init(stage1["config"], cfg.vision)
        # an unfrozen encoder keeps fp32 master weights (autocast does the rest)
        vision = FrozenImageEncoder.from_pretrained(cfg.vision, cfg.vision_path,
                                                    cfg.frozen_dtype if cfg.freeze_vision else "float32",
                                                    trainable=not cfg.freeze_vision, weights=cfg.frozen_weights,
                                                    image_size=cfg.image_size)
        ln_vision = make_ln_vision(vision, cfg.ln_vision_init)
        qcfg = stage2_qformer_config(cfg, vision.width, cfg.stage1_checkpoint)
        qformer = Blip2QFormerModel(qcfg)
        query_tokens = torch.randn(1, cfg.num_query_tokens, qcfg.hidden_size) * qcfg.initializer_range  # N(0, 0.02)
        llm, tokenizer = load_llm(cfg, resolve_llm_dtype(cfg, torch.cuda.is_available()))
        image_id = add_image_token(tokenizer, llm)
        projection = nn.Linear(qcfg.hidden_size, llm.get_input_embeddings().embedding_dim)  # d_llm
        model = cls(cfg, vision, ln_vision, query_tokens, qformer, projection, llm, tokenizer,
                    blip_image_processor(cfg.image_size), image_id)
        if stage1 is not None:
            model.load_stage1(stage1["state_dict"])
        elif cfg.qformer_init:
            bert_to_qformer(model.qformer, cfg.qformer_init)
        return model

    def load_stage1(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Take ``ln_vision``, ``query_tokens`` and the query path of ``qformer`` from a stage-1
        state dict; everything text-only is kept in ``self.extra``."""
        mine, self.extra = split_stage1_state_dict(state_dict, self.trainable_state_dict().keys())
        self.load_trainable_state_dict(mine, strict_keys=("query_tokens", "ln_vision.", "qformer."))

    # -- the forward path -----------------------------------------------------------------
    @property
    def llm_dtype(self) -> torch.dtype:
        return self.language_model.get_input_embeddings().weight.dtype

    def image_prompts(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``pixel_values [B, 3, H, W]`` → soft prompts ``[B, Q, d_llm]`` in the LLM's dtype."""
        feats = self.vision(pixel_values)                                   # [B, N, Dv], frozen dtype
        feats = self.ln_vision(feats.to(self.ln_vision.weight.dtype))
        queries = self.query_tokens.expand(feats.shape[0], -1, -1)
        mask = torch.ones(feats.shape[:-1], dtype=torch.long, device=feats.device)
        out = self.qformer(query_embeds=queries, encoder_hidden_states=feats,
                           encoder_attention_mask=mask).last_hidden_state  # [B, Q, H] fp32
        return self.language_projection(out).to(self.llm_dtype)

    def _with_prompts(self, prompts: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        embeds = self.language_model.get_input_embeddings()(input_ids.to(prompts.device))
        ones = torch.ones(prompts.shape[:2], dtype=attention_mask.dtype, device=prompts.device)
        return torch.cat([prompts, embeds], 1), torch.cat([ones, attention_mask.to(prompts.device)], 1)

    def text_batch(self, texts: list[str], split_points: list[int] | None = None) -> dict[str, torch.Tensor]:
        if self.cfg.llm_family == "opt":
            return causal_lm_batch(self.tokenizer, texts, self.cfg.max_text_len, self.cfg.prompt)
        split_points = random_split_points(texts) if split_points is None else split_points
        return prefix_lm_batch(self.tokenizer, texts, split_points, self.cfg.max_text_len, self.cfg.prompt)

    def llm_precision(self, device: torch.device):
        """The frozen LLM's own precision, whatever autocast the trainable parts run under: an
        fp16/bf16 LLM under autocast of its dtype (LAVIS: OPT in the outer fp16 AMP, FlanT5 in a
        nested bf16 autocast), an fp32 one with autocast off."""
        half = self.llm_dtype in (torch.float16, torch.bfloat16)
        return torch.autocast(device.type, dtype=self.llm_dtype if half else torch.float32, enabled=half)

    def lm_outputs(self, pixel_values: torch.Tensor, texts: list[str],
                   split_points: list[int] | None = None) -> dict[str, torch.Tensor]:
        """``loss``, ``logits`` and the ``labels`` they were scored against (OPT: ``[B, Q+T]``
        including the ignored query positions; T5: decoder labels ``[B, T_dec]``)."""
        prompts = self.image_prompts(pixel_values)
        batch = {k: v.to(prompts.device) for k, v in self.text_batch(texts, split_points).items()}
        with self.llm_precision(prompts.device):
            return self._lm_loss(prompts, batch)

    def _lm_loss(self, prompts: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        inputs_embeds, attention_mask = self._with_prompts(prompts, batch["input_ids"], batch["attention_mask"])
        if self.cfg.llm_family == "opt":
            logits = self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask).logits
            ignored = torch.full(prompts.shape[:2], IGNORE, dtype=torch.long, device=prompts.device)
            labels = torch.cat([ignored, batch["labels"]], 1)
            targets = labels[:, 1:]
            if (targets != IGNORE).any():
                loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
            else:  # e.g. a prompt longer than max_text_len: nothing to learn, keep the graph
                loss = logits.float().sum() * 0.0
            return {"loss": loss, "logits": logits, "labels": labels}
        out = self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                  decoder_attention_mask=batch["decoder_attention_mask"], labels=batch["labels"])
        return {"loss": out.loss.float(), "logits": out.logits, "labels": batch["labels"]}

    def forward(self, pixel_values: torch.Tensor, texts: list[str],
                split_points: list[int] | None = None) -> dict[str, torch.Tensor]:
        """``pixel_values [B, 3, H, W]``, ``B`` captions → ``{"loss", "loss_lm"}`` (scalars, fp32)."""
        loss = self.lm_outputs(pixel_values, texts, split_points)["loss"]
        return {"loss": loss, "loss_lm": loss.detach()}

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.cfg.llm_train_mode:  # a frozen LLM is still in train mode in LAVIS (dropout on)
            self.language_model.eval()
        return self

    # -- generation -------------------------------------------------------------------------
    def prompt_batch(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Prompt ids as the LLM expects them: OPT ``[BOS] prompt`` left-padded; T5 ``prompt </s>``."""
        if self.cfg.llm_family == "opt":
            rows = [[self.tokenizer.bos_token_id] + self.tokenizer(p, add_special_tokens=False).input_ids
                    for p in prompts]
            return {"input_ids": _pad(rows, self.tokenizer.pad_token_id, left=True),
                    "attention_mask": _pad([[1] * len(r) for r in rows], 0, left=True)}
        enc = self.tokenizer(prompts, padding="longest", return_tensors="pt")
        return {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask}

    def generation_defaults(self) -> dict:
        """Greedy, 30 new tokens; OPT stops at the newline it was trained to end captions with."""
        defaults = {"max_new_tokens": 30, "num_beams": 1, "do_sample": False,
                    "pad_token_id": self.tokenizer.pad_token_id}
        if self.cfg.llm_family == "opt":
            newline = self.tokenizer("\n", add_special_tokens=False).input_ids
            eos = [self.tokenizer.eos_token_id] + (newline[:1] if len(newline) == 1 else [])
            defaults["eos_token_id"] = list(dict.fromkeys(eos))
        return defaults

    @torch.no_grad()
    def generate_ids(self, pixel_values: torch.Tensor, prompt: str | list[str] = "", **generate_kwargs) -> torch.Tensor:
        """New token ids ``[B * num_return_sequences, L]`` (the prompt is not repeated)."""
        batch_size = pixel_values.shape[0]
        prompts = [prompt] * batch_size if isinstance(prompt, str) else list(prompt)
        if len(prompts) != batch_size:
            raise ValueError(f"got {len(prompts)} prompts for {batch_size} images")
        soft = self.image_prompts(pixel_values)
        batch = self.prompt_batch(prompts)
        inputs_embeds, attention_mask = self._with_prompts(soft, batch["input_ids"], batch["attention_mask"])
        kwargs = {**self.generation_defaults(), **generate_kwargs}
        was_training = self.language_model.training
        self.language_model.eval()  # generation never samples dropout masks, whatever mode the model is in
        try:
            with self.llm_precision(soft.device):
                return self.language_model.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                                    **kwargs)
        finally:
            self.language_model.train(was_training)

    def generate(self, pixel_values: torch.Tensor, prompt: str | list[str] = "", **generate_kwargs) -> list[str]:
        """Decoded, stripped continuations of ``prompt`` (one per image and returned sequence)."""
        ids = self.generate_ids(pixel_values, prompt, **generate_kwargs)
        return [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    def preprocess(self, images) -> torch.Tensor:
        """PIL images / HWC uint8 arrays → ``pixel_values [B, 3, S, S]`` fp32 (BLIP-2 preprocessing)."""
        return self.image_processor(images, return_tensors="pt")["pixel_values"]

    # -- trainable state --------------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Every parameter that trains (names as in ``state_dict``); the frozen LLM/encoder are not in it."""
        return {k: v.detach() for k, v in self.named_parameters() if v.requires_grad}

    def load_trainable_state_dict(self, state_dict: dict[str, torch.Tensor],
                                  strict_keys: tuple[str, ...] | None = None) -> None:
        """Load trainable weights; refuse unknown keys and (unless ``strict_keys`` limits the check
        to some prefixes) missing ones."""
        params = dict(self.named_parameters())
        expected = self.trainable_state_dict().keys()
        unknown = sorted(set(state_dict) - set(params))
        missing = sorted(k for k in expected if k not in state_dict
                         and (strict_keys is None or k.startswith(strict_keys)))
        if unknown or missing:
            raise KeyError(f"trainable state mismatch: unknown {unknown[:5]}, missing {missing[:5]}")
        with torch.no_grad():
            for k, v in state_dict.items():
                if params[k].shape != v.shape:
                    raise ValueError(f"{k}: checkpoint shape {tuple(v.shape)} != model {tuple(params[k].shape)}")
                params[k].copy_(v.to(params[k].dtype))

    # -- checkpoints = HF directories -------------------------------------------------------
    def save_pretrained(self, out_dir: str | Path) -> None:
        """Write a ``Blip2ForConditionalGeneration`` directory (config, safetensors, processor,
        tokenizer) plus ``blip2_config.json`` (and ``blip2_extra.safetensors`` when stage-1 extras
        exist). With a ``clip_vit_l`` encoder HF has no place for the tower: see ``hf_export_stage2``."""
        save_stage2(self, Path(out_dir))

    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides) -> "Blip2Stage2":
        """Our checkpoints and plain HF ``Blip2ForConditionalGeneration`` directories (local or
        s3://). ``overrides`` replace ModelConfig fields (e.g. ``llm_dtype``, ``frozen_dtype``)."""
        return load_stage2(cls, local_dir(str(path)), overrides)

    @classmethod
    def from_lavis(cls, state_dict: dict[str, torch.Tensor] | str | Path, cfg: ModelConfig) -> "Blip2Stage2":
        """A LAVIS stage-2 state dict (``Blip2OPT``/``Blip2T5`` keys; a ``.pth`` with a ``model``
        entry or a safetensors file) on top of the encoder and LLM that ``cfg`` names."""
        return load_lavis_stage2(cls, state_dict, cfg)

    def config_dict(self) -> dict:
        return dataclasses.asdict(self.cfg)

