"""Stage-1 objectives of BLIP-2 (paper §3.2) as pure functions of features and logits.

Shapes: ``B`` local batch, ``G`` global batch (all ranks), ``Q`` queries, ``E`` embed dim,
``T`` text length, ``V`` vocabulary. Similarities and losses are computed in fp32.

* ITC (:func:`itc_loss`) — image-text similarity = max over the ``Q`` query features of the
  cosine to the text ``[CLS]`` feature, divided by the learnable temperature; cross-entropy
  against the matching index in the global batch, both directions averaged, label smoothing 0.1.
* ITM hard negatives (:func:`sample_hard_negatives`) — one negative text per image and one
  negative image per text, drawn from the softmax of the global-batch similarities with
  non-candidates masked. The model's candidate rule masks the diagonal *and* every index whose
  caption is token-for-token identical to the positive one (such a "negative" is a positive).
  Degenerate rows: if the masked softmax is not a finite distribution (non-finite similarities)
  the negative is drawn uniformly among the candidates; a row with no candidate at all (global
  batch of 1, or every caption identical) gets index ``-1`` = no negative, and the ITM loss is
  taken over the remaining pairs. Never a crash, never a NaN.
* ITG (:func:`itg_loss`) — next-token cross-entropy over the text (shifted by one), label
  smoothing 0.1, padding (``-100``) ignored.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

LABEL_SMOOTHING = 0.1
IGNORE_INDEX = -100


def itc_similarities(image_feat: torch.Tensor, text_feat_all: torch.Tensor) -> torch.Tensor:
    """``image_feat [B, Q, E]`` × ``text_feat_all [G, E]`` → max-over-queries cosine ``[B, G]`` (fp32)."""
    return torch.einsum("bqe,ge->bgq", image_feat.float(), text_feat_all.float()).amax(dim=-1)


def itc_loss(image_feat: torch.Tensor, text_feat: torch.Tensor, image_feat_all: torch.Tensor,
             text_feat_all: torch.Tensor, temp: torch.Tensor, offset: int,
             label_smoothing: float = LABEL_SMOOTHING) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Image-text contrastive loss of the local rows against the global batch.

    ``image_feat [B, Q, E]`` and ``text_feat [B, E]`` are this rank's L2-normalised features,
    ``*_all`` the gathered ones (``[G, Q, E]``, ``[G, E]``); local row ``i`` matches global
    column ``offset + i``. Returns ``(loss, sim_i2t [B, G], sim_t2i [B, G])``, similarities
    already divided by ``temp``.
    """
    sim_i2t = itc_similarities(image_feat, text_feat_all) / temp
    sim_t2i = itc_similarities(image_feat_all, text_feat).t() / temp
    targets = torch.arange(image_feat.shape[0], device=image_feat.device) + offset
    loss = (F.cross_entropy(sim_i2t, targets, label_smoothing=label_smoothing)
            + F.cross_entropy(sim_t2i, targets, label_smoothing=label_smoothing)) / 2
    return loss, sim_i2t, sim_t2i


def negative_weights(sim: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Sampling distribution ``[B, G]`` for hard negatives (rows of zeros where none exists).

    ``sim [B, G]`` similarities, ``candidates [B, G]`` bool (False on the diagonal and on
    duplicates of the positive). A row whose masked softmax is not finite falls back to uniform
    over its candidates; a row without candidates stays all-zero.
    """
    logits = sim.detach().float().masked_fill(~candidates, float("-inf"))
    weights = torch.nan_to_num(torch.softmax(logits, dim=1), nan=0.0, posinf=0.0, neginf=0.0)
    finite = torch.isfinite(logits).any(dim=1, keepdim=True) & (weights.sum(dim=1, keepdim=True) > 0.5)
    uniform = candidates.float() / candidates.sum(dim=1, keepdim=True).clamp(min=1)
    return torch.where(finite, weights, uniform)


def sample_from(weights: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One index per row of ``weights [B, G]``; ``-1`` for rows that are all zero. ``[B]`` long."""
    has = weights.sum(dim=1) > 0
    safe = torch.where(has[:, None], weights, torch.ones_like(weights))  # multinomial rejects zero rows
    idx = torch.multinomial(safe, 1, generator=generator).squeeze(1)
    return torch.where(has, idx, torch.full_like(idx, -1))


def sample_hard_negatives(sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, candidates: torch.Tensor,
                          generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(neg_text_idx [B], neg_image_idx [B])``: global indices, ``-1`` where no negative exists.

    ``neg_text_idx[i]`` is a text for local image ``i`` (from ``sim_i2t``), ``neg_image_idx[i]``
    an image for local text ``i`` (from ``sim_t2i``).
    """
    neg_text = sample_from(negative_weights(sim_i2t, candidates), generator)
    neg_image = sample_from(negative_weights(sim_t2i, candidates), generator)
    return neg_text, neg_image


def itm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Image-text matching cross-entropy: ``logits [n, 2]`` (class 1 = match), ``labels [n]`` long."""
    return F.cross_entropy(logits.float(), labels)


def itg_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = LABEL_SMOOTHING) -> torch.Tensor:
    """Captioning loss: ``logits [B, T, V]`` predict ``labels [B, T]`` shifted by one (``-100`` ignored)."""
    shifted = logits[:, :-1].float()
    targets = labels[:, 1:]
    return F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing)
