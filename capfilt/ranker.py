"""The ranker: CLIP (``CLIPModel``) scores each caption by the cosine of L2-normalised embeddings.

Captions longer than the text encoder's context are truncated (counted); a caption that
tokenises to nothing but the special tokens gets score -inf and can never be kept (counted).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from capfilt.captioner import resolve_device_dtype


@dataclass
class TextEmbeddings:
    emb: torch.Tensor          # [T, D] float32, L2-normalised
    empty: torch.Tensor        # [T] bool: no content tokens
    truncated: torch.Tensor    # [T] bool: longer than the text encoder's context


class Ranker:
    """CLIP loaded from a local ``save_pretrained`` directory."""

    def __init__(self, model_dir: str, dtype: str = "auto"):
        from transformers import AutoTokenizer, CLIPModel

        self.device, self.dtype = resolve_device_dtype(dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
        self.model = CLIPModel.from_pretrained(model_dir, dtype=self.dtype, trust_remote_code=False).to(self.device).eval()
        self.max_tokens = self.model.config.text_config.max_position_embeddings
        self.special_ids = torch.tensor(sorted(set(self.tokenizer.all_special_ids)))
        self.chunks, self.min_chunk = 3, 32  # text batches per call: ~3 length buckets of >= 32 captions

    @torch.inference_mode()
    def embed_images(self, pixel_values: np.ndarray | torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, D] float32, L2-normalised."""
        pixels = torch.as_tensor(pixel_values).to(self.device, self.dtype)
        emb = self.model.get_image_features(pixel_values=pixels).pooler_output
        return torch.nn.functional.normalize(emb.float(), dim=-1)

    @torch.inference_mode()
    def embed_texts(self, texts: list[str]) -> TextEmbeddings:
        # One tokenizer pass (it is the ranker's CPU cost): full lengths tell what gets truncated.
        if not texts:
            dim, none = self.model.config.projection_dim, torch.zeros(0, dtype=torch.bool)
            return TextEmbeddings(torch.zeros(0, dim), none, none)
        full = self.tokenizer(texts, add_special_tokens=True, truncation=False).input_ids
        truncated = torch.tensor([len(ids) > self.max_tokens for ids in full])
        lengths = [min(len(ids), self.max_tokens) for ids in full]
        emb = torch.empty(len(full), self.model.config.projection_dim)
        empty = torch.empty(len(full), dtype=torch.bool)
        # Shortest first, a few chunks each padded to its own longest: less compute spent on padding.
        order = sorted(range(len(full)), key=lambda i: lengths[i])
        step = max(self.min_chunk, -(-len(order) // self.chunks))
        for start in range(0, len(order), step):
            rows = order[start:start + step]
            input_ids, attention_mask = self._pad([full[i] for i in rows], max(lengths[i] for i in rows))
            content = ~torch.isin(input_ids, self.special_ids) & attention_mask.bool()
            empty[rows] = ~content.any(dim=1)
            out = self.model.get_text_features(input_ids=input_ids.to(self.device),
                                               attention_mask=attention_mask.to(self.device)).pooler_output
            emb[rows] = torch.nn.functional.normalize(out.float(), dim=-1).cpu()
        return TextEmbeddings(emb, empty, truncated)

    def _pad(self, token_lists: list[list[int]], width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Cut as HF's truncation does (content cut, the closing special token kept) and right-pad."""
        input_ids = torch.full((len(token_lists), width), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(token_lists), width), dtype=torch.long)
        for i, ids in enumerate(token_lists):
            ids = ids if len(ids) <= width else ids[: width - 1] + ids[-1:]
            input_ids[i, : len(ids)] = torch.tensor(ids)
            attention_mask[i, : len(ids)] = 1
        return input_ids, attention_mask

    def score(self, pixel_values, captions: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor, TextEmbeddings]:
        """Images [B, 3, H, W] and a list of captions each -> (scores [B, C] float32, image_emb [B, D],
        texts [sum of the list lengths], in row order), C the longest list.

        ``scores[b, c]`` is the cosine of image b and its caption c; -inf where the caption is
        empty or where row b has fewer than c + 1 captions.
        """
        lengths = [len(row) for row in captions]
        image_emb = self.embed_images(pixel_values).cpu()
        texts = self.embed_texts([c for row in captions for c in row])
        scores = torch.full((len(captions), max(lengths, default=0)), float("-inf"))
        start = 0
        for b, n in enumerate(lengths):
            row = texts.emb[start:start + n] @ image_emb[b]
            scores[b, :n] = row.masked_fill(texts.empty[start:start + n], float("-inf"))
            start += n
        return scores, image_emb, texts


def select(captions: list[str], scores: list[float] | np.ndarray, keep: int,
           keep_original: bool = False) -> list[int] | None:
    """Indices of the captions to keep, best first; ``captions[0]`` is the original web caption.

    Empty captions (score -inf) are never kept, and an exact duplicate text counts once (its
    first occurrence, so the original wins a tie with an identical synthetic caption). With
    ``keep_original`` the original comes first and the best synthetic captions follow.
    None when fewer than ``keep`` distinct usable captions exist.
    """
    seen, usable = set(), []
    for i, (text, score) in enumerate(zip(captions, scores)):
        if np.isfinite(score) and text.strip() not in seen:
            seen.add(text.strip())
            usable.append(i)
    ranked = sorted(usable, key=lambda i: (-scores[i], i))
    if keep_original and usable and usable[0] == 0:
        ranked = [0] + [i for i in ranked if i != 0]
    return ranked[:keep] if len(ranked) >= keep else None
