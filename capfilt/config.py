"""Config section of CapFilt (``capfilt.*`` keys)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CapFiltConfig:
    input: str = "runs/download"
    output: str = "runs/capfilt"
    captioner: str = "Salesforce/blip-image-captioning-large"  # local dir / s3:// in save_pretrained layout
    ranker: str = "openai/clip-vit-large-patch14"
    prompt: str = "a picture of "
    num_captions: int = 10
    top_p: float = 0.9
    min_length: int = 5
    max_length: int = 30
    keep: int = 2
    batch_size: int = 16
