"""Config sections of the training layer (``model.*``, ``train.*``, ``eval.*`` keys)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ModelConfig:
    vision: str = "eva_vit_g"          # eva_vit_g (Blip2VisionModel) | clip_vit_l (CLIPVisionModel)
    vision_path: str = ""              # save_pretrained directory (local or s3://)
    qformer_init: str = ""             # bert-base-uncased layout directory; empty: random init
    num_query_tokens: int = 32
    image_size: int = 224
    frozen_dtype: str = "float16"      # float16 | bfloat16 | float32


@dataclass
class TrainConfig:
    stage: int = 1
    input: str = "runs/capfilt"
    output: str = "runs/train"
    steps: int = 250_000
    batch_size: int = 32               # per worker micro-batch
    lr: float = 1e-4


@dataclass
class EvalConfig:
    k_test: int = 128
