"""The captioner: BLIP (``BlipForConditionalGeneration``) writes N nucleus-sampled captions per image.

The sampler is BLIP's ``generate(sample=True)``: repetition penalty, minimum length, then
top-k and top-p, in the order HF ``generate`` applies them; lengths count the prompt ids.

Sampling is made reproducible per image, not per batch: every generated row (image ``key``,
sample ``j``) draws its random numbers from its own generator seeded by ``(seed, key, j)``.
So the captions of an image do not depend on which batch, actor or machine it landed on,
and a rerun after a crash rewrites identical shards.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch
from transformers import (LogitsProcessor, MinLengthLogitsProcessor, RepetitionPenaltyLogitsProcessor,
                          TopKLogitsWarper, TopPLogitsWarper)

from capfilt.blip_decoding import BlipSampleDecoder


def row_seed(seed: int, key: str, sample: int) -> int:
    """A 63-bit seed for sample ``sample`` of image ``key`` (stable across processes and Python versions)."""
    digest = hashlib.sha256(f"{seed}\x00{key}\x00{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def row_uniforms(seed: int, keys: list[str], samples: int, steps: int) -> torch.Tensor:
    """[len(keys) * samples, steps] float64: the draws of row ``b * samples + j`` (image ``keys[b]``, sample j)."""
    return torch.stack([torch.rand(steps, generator=torch.Generator().manual_seed(row_seed(seed, k, j)),
                                   dtype=torch.float64) for k in keys for j in range(samples)])


def resolve_device_dtype(dtype: str) -> tuple[torch.device, torch.dtype]:
    """``auto``: float16 on CUDA (as the spec asks for frozen GPU models), float32 on CPU."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dtype == "auto":
        return device, torch.float16 if device.type == "cuda" else torch.float32
    return device, getattr(torch, dtype)


class SeededSampler(LogitsProcessor):
    """The last logits processor: draws the token itself.

    It must come after the warpers (top-k, top-p), which have already masked the scores; it
    samples one token per row by inverse CDF with that row's pre-drawn uniform
    ``u[row, step]`` and returns scores that are -inf everywhere else, so picking the best
    token (or a multinomial draw) can only pick that one. (HF ``generate`` puts a custom
    processor *before* its own warpers: to use it there, pass ``top_k=0, top_p=1.0`` and put
    ``TopKLogitsWarper``, ``TopPLogitsWarper`` ahead of it in ``logits_processor``.)
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


def blip_decode(tokenizer, ids: torch.Tensor, prompt: str) -> list[str]:
    """BLIP's decode (``models/blip.py``): the whole sequence, prompt included, with the clean-up
    of tokenization spaces that transformers 4.x did by default (``a man's dog``, not ``a man ' s
    dog``; transformers 5 no longer does unless asked), then ``len(prompt)`` characters cut."""
    texts = tokenizer.batch_decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=True)
    return [t[len(prompt):].strip() for t in texts]


class Captioner:
    """BLIP captioner loaded from a local ``save_pretrained`` directory.

    ``__call__(pixel_values [B, 3, H, W] float32, keys [B]) -> [B][N] str``: N captions per
    image, prompt removed, in sample order. Decoding shares each image's work between its N
    samples (``capfilt.blip_decoding``); the samples are those of HF ``generate``.
    """

    def __init__(self, model_dir: str, *, prompt: str, num_captions: int, top_p: float, top_k: int,
                 repetition_penalty: float, min_length: int, max_length: int, seed: int, dtype: str = "auto"):
        from transformers import BlipForConditionalGeneration, BlipProcessor

        self.device, self.dtype = resolve_device_dtype(dtype)
        self.processor = BlipProcessor.from_pretrained(model_dir, trust_remote_code=False)
        self.model = BlipForConditionalGeneration.from_pretrained(model_dir, dtype=self.dtype, trust_remote_code=False)
        self.model.to(self.device).eval()
        self.decoder = BlipSampleDecoder(self.model.text_decoder)
        # As BlipForConditionalGeneration.generate: [DEC] replaces [CLS], the trailing [SEP] goes.
        prompt_ids = self.processor.tokenizer(prompt, return_tensors="pt").input_ids
        prompt_ids[:, 0] = self.model.config.text_config.bos_token_id
        self.prompt_ids, self.prompt = prompt_ids[:, :-1], prompt
        self.num_captions, self.seed = num_captions, seed
        self.top_p, self.top_k, self.repetition_penalty = top_p, top_k, repetition_penalty
        # min_length / max_length count the prompt ids, as BLIP passes them to HF generate.
        self.min_length, self.max_length = min_length, max_length
        self.max_new_tokens = max_length - self.prompt_ids.shape[1]
        if self.max_new_tokens < 1:
            raise ValueError(f"max_length={max_length} leaves no token after the {self.prompt_ids.shape[1]} prompt ids")

    def logits_processors(self, uniforms: torch.Tensor) -> list:
        """HF generate's order: penalty, min length, then the warpers; the seeded draw last."""
        eos = self.model.config.text_config.sep_token_id
        out = []
        if self.repetition_penalty != 1.0:
            out.append(RepetitionPenaltyLogitsProcessor(float(self.repetition_penalty)))
        if self.min_length > 0:
            out.append(MinLengthLogitsProcessor(self.min_length, eos))
        if self.top_k:
            out.append(TopKLogitsWarper(self.top_k))
        if self.top_p < 1.0:
            out.append(TopPLogitsWarper(self.top_p))
        return out + [SeededSampler(uniforms, self.prompt_ids.shape[1])]

    def __call__(self, pixel_values: np.ndarray | torch.Tensor, keys: list[str]) -> list[list[str]]:
        if not keys:
            return []
        texts = blip_decode(self.processor.tokenizer, self.token_ids(pixel_values, keys), self.prompt)
        return [texts[b * self.num_captions : (b + 1) * self.num_captions] for b in range(len(keys))]

    @torch.inference_mode()
    def token_ids(self, pixel_values: np.ndarray | torch.Tensor, keys: list[str]) -> torch.Tensor:
        """[B * N, prompt + new] ids (prompt included); row b * N + j is sample j of image b."""
        pixels = torch.as_tensor(pixel_values).to(self.device, self.dtype)
        image_embeds = self.model.vision_model(pixel_values=pixels)[0]
        uniforms = row_uniforms(self.seed, keys, self.num_captions, self.max_new_tokens)
        cfg = self.model.config.text_config
        return self.decoder.generate(
            image_embeds, self.prompt_ids, num_samples=self.num_captions, max_new_tokens=self.max_new_tokens,
            eos_token_id=cfg.sep_token_id, pad_token_id=cfg.pad_token_id,
            logits_processors=self.logits_processors(uniforms)).cpu()
