"""The Q-Former: transformers' BLIP-2 modules, initialised from BERT, plus what HF lacks.

Reused from ``transformers``: ``Blip2TextEmbeddings`` (word + position embeddings),
``Blip2QFormerModel`` (embedding LayerNorm → layers with self-attention, cross-attention to the
image every ``cross_attention_frequency`` layers for the query positions only, and separate
FFNs for queries and text). Written here: the three stage-1 attention masks, the ITG LM head
and the BERT initialisation (paper §3.1).

Sequence layout: ``[queries (Q) ; text (T)]``, hidden size ``H``. Masks are boolean
``[B, L, L]`` (True = may attend), ``L = Q + T``:

* uni-modal (ITC): queries and text do not see each other. Computed as two separate passes
  (queries alone, text alone), which is the same block-diagonal mask at lower cost.
* bi-directional (ITM): every position sees every non-padding position.
* multimodal causal (ITG): queries see only queries; text token ``t`` sees all queries and
  text tokens ``≤ t`` (not padding).

``Blip2QFormerModel.forward`` passes a 4-D mask through unchanged (``masking_utils
._preprocess_mask_arguments`` returns 4-D masks as-is), so :func:`run_qformer` calls the HF
module itself with the mask converted to the form its attention backend expects.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel
from transformers.models.blip_2.modeling_blip_2 import Blip2TextEmbeddings
from transformers.models.bert.modeling_bert import BertPredictionHeadTransform


# -- config and init from BERT ------------------------------------------------------------
def qformer_config(bert_config, vocab_size: int, encoder_hidden_size: int, cross_attention_frequency: int = 2,
                   pad_token_id: int = 0) -> Blip2QFormerConfig:
    """A ``Blip2QFormerConfig`` with BERT's shape, the enlarged vocab (+[DEC]) and text input on."""
    return Blip2QFormerConfig(
        vocab_size=vocab_size, hidden_size=bert_config.hidden_size, num_hidden_layers=bert_config.num_hidden_layers,
        num_attention_heads=bert_config.num_attention_heads, intermediate_size=bert_config.intermediate_size,
        hidden_act=bert_config.hidden_act, hidden_dropout_prob=bert_config.hidden_dropout_prob,
        attention_probs_dropout_prob=bert_config.attention_probs_dropout_prob,
        max_position_embeddings=bert_config.max_position_embeddings, initializer_range=bert_config.initializer_range,
        layer_norm_eps=bert_config.layer_norm_eps, pad_token_id=pad_token_id,
        cross_attention_frequency=cross_attention_frequency, encoder_hidden_size=encoder_hidden_size,
        use_qformer_text_input=True,
    )


class LmPredictions(nn.Module):
    """BERT LM prediction head; decoder weight tied to the word embeddings (as in LAVIS)."""

    def __init__(self, config: Blip2QFormerConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.decoder.weight = word_embeddings.weight
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(hidden)) + self.bias


