"""A small model with the BLIP-2 model interface, for fast checkpoint tests (tests/training/test_checkpoint.py).

Frozen conv "image encoder" + trainable projection, a bag-of-words text encoder (crc32
buckets, so every process hashes alike), a contrastive loss and an auxiliary regression loss,
plus dropout so RNG restore matters.
"""
from __future__ import annotations

import json
import time
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

BUCKETS = 512


class ToyModel(nn.Module):
    def __init__(self, dim: int = 32):
        super().__init__()
        self.vision = nn.Conv2d(3, 16, 8, stride=8)
        self.vision.requires_grad_(False)
        self.img_proj = nn.Linear(16, dim)
        self.words = nn.EmbeddingBag(BUCKETS, dim, mode="mean")
        self.norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(0.1)
        self.temp = nn.Parameter(torch.tensor(0.07))

    @classmethod
    def from_config(cls, cfg) -> "ToyModel":
        return cls()

    def _text_ids(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, offsets = [], []
        for t in texts:
            offsets.append(len(ids))
            ids += [zlib.crc32(w.encode()) % BUCKETS for w in (t.split() or ["<empty>"])]
        return torch.tensor(ids), torch.tensor(offsets)

    def forward(self, pixel_values: torch.Tensor, texts: list[str]) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            feats = self.vision(pixel_values).mean(dim=(2, 3))
        img = F.normalize(self.norm(self.drop(self.img_proj(feats))), dim=-1)
        ids, offsets = self._text_ids(texts)
        txt = F.normalize(self.words(ids.to(img.device), offsets.to(img.device)), dim=-1)
        logits = img @ txt.t() / self.temp.clamp(min=1e-3)
        target = torch.arange(len(texts), device=img.device)
        loss_itc = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
        loss_aux = (img - txt).pow(2).sum(-1).mean()
        return {"loss": loss_itc + 0.1 * loss_aux, "loss_itc": loss_itc, "loss_aux": loss_aux}

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v for k, v in self.state_dict().items() if k in names}

    def load_trainable_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.load_state_dict(sd, strict=False)
        assert not unexpected, unexpected

    def save_pretrained(self, out_dir: str) -> None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        save_file(self.trainable_state_dict(), str(Path(out_dir) / "model.safetensors"))
        (Path(out_dir) / "config.json").write_text(json.dumps({"model": "toy"}))

    @classmethod
    def from_pretrained(cls, d: str) -> "ToyModel":
        m = cls()
        m.load_trainable_state_dict(load_file(str(Path(d) / "model.safetensors")))
        return m


class SlowToyModel(ToyModel):
    """A toy whose forward takes a second, like a real step: long enough for a signal that arrives
    mid-run (a reclaim notice) to land between steps of a 6-step run."""

    def forward(self, pixel_values: torch.Tensor, texts: list[str]) -> dict[str, torch.Tensor]:
        time.sleep(1.0)
        return super().forward(pixel_values, texts)
