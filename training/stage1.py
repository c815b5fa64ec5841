"""BLIP-2 stage 1 (paper §3.2): a Q-Former learns to read a frozen image encoder with ITC + ITM + ITG.

Shapes: ``B`` batch, ``N`` image tokens of width ``Dv``, ``Q`` queries, ``H`` Q-Former width,
``E`` = ``embed_dim``, ``T`` text length, ``V`` vocabulary (BERT + ``[DEC]``).

Dtypes: the frozen encoder runs in ``frozen_dtype``; its output is cast to fp32 before the
trainable ``ln_vision`` and everything after it (Q-Former, heads, temperature) is fp32 (use
autocast for mixed precision). Similarities and losses are computed in fp32.

``forward(pixel_values, texts)`` is what the trainer calls (under DDP): texts are tokenised here,
features are gathered across ranks with :mod:`training.distributed` (no process group needed for
a single process), losses come from :mod:`training.losses`.

Where this differs from LAVIS ``Blip2Qformer`` (and why):

* ITM negatives: LAVIS masks only the diagonal; we also exclude captions token-identical to the
  positive (they are positives, not negatives). Rows with no candidate (global batch of 1, all
  captions equal) get no negative instead of LAVIS' ``softmax([-1e4]) = 1`` → the positive
  itself labelled "no match"; non-finite weights fall back to uniform over the candidates. One
  batched ``multinomial`` per direction instead of a per-row ``.item()`` loop (no host syncs).
* ITG: one pass over ``[queries; text]`` with the multimodal causal mask instead of reusing the
  ITC query pass' ``past_key_values`` — the same function (queries never see text), simpler with
  HF modules, at the cost of recomputing the queries.
* Text is padded to the longest caption (to the longest across ranks only for the ITM gather),
  not to ``max_length``; padding is masked, so outputs are the same, compute is lower.
* Gathers accept different per-rank batch sizes (LAVIS requires equal ones).
* ``ln_vision`` starts fresh with LAVIS' eps 1e-5 (``model.ln_vision_init=copy``: the EVA
  tower's trained one, eps 1e-6 as HF's ``post_layernorm``). Its output stays fp32 (LAVIS casts
  back to the encoder's fp16); the Q-Former is fp32 as in HF.
* Keys follow HF (``qformer.*``, ``embeddings.*``) not ``Qformer.bert.*``;
  :func:`training.hf_io.load_lavis_state_dict` maps LAVIS checkpoints.
* The component losses are returned as well as their sum (LAVIS returns them in its output).
"""
from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.storage import local_dir, staged_output
from training.config import ModelConfig, saved_ln_vision_init
from training.distributed import all_gather_no_grad, all_gather_with_grad, gather_sizes, global_max, rank
from training.encoders import FrozenImageEncoder, make_ln_vision
from training.losses import IGNORE_INDEX, itc_loss, itg_loss, itm_loss, sample_hard_negatives
from training.qformer import (ItgHead, bidirectional_mask, init_from_bert, multimodal_causal_mask, qformer_config,
                              run_qformer)

CONFIG_FILE = "blip2_config.json"
QFORMER_CONFIG_FILE = "qformer_config.json"
WEIGHTS_FILE = "model.safetensors"
TIED_KEYS = ("itg_head.predictions.decoder.weight",)  # = embeddings.word_embeddings.weight


def load_tokenizer(path: str):
    """BERT tokenizer with ``[DEC]`` as ``bos_token`` (added last: id = BERT vocab size)."""
    from transformers import BertTokenizer

    tok = BertTokenizer.from_pretrained(path, trust_remote_code=False)
    if tok.bos_token != "[DEC]":
        tok.add_special_tokens({"bos_token": "[DEC]"})
    return tok