class ItgHead(nn.Module):
    """``hidden [B, T, H]`` → logits ``[B, T, V]``. Keys mirror BERT/LAVIS ``cls.predictions.*``."""

    def __init__(self, config: Blip2QFormerConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.predictions = LmPredictions(config, word_embeddings)
        std = config.initializer_range
        nn.init.normal_(self.predictions.transform.dense.weight, std=std)
        nn.init.zeros_(self.predictions.transform.dense.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.predictions(hidden)


def init_from_bert(embeddings: Blip2TextEmbeddings, qformer: Blip2QFormerModel, itg_head: ItgHead,
                   bert_sd: dict[str, torch.Tensor]) -> None:
    """Copy a ``BertForMaskedLM`` state dict into the Q-Former (paper §3.1).

    Word/position embeddings, embedding LayerNorm, self-attention and FFN are copied; the query
    FFN is a copy of the text FFN; cross-attention keeps its fresh init; the LM head comes from
    ``cls.predictions``. The extra ``[DEC]`` row(s) of the enlarged vocab keep their N(0, 0.02)
    init. Token-type embeddings and the pooler are not used by the Q-Former.
    """
    sd = {k.removeprefix("bert."): v for k, v in bert_sd.items()}

    def copy(dst: torch.Tensor, src: torch.Tensor) -> None:
        with torch.no_grad():
            if dst.shape == src.shape:
                dst.copy_(src)
            else:  # vocab rows: BERT's first, the added [DEC] row(s) keep their init
                dst[: src.shape[0]].copy_(src)

    copy(embeddings.word_embeddings.weight, sd["embeddings.word_embeddings.weight"])
    copy(embeddings.position_embeddings.weight, sd["embeddings.position_embeddings.weight"])
    copy(qformer.layernorm.weight, sd["embeddings.LayerNorm.weight"])
    copy(qformer.layernorm.bias, sd["embeddings.LayerNorm.bias"])
    for i, layer in enumerate(qformer.encoder.layer):
        p = f"encoder.layer.{i}."
        for name in ("query", "key", "value"):
            for kind in ("weight", "bias"):
                copy(getattr(getattr(layer.attention.attention, name), kind), sd[f"{p}attention.self.{name}.{kind}"])
        for kind in ("weight", "bias"):
            copy(getattr(layer.attention.output.dense, kind), sd[f"{p}attention.output.dense.{kind}"])
            copy(getattr(layer.attention.output.LayerNorm, kind), sd[f"{p}attention.output.LayerNorm.{kind}"])
            for intermediate, output in ((layer.intermediate, layer.output),
                                         (layer.intermediate_query, layer.output_query)):
                copy(getattr(intermediate.dense, kind), sd[f"{p}intermediate.dense.{kind}"])
                copy(getattr(output.dense, kind), sd[f"{p}output.dense.{kind}"])
                copy(getattr(output.LayerNorm, kind), sd[f"{p}output.LayerNorm.{kind}"])
    head = itg_head.predictions
    for kind in ("weight", "bias"):
        copy(getattr(head.transform.dense, kind), sd[f"cls.predictions.transform.dense.{kind}"])
        copy(getattr(head.transform.LayerNorm, kind), sd[f"cls.predictions.transform.LayerNorm.{kind}"])
    copy(head.bias, sd["cls.predictions.bias"])


# -- masks --------------------------------------------------------------------------------
def bidirectional_mask(num_queries: int, text_mask: torch.Tensor) -> torch.Tensor:
    """ITM: ``text_mask [B, T]`` (1 = token) → ``[B, Q+T, Q+T]`` bool, every position sees all tokens."""
    keys = torch.cat([text_mask.new_ones(text_mask.shape[0], num_queries), text_mask], dim=1).bool()
    return keys[:, None, :].expand(-1, keys.shape[1], -1)


def multimodal_causal_mask(num_queries: int, text_mask: torch.Tensor) -> torch.Tensor:
    """ITG: ``[B, Q+T, Q+T]`` bool; queries see queries, text sees all queries + text up to itself."""
    B, T = text_mask.shape
    L = num_queries + T
    pos = torch.arange(L, device=text_mask.device)
    is_query = pos < num_queries
    allowed = is_query[None, :] & torch.ones(L, 1, dtype=torch.bool, device=pos.device)  # everyone sees queries
    allowed = allowed | (~is_query[:, None] & ~is_query[None, :] & (pos[None, :] <= pos[:, None]))
    keys = bidirectional_mask(num_queries, text_mask)
    return allowed[None] & keys


def attention_bias(mask: torch.Tensor, attn_implementation: str | None, dtype: torch.dtype) -> torch.Tensor:
    """``[B, L, L]`` bool → the 4-D ``[B, 1, L, L]`` mask the HF attention backend takes.

    ``eager`` adds the mask to the scores (0 / dtype-min); ``sdpa`` takes booleans.
    """
    mask = mask[:, None]
    if attn_implementation in (None, "eager"):
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    if attn_implementation == "sdpa":
        return mask
    raise ValueError(f"Q-Former attention {attn_implementation!r} not supported (eager | sdpa)")


def run_qformer(qformer: Blip2QFormerModel, embeds: torch.Tensor, num_queries: int, mask: torch.Tensor | None,
                image_embeds: torch.Tensor | None) -> torch.Tensor:
    """Q-Former over ``embeds [B, L, H]`` (queries first) with a ``[B, L, L]`` bool mask.

    ``image_embeds [B, N, Dv]`` are cross-attended by the query positions (``None`` for a
    text-only pass, then ``num_queries`` must be 0). ``mask=None`` means no masking. Returns the
    last hidden states ``[B, L, H]`` in fp32.
    """
    bias = None
    if mask is not None:
        bias = attention_bias(mask, qformer.config._attn_implementation, embeds.dtype)
    return qformer(query_embeds=embeds, query_length=num_queries, attention_mask=bias,
                   encoder_hidden_states=image_embeds).last_hidden_state
