"""Small scoring heads over the CLIP ViT-L/14 image embedding (LAION's aesthetic predictor and NSFW detector).

On disk a head is a folder: ``config.json`` (``{"kind": ..., "input_dim": ...}``) and
``model.safetensors`` (its state dict), local or ``s3://``. LAION's published weights convert
into that layout with :func:`aesthetic_state_from_laion` (the ``.pth`` state dicts) and
:func:`nsfw_state_from_keras` (the Keras model's ``get_weights()`` list); see the README.

Kinds:
  aesthetic_mlp     improved-aesthetic-predictor (``sac+logos+ava1-l14-linearMSE``): Linear 1024 →
                    128 → 64 → 16 → 1 with dropout between and no activations, on the L2-normalised
                    embedding; the output is a 1-10 rating.
  aesthetic_linear  LAION-Aesthetics predictor V1: one Linear(dim, 1).
  nsfw              LAION's CLIP-based NSFW detector (an AutoKeras MLP): Keras Normalization (feature
                    mean/variance), Dense 64 → 512 → 256 (ReLU) → 1 (sigmoid) on the L2-normalised
                    embedding; the output is the probability the image is unsafe.
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch
from torch import nn

KINDS = ("aesthetic_mlp", "aesthetic_linear", "nsfw")
KERAS_EPSILON = 1e-7  # Keras' backend.epsilon(): the Normalization layer's floor on the std


class AestheticMLP(nn.Module):
    def __init__(self, input_dim: int):
        super().__init__()
        self.input_dim = input_dim
        # Same module names as the published state dict (layers.0/2/4/6/7): it loads unchanged.
        self.layers = nn.Sequential(nn.Linear(input_dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128),
                                    nn.Dropout(0.2), nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16),
                                    nn.Linear(16, 1))

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.layers(nn.functional.normalize(emb, dim=-1)).squeeze(-1)


class AestheticLinear(nn.Module):
    def __init__(self, input_dim: int):
        super().__init__()
        self.input_dim = input_dim
        self.linear = nn.Linear(input_dim, 1)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.linear(nn.functional.normalize(emb, dim=-1)).squeeze(-1)


class NsfwMLP(nn.Module):
    def __init__(self, input_dim: int):
        super().__init__()
        self.input_dim = input_dim
        self.register_buffer("mean", torch.zeros(input_dim))
        self.register_buffer("variance", torch.ones(input_dim))
        self.dense = nn.ModuleList([nn.Linear(input_dim, 64), nn.Linear(64, 512), nn.Linear(512, 256),
                                    nn.Linear(256, 1)])

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        x = nn.functional.normalize(emb, dim=-1)
        x = (x - self.mean) / self.variance.sqrt().clamp_min(KERAS_EPSILON)
        for layer in self.dense[:-1]:
            x = torch.relu(layer(x))
        return torch.sigmoid(self.dense[-1](x)).squeeze(-1)


_CLASSES = {"aesthetic_mlp": AestheticMLP, "aesthetic_linear": AestheticLinear, "nsfw": NsfwMLP}


def build_head(kind: str, input_dim: int) -> nn.Module:
    if kind not in _CLASSES:
        raise ValueError(f"unknown head kind {kind!r}; kinds: {', '.join(KINDS)}")
    return _CLASSES[kind](input_dim).eval()


def save_head(head: nn.Module, kind: str, out: str | os.PathLike) -> str:
    """Write ``head`` in the folder layout :func:`load_head` reads (local folder)."""
    from safetensors.torch import save_file

    if not isinstance(head, _CLASSES.get(kind, ())):
        raise ValueError(f"a {type(head).__name__} is not a {kind!r} head")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump({"kind": kind, "input_dim": int(head.input_dim)}, f)
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, os.path.join(out, "model.safetensors"))
    return str(out)


def load_head(uri: str) -> tuple[str, nn.Module]:
    """(kind, head in eval mode) from a local or ``s3://`` head folder; every weight must be present."""
    from safetensors.torch import load_file

    from pipelines.storage import local_dir

    path = local_dir(uri)
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{uri}: no config.json (a head folder holds config.json + model.safetensors)")
    with open(config_path) as f:
        config = json.load(f)
    head = build_head(config.get("kind", ""), int(config["input_dim"]))
    head.load_state_dict(load_file(os.path.join(path, "model.safetensors")), strict=True)
    return config["kind"], head


@torch.inference_mode()
def score(head: nn.Module, emb: np.ndarray, device: str = "cpu", batch: int = 8192) -> np.ndarray:
    """[N, D] embeddings (any float dtype) -> [N] float32 scores."""
    head = head.to(device)
    out = np.empty(len(emb), np.float32)
    for start in range(0, len(emb), batch):
        x = torch.as_tensor(np.asarray(emb[start:start + batch], np.float32), device=device)
        out[start:start + batch] = head(x).float().cpu().numpy()
    return out


# -- LAION's published weights -> our layout ------------------------------------------------
def aesthetic_state_from_laion(state: dict) -> tuple[str, dict]:
    """(kind, state dict) from a LAION aesthetic ``.pth`` (improved MLP or V1 linear)."""
    if "layers.0.weight" in state:
        return "aesthetic_mlp", dict(state)
    if set(state) == {"weight", "bias"}:
        return "aesthetic_linear", {"linear.weight": state["weight"], "linear.bias": state["bias"]}
    raise ValueError(f"not a LAION aesthetic predictor state dict (keys {sorted(state)[:4]}…)")


def nsfw_state_from_keras(weights: list[np.ndarray]) -> dict:
    """The NSFW head's state dict from the Keras model's ``get_weights()``:
    [mean, variance, count, kernel1, bias1, …, kernel4, bias4] (Keras kernels are [in, out])."""
    if len(weights) != 11:
        raise ValueError(f"expected 11 arrays (normalization mean/variance/count + 4 dense layers), got {len(weights)}")
    mean, variance, _count, *dense = (np.asarray(w, np.float32) for w in weights)
    state = {"mean": torch.from_numpy(mean.reshape(-1)), "variance": torch.from_numpy(variance.reshape(-1))}
    for i in range(4):
        state[f"dense.{i}.weight"] = torch.from_numpy(dense[2 * i].T.copy())
        state[f"dense.{i}.bias"] = torch.from_numpy(dense[2 * i + 1])
    return state
