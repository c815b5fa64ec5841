"""N samples per image from BLIP's text decoder, sharing the per-image work between them.

``generate(num_return_sequences=N)`` copies every image N times before it decodes: it runs
the prompt N times and projects N copies of the image features in every cross-attention
layer, then attends with N separate one-row queries. Here, per image:

- the prompt runs once, and its self-attention keys/values are copied to the N samples;
- the cross-attention keys/values are projected once, and the queries of the N samples
  attend to them together (one [N, P] score matrix per head instead of N of [1, P]);
- self-attention keys/values go to a preallocated buffer instead of growing by concatenation.

Projections, output blocks, feed-forward and LM head are the model's own modules, and the
attention arithmetic is BLIP's (scaled dot product, softmax, no dropout in eval), so the
samples are ``generate``'s (a test compares them token for token).
"""
from __future__ import annotations

import math

import torch


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores + mask
    return torch.matmul(torch.softmax(scores, dim=-1), v)


class BlipSampleDecoder:
    """Decodes with a ``BlipTextLMHeadModel`` (``BlipForConditionalGeneration.text_decoder``) in eval mode."""

    def __init__(self, text_decoder):
        self.model = text_decoder
        self.layers = text_decoder.bert.encoder.layer
        attn = self.layers[0].attention.self
        self.heads, self.head_dim = attn.num_attention_heads, attn.attention_head_size

    def _split(self, x: torch.Tensor, groups: int) -> torch.Tensor:
        """[groups * n, L, heads * d] -> [groups, heads, n * L, d] (a view): a group's rows as one query block."""
        rows, length, _ = x.shape
        return x.view(groups, rows // groups * length, self.heads, self.head_dim).transpose(1, 2)

    def _merge(self, x: torch.Tensor, rows: int, length: int) -> torch.Tensor:
        """Inverse of ``_split``."""
        return x.transpose(1, 2).reshape(rows, length, self.heads * self.head_dim)

    def cross_keys_values(self, image_embeds: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the image features' keys and values [B, heads, P, d], once per image."""
        out = []
        for layer in self.layers:
            attn = layer.crossattention.self
            out.append(tuple(self._split(proj(image_embeds), image_embeds.shape[0]) for proj in (attn.key, attn.value)))
        return out

    def forward(self, input_ids: torch.Tensor, start: int, self_kv: list, cross_kv: list) -> torch.Tensor:
        """Logits (float32) of the last position for ``input_ids`` [R, L] at positions ``start..start+L-1``.

        Writes the new self-attention keys/values into ``self_kv`` buffers [R, heads, T, d];
        row r attends to the image of row ``r // (R // B)`` (``cross_kv`` holds B images).
        """
        rows, length = input_ids.shape
        emb = self.model.bert.embeddings
        positions = emb.position_embeddings.weight[start:start + length]
        hidden = emb.LayerNorm(emb.word_embeddings(input_ids) + positions)
        end = start + length
        causal = None
        if length > 1:
            causal = torch.full((length, end), float("-inf"), device=hidden.device, dtype=hidden.dtype).triu(start + 1)
        for layer, (k_buf, v_buf), (cross_k, cross_v) in zip(self.layers, self_kv, cross_kv):
            attn = layer.attention.self
            k_buf[:, :, start:end] = self._split(attn.key(hidden), rows)
            v_buf[:, :, start:end] = self._split(attn.value(hidden), rows)
            ctx = _attend(self._split(attn.query(hidden), rows), k_buf[:, :, :end], v_buf[:, :, :end], causal)
            hidden = layer.attention.output(self._merge(ctx, rows, length), hidden)
            cross = layer.crossattention.self
            groups = cross_k.shape[0]
            ctx = _attend(self._split(cross.query(hidden), groups), cross_k, cross_v)
            hidden = layer.crossattention.output(self._merge(ctx, rows, length), hidden)
            hidden = layer.output(layer.intermediate(hidden), hidden)
        return self.model.cls(hidden[:, -1]).float()

    def _buffers(self, rows: int, length: int, like: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        shape = (rows, self.heads, length, self.head_dim)
        return [(like.new_empty(shape), like.new_empty(shape)) for _ in self.layers]

    def generate(self, image_embeds: torch.Tensor, prompt_ids: torch.Tensor, *, num_samples: int,
                 max_new_tokens: int, logits_processors: list, eos_token_id: int, pad_token_id: int) -> torch.Tensor:
        """``[B * num_samples, prompt + new]`` token ids; rows ``b * num_samples + j`` belong to image b.

        Each step runs the ``logits_processors`` (HF ``LogitsProcessor``s) in order and takes the
        best token of their result, so the last one decides: a ``SeededSampler`` draws. A row
        that produced ``eos_token_id`` continues with ``pad_token_id``; decoding stops when
        every row has finished or after ``max_new_tokens``.
        """
        batch, prompt_len = image_embeds.shape[0], prompt_ids.shape[-1]
        rows = batch * num_samples
        prompt = prompt_ids.reshape(1, -1).to(image_embeds.device)
        ids = prompt.expand(rows, -1)
        if max_new_tokens == 0:
            return ids.clone()
        cross_kv = self.cross_keys_values(image_embeds)
        # The prompt once per image; its keys/values then fill the first positions of every sample.
        prompt_kv = self._buffers(batch, prompt_len, image_embeds)
        scores = self.forward(prompt.expand(batch, -1), 0, prompt_kv, cross_kv).repeat_interleave(num_samples, 0)
        self_kv = self._buffers(rows, prompt_len + max_new_tokens, image_embeds)
        for (k_buf, v_buf), (k, v) in zip(self_kv, prompt_kv):
            k_buf[:, :, :prompt_len] = k.repeat_interleave(num_samples, 0)
            v_buf[:, :, :prompt_len] = v.repeat_interleave(num_samples, 0)
        tokens = [ids]
        unfinished = torch.ones(rows, dtype=torch.bool, device=ids.device)
        for step in range(max_new_tokens):
            if step:
                scores = self.forward(tokens[-1], prompt_len + step - 1, self_kv, cross_kv)
            so_far = torch.cat(tokens, dim=1)
            for processor in logits_processors:
                scores = processor(so_far, scores)
            token = torch.where(unfinished, scores.argmax(-1), pad_token_id)
            tokens.append(token[:, None])
            unfinished &= token != eos_token_id
            if not unfinished.any():
                break
        return torch.cat(tokens, dim=1)
