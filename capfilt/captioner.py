"""The captioner: BLIP (``BlipForConditionalGeneration``) writes N nucleus-sampled captions per image.

Sampling is made reproducible per image, not per batch: every generated row (image ``key``,
sample ``j``) draws its random numbers from its own generator seeded by ``(seed, key, j)``.
So the captions of an image do not depend on which batch, actor or machine it landed on,
and a rerun after a crash rewrites identical shards.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch
from transformers import LogitsProcessor


def row_seed(seed: int, key: str, sample: int) -> int:
    """A 63-bit seed for sample ``sample`` of image ``key`` (stable across processes and Python versions)."""
    digest = hashlib.sha256(f"{seed}\x00{key}\x00{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def resolve_device_dtype(dtype: str) -> tuple[torch.device, torch.dtype]:
    """``auto``: float16 on CUDA (as the spec asks for frozen GPU models), float32 on CPU."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dtype == "auto":
        return device, torch.float16 if device.type == "cuda" else torch.float32
    return device, getattr(torch, dtype)


class SeededSampler(LogitsProcessor):
    """Last logits processor of ``generate(do_sample=True)``: draws the token itself.

    HF's warpers (top-p here) have already masked the scores; this processor samples one
    token per row by inverse CDF with that row's pre-drawn uniform ``u[row, step]`` and
    returns scores that are -inf everywhere else, so HF's own multinomial draw (global RNG)
    can only pick that token.
    """

    def __init__(self, uniforms: torch.Tensor, prompt_len: int):
        self.uniforms = uniforms          # [rows, max_new_tokens] float64 in [0, 1)
        self.prompt_len = prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.prompt_len
        probs = torch.softmax(scores.float(), dim=-1).double()
        cdf = probs.cumsum(-1)
        u = self.uniforms[:, step : step + 1].to(cdf.device) * cdf[:, -1:]
        token = torch.searchsorted(cdf, u).clamp_(max=scores.shape[-1] - 1)
        # Never land on a token the warpers removed (can happen only at float round-off edges).
        token = torch.where(probs.gather(1, token) > 0, token, probs.argmax(-1, keepdim=True))
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, token, 0.0)


class Captioner:
    """BLIP captioner loaded from a local ``save_pretrained`` directory.

    ``__call__(pixel_values [B, 3, H, W] float32, keys [B]) -> [B][N] str``: N captions per
    image, prompt removed, in sample order.
    """

    def __init__(self, model_dir: str, *, prompt: str, num_captions: int, top_p: float,
                 min_length: int, max_length: int, seed: int, dtype: str = "auto"):
        from transformers import BlipForConditionalGeneration, BlipProcessor

        self.device, self.dtype = resolve_device_dtype(dtype)
        self.processor = BlipProcessor.from_pretrained(model_dir)
        self.model = BlipForConditionalGeneration.from_pretrained(model_dir, dtype=self.dtype)
        self.model.to(self.device).eval()
        self.prompt_ids = self.processor.tokenizer(prompt, return_tensors="pt").input_ids
        self.num_captions, self.top_p, self.seed = num_captions, top_p, seed
        self.min_length, self.max_length = min_length, max_length

    @torch.inference_mode()
    def __call__(self, pixel_values: np.ndarray | torch.Tensor, keys: list[str]) -> list[list[str]]:
        batch = len(keys)
        if batch == 0:
            return []
        pixels = torch.as_tensor(pixel_values).to(self.device, self.dtype)
        cfg = self.model.config.text_config
        image_embeds = self.model.vision_model(pixel_values=pixels)[0]
        # As BlipForConditionalGeneration.generate: [DEC] replaces [CLS], the trailing [SEP] goes.
        input_ids = self.prompt_ids.repeat(batch, 1).to(self.device)
        input_ids[:, 0] = cfg.bos_token_id
        input_ids = input_ids[:, :-1]
        prompt_len = input_ids.shape[1]
        # generate expands each image to num_captions consecutive rows: row = b * N + j.
        uniforms = torch.stack([
            torch.rand(self.max_length + 1, generator=torch.Generator().manual_seed(row_seed(self.seed, k, j)),
                       dtype=torch.float64)
            for k in keys for j in range(self.num_captions)
        ])
        out = self.model.text_decoder.generate(
            input_ids=input_ids, eos_token_id=cfg.sep_token_id, pad_token_id=cfg.pad_token_id,
            encoder_hidden_states=image_embeds,  # selects the cross-attention path; its K/V come from the cache
            encoder_attention_mask=torch.ones(image_embeds.shape[:2], dtype=torch.long, device=self.device),
            cache=self.cross_attention_cache(image_embeds),
            do_sample=True, top_p=self.top_p, top_k=0, temperature=1.0, num_return_sequences=self.num_captions,
            min_new_tokens=self.min_length, max_new_tokens=self.max_length,
            logits_processor=[SeededSampler(uniforms, prompt_len)],
        )
        texts = self.processor.tokenizer.batch_decode(out[:, prompt_len:], skip_special_tokens=True)
        texts = [t.strip() for t in texts]
        return [texts[b * self.num_captions : (b + 1) * self.num_captions] for b in range(batch)]

    def cross_attention_cache(self, image_embeds: torch.Tensor):
        """Cross-attention keys/values computed once per image, repeated for its N samples.

        ``generate`` would otherwise project N copies of every image's patch features in every
        decoder layer (N = 10: 90 % of that work is repeated; by a FLOP count it is most of
        BLIP-large's captioning work, and of its cache memory). The decoder layers reuse a cache that is
        already filled (``EncoderDecoderCache.is_updated``), so the samples are unchanged.
        """
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache

        cross = DynamicCache()
        for idx, layer in enumerate(self.model.text_decoder.bert.encoder.layer):
            attn = layer.crossattention.self
            shape = (*image_embeds.shape[:2], -1, attn.attention_head_size)
            for_samples = [attn.key(image_embeds), attn.value(image_embeds)]
            k, v = (t.view(shape).transpose(1, 2).repeat_interleave(self.num_captions, dim=0) for t in for_samples)
            cross.update(k, v, idx)
        return EncoderDecoderCache(DynamicCache(), cross)