class Blip2Stage1(nn.Module):
    """Frozen image encoder + ``ln_vision`` + Q-Former with the three stage-1 heads.

    Submodule names are the checkpoint keys: ``vision`` (frozen, never saved), ``ln_vision``,
    ``query_tokens [1, Q, H]``, ``embeddings`` (HF ``Blip2TextEmbeddings``), ``qformer`` (HF
    ``Blip2QFormerModel``), ``vision_proj``/``text_proj`` (H → E), ``itm_head`` (H → 2),
    ``itg_head`` (BERT LM head, decoder tied to the word embeddings), ``temp`` (scalar, 0.07).
    """

    def __init__(self, cfg: ModelConfig, vision: FrozenImageEncoder, tokenizer, qcfg):
        super().__init__()
        from transformers import Blip2QFormerModel
        from transformers.models.blip_2.modeling_blip_2 import Blip2TextEmbeddings

        if cfg.max_text_len > qcfg.max_position_embeddings:
            raise ValueError(f"max_text_len {cfg.max_text_len} > Q-Former positions {qcfg.max_position_embeddings}")
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.vision = vision
        self.ln_vision = make_ln_vision(vision, cfg.ln_vision_init)
        H = qcfg.hidden_size
        self.query_tokens = nn.Parameter(torch.randn(1, cfg.num_query_tokens, H) * qcfg.initializer_range)
        self.embeddings = Blip2TextEmbeddings(qcfg)
        nn.init.normal_(self.embeddings.word_embeddings.weight, std=qcfg.initializer_range)
        nn.init.normal_(self.embeddings.position_embeddings.weight, std=qcfg.initializer_range)
        self.qformer = Blip2QFormerModel(qcfg)
        self.vision_proj = nn.Linear(H, cfg.embed_dim)
        self.text_proj = nn.Linear(H, cfg.embed_dim)
        self.itm_head = nn.Linear(H, 2)
        self.itg_head = ItgHead(qcfg, self.embeddings.word_embeddings)
        self.temp = nn.Parameter(torch.tensor(0.07))

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: ModelConfig) -> "Blip2Stage1":
        """Frozen encoder from ``cfg.vision_path``; Q-Former + tokenizer from the BERT dir ``cfg.qformer_init``."""
        from transformers import BertForMaskedLM

        vision = FrozenImageEncoder.from_pretrained(cfg.vision, cfg.vision_path, cfg.frozen_dtype,
                                                    trainable=not cfg.freeze_vision, weights=cfg.frozen_weights,
                                                    image_size=cfg.image_size)
        bert_dir = local_dir(cfg.qformer_init)
        tokenizer = load_tokenizer(bert_dir)
        bert = BertForMaskedLM.from_pretrained(bert_dir, dtype=torch.float32, trust_remote_code=False)
        qcfg = qformer_config(bert.config, len(tokenizer), vision.width, cfg.cross_attention_frequency,
                              tokenizer.pad_token_id)
        model = cls(cfg, vision, tokenizer, qcfg)
        init_from_bert(model.embeddings, model.qformer, model.itg_head, bert.state_dict())
        return model

    @classmethod
    def from_pretrained(cls, ckpt_dir: str, **overrides) -> "Blip2Stage1":
        """Rebuild from :meth:`save_pretrained` output or a plain transformers
        ``Blip2ForImageTextRetrieval`` directory (local or ``s3://``); ``overrides`` replace
        ModelConfig fields (e.g. ``vision_path``, ``frozen_dtype``). The BERT dir is not needed."""
        from transformers import Blip2QFormerConfig
        from safetensors.torch import load_file

        from training.hf_io import is_retrieval_dir

        path = Path(local_dir(str(ckpt_dir)))
        if not (path / CONFIG_FILE).exists() and is_retrieval_dir(path):
            return load_retrieval(cls, path, overrides)
        saved = json.loads((path / CONFIG_FILE).read_text())
        saved["ln_vision_init"] = saved_ln_vision_init(saved)  # its eps, as trained
        known = {f.name for f in fields(ModelConfig)}
        cfg = ModelConfig(**{k: v for k, v in {**saved, **overrides}.items() if k in known})
        vision = FrozenImageEncoder.from_pretrained(cfg.vision, cfg.vision_path, cfg.frozen_dtype,
                                                    trainable=not cfg.freeze_vision, weights=cfg.frozen_weights,
                                                    image_size=cfg.image_size)
        qcfg = Blip2QFormerConfig.from_json_file(str(path / QFORMER_CONFIG_FILE))
        model = cls(cfg, vision, load_tokenizer(str(path)), qcfg)
        model.load_trainable_state_dict(load_file(str(path / WEIGHTS_FILE)))
        return model

    # -- checkpoints ------------------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything but the frozen encoder (``vision.*``) and tied aliases; detached tensors."""
        keep_vision = not self.cfg.freeze_vision
        return {k: v for k, v in self.state_dict().items()
                if (keep_vision or not k.startswith("vision.")) and k not in TIED_KEYS}

    def load_trainable_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Load :meth:`trainable_state_dict` output; any missing trainable key or unknown key is an error."""
        missing, unexpected = self.load_state_dict(sd, strict=False)
        expected_missing = set(TIED_KEYS) | ({k for k in self.state_dict() if k.startswith("vision.")}
                                             if self.cfg.freeze_vision else set())
        missing = [k for k in missing if k not in expected_missing]
        if missing or unexpected:
            raise KeyError(f"stage-1 state dict mismatch: missing={missing} unexpected={list(unexpected)}")

    def save_pretrained(self, out_dir: str) -> None:
        """``model.safetensors`` (trainable weights) + ``blip2_config.json`` (ModelConfig) +
        ``qformer_config.json`` + tokenizer files, to a local dir or ``s3://`` prefix."""
        from safetensors.torch import save_file

        with staged_output(str(out_dir)) as target:
            save_file({k: v.detach().contiguous().cpu() for k, v in self.trainable_state_dict().items()},
                      str(target / WEIGHTS_FILE))
            (target / CONFIG_FILE).write_text(json.dumps(asdict(self.cfg), indent=2, default=list))
            self.qformer.config.to_json_file(str(target / QFORMER_CONFIG_FILE))
            self.tokenizer.save_pretrained(str(target))

    # -- encoders ---------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.query_tokens.device

    @property
    def num_queries(self) -> int:
        return self.query_tokens.shape[1]

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids [B, T] long, attention_mask [B, T] long)``: ``[CLS] … [SEP]``, padded to the
        longest, truncated at ``max_text_len``."""
        tok = self.tokenizer(list(texts), padding="longest", truncation=True, max_length=self.cfg.max_text_len,
                             return_tensors="pt")
        return tok.input_ids.to(self.device), tok.attention_mask.to(self.device)

    def encode_image(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``pixel_values [B, 3, S, S]`` → ``(image_embeds [B, N, Dv] after ln_vision (fp32, or the autocast dtype),
        image_feat [B, Q, E] L2-normalised)``; queries attend only to queries (uni-modal)."""
        frozen = self.vision(pixel_values)
        image_embeds = self.ln_vision(frozen.to(self.ln_vision.weight.dtype))
        device_type = image_embeds.device.type
        if torch.is_autocast_enabled(device_type):
            # Cast once: otherwise every cross-attention K/V projection (6 layers × 2 × 5 passes)
            # casts the same [B, N, Dv] tensor again; the matmuls see identical operands.
            image_embeds = image_embeds.to(torch.get_autocast_dtype(device_type))
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        hidden = run_qformer(self.qformer, queries, self.num_queries, None, image_embeds)
        return image_embeds, F.normalize(self.vision_proj(hidden), dim=-1)

    def encode_text(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``texts`` → ``(input_ids [B, T], attention_mask [B, T], text_feat [B, E] L2-normalised)``
        from the ``[CLS]`` output of a text-only pass (uni-modal)."""
        input_ids, attention_mask = self.tokenize(texts)
        hidden = run_qformer(self.qformer, self.embeddings(input_ids=input_ids), 0,
                             bidirectional_mask(0, attention_mask), None)
        return input_ids, attention_mask, F.normalize(self.text_proj(hidden[:, 0]), dim=-1)

    def _multimodal(self, image_embeds: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        queries = self.query_tokens.expand(input_ids.shape[0], -1, -1)
        embeds = self.embeddings(input_ids=input_ids, query_embeds=queries)
        return run_qformer(self.qformer, embeds, self.num_queries, mask, image_embeds)

    def itm_logits(self, image_embeds: torch.Tensor, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor) -> torch.Tensor:
        """Match logits ``[B, 2]`` (class 1 = match) for pairs (image i, text i), bi-directional mask,
        ``itm_head`` averaged over the query outputs."""
        hidden = self._multimodal(image_embeds, input_ids, bidirectional_mask(self.num_queries, attention_mask))
        return self.itm_head(hidden[:, : self.num_queries]).mean(dim=1)

    def itg_logits(self, image_embeds: torch.Tensor, decoder_input_ids: torch.Tensor,
                   attention_mask: torch.Tensor) -> torch.Tensor:
        """Next-token logits ``[B, T, V]`` for ``decoder_input_ids`` (``[DEC]`` first), multimodal causal mask."""
        hidden = self._multimodal(image_embeds, decoder_input_ids,
                                  multimodal_causal_mask(self.num_queries, attention_mask))
        return self.itg_head(hidden[:, self.num_queries:])

    # -- training step ----------------------------------------------------------------------
    def forward(self, pixel_values: torch.Tensor, texts: list[str], *,
                itm_negatives: tuple[torch.Tensor, torch.Tensor] | None = None,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Stage-1 losses for a local batch; ``loss = loss_itc + loss_itm + loss_itg`` (fp32 scalars).

        ``itm_negatives`` = ``(neg_text_idx [B], neg_image_idx [B])`` global indices (``-1``: none)
        replaces hard-negative sampling (tests); ``generator`` seeds the sampling.
        """
        with torch.no_grad():
            # ALBEF/BLIP's clamp; BLIP-2's blip2_qformer has none. Inactive while temp stays in
            # (0.001, 0.5) (it starts at 0.07): a guard against a runaway logit scale (docs/lavis_differences.md)
            self.temp.clamp_(0.001, 0.5)
        image_embeds, image_feat = self.encode_image(pixel_values)
        input_ids, attention_mask, text_feat = self.encode_text(texts)
        B, device = input_ids.shape[0], input_ids.device

        # ITC over the global batch: other ranks' features are constants (see training.distributed)
        sizes = gather_sizes(B, device)  # one size exchange for every gather below
        offset = sum(sizes[: rank()])
        loss_itc, sim_i2t, sim_t2i = itc_loss(image_feat, text_feat, all_gather_no_grad(image_feat, sizes),
                                              all_gather_no_grad(text_feat, sizes), self.temp, offset)

        # ITM: B positives + one hard negative text per image + one hard negative image per text
        pad = global_max(input_ids.shape[1], device) - input_ids.shape[1]
        ids = F.pad(input_ids, (0, pad), value=self.tokenizer.pad_token_id)
        mask = F.pad(attention_mask, (0, pad), value=0)
        ids_all, mask_all = all_gather_no_grad(ids, sizes), all_gather_no_grad(mask, sizes)
        image_embeds_all = all_gather_with_grad(image_embeds, sizes)
        if itm_negatives is None:
            candidates = (ids[:, None, :] != ids_all[None, :, :]).any(dim=-1)  # a different caption
            neg_text, neg_image = sample_hard_negatives(sim_i2t, sim_t2i, candidates, generator)
        else:
            neg_text, neg_image = (t.to(device) for t in itm_negatives)
        has_img, has_txt = neg_image >= 0, neg_text >= 0
        pair_images = torch.cat([image_embeds, image_embeds_all[neg_image[has_img]], image_embeds[has_txt]])
        pair_ids = torch.cat([ids, ids[has_img], ids_all[neg_text[has_txt]]])
        pair_mask = torch.cat([mask, mask[has_img], mask_all[neg_text[has_txt]]])
        labels = torch.zeros(pair_ids.shape[0], dtype=torch.long, device=device)
        labels[:B] = 1
        loss_itm = itm_loss(self.itm_logits(pair_images, pair_ids, pair_mask), labels)

        # ITG: [DEC] replaces [CLS]; queries carry the image, text is generated left to right
        decoder_ids = input_ids.clone()
        decoder_ids[:, 0] = self.tokenizer.bos_token_id
        targets = decoder_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        loss_itg = itg_loss(self.itg_logits(image_embeds, decoder_ids, attention_mask), targets)

        loss = loss_itc + loss_itm + loss_itg
        return {"loss": loss, "loss_itc": loss_itc, "loss_itm": loss_itm, "loss_itg": loss_itg}


def load_retrieval(cls, path: Path, overrides: dict):
    """``cls`` (``Blip2Stage1``) from a plain ``Blip2ForImageTextRetrieval`` directory; ``overrides``
    replace ModelConfig fields (``frozen_dtype``, ``max_text_len``, ...)."""
    from safetensors.torch import load_file
    from torch import nn
    from transformers import Blip2ForImageTextRetrieval

    from training.encoders import DTYPES, cast_tower
    from training.hf_io import EXTRA_FILE, RENAMES_TO_HF

    hf = Blip2ForImageTextRetrieval.from_pretrained(str(path), dtype=torch.float32, trust_remote_code=False)
    config = hf.config
    cfg = ModelConfig(**{"vision": "eva_vit_g", "image_size": config.vision_config.image_size,
                         "num_query_tokens": config.num_query_tokens, "embed_dim": config.image_text_hidden_size,
                         "cross_attention_frequency": config.qformer_config.cross_attention_frequency,
                         "ln_vision_init": "copy", **overrides})
    weights = hf.state_dict()  # before post_layernorm leaves the tower (it is our ln_vision)
    tower = hf.vision_model
    ln = tower.post_layernorm
    tower.post_layernorm = nn.Identity()
    vision = FrozenImageEncoder("eva_vit_g", cast_tower(tower, DTYPES[cfg.frozen_dtype], cfg.frozen_weights), ln)
    model = cls(cfg, vision, load_tokenizer(str(path)), config.qformer_config)
    back = {theirs: ours for ours, theirs in RENAMES_TO_HF.items() if ours != "vision.model."}
    sd = {}
    for key, value in weights.items():
        prefix = next((p for p in back if key.startswith(p)), None)
        if prefix:
            sd[back[prefix] + key[len(prefix):]] = value
        elif not key.startswith("vision_model."):
            sd[key] = value
    extra = path / EXTRA_FILE
    if extra.exists():
        sd.update(load_file(str(extra)))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    optional = set(TIED_KEYS) | (set() if extra.exists() else
                                 {k for k in model.state_dict() if k.startswith("itg_head.") or k == "temp"})
    missing = [k for k in missing if not k.startswith("vision.") and k not in optional]
    if missing or unexpected:
        raise KeyError(f"{path}: Blip2ForImageTextRetrieval weights do not fit: missing={missing} "
                       f"unexpected={list(unexpected)}")
    return model
