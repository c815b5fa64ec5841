"""The NSFW and aesthetic heads: LAION's architectures, their published weight layouts, our folder layout."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from capfilt.heads import (aesthetic_state_from_laion, build_head, load_head, nsfw_state_from_keras, save_head,
                           score)


def keras_nsfw_reference(x: np.ndarray, weights: list[np.ndarray]) -> np.ndarray:
    """What the Keras model computes: normalise, Normalization, 3 x Dense+ReLU, Dense+sigmoid (float64)."""
    mean, var, _, *dense = weights
    h = x / np.linalg.norm(x, axis=1, keepdims=True)
    h = (h - mean) / np.maximum(np.sqrt(var), 1e-7)
    for i in range(3):
        h = np.maximum(h @ dense[2 * i] + dense[2 * i + 1], 0)
    return 1 / (1 + np.exp(-(h @ dense[6] + dense[7])))[:, 0]


def test_nsfw_head_from_keras_weights_matches_keras_semantics(tmp_path):
    rng = np.random.default_rng(0)
    dims = [(768, 64), (64, 512), (512, 256), (256, 1)]
    weights = [rng.normal(0, 0.03, 768), rng.uniform(0.0005, 0.002, 768), np.array(1000)]
    for fan_in, fan_out in dims:
        weights += [rng.normal(0, 1 / np.sqrt(fan_in), (fan_in, fan_out)), rng.normal(0, 0.1, fan_out)]
    head = build_head("nsfw", 768)
    head.load_state_dict(nsfw_state_from_keras(weights), strict=True)
    save_head(head, "nsfw", tmp_path / "nsfw")
    kind, loaded = load_head(str(tmp_path / "nsfw"))
    x = rng.normal(size=(64, 768)).astype(np.float32)
    assert kind == "nsfw"
    np.testing.assert_allclose(score(loaded, x), keras_nsfw_reference(x.astype(np.float64), weights),
                               rtol=1e-4, atol=1e-5)
    assert score(loaded, x.astype(np.float16)).dtype == np.float32
    with pytest.raises(ValueError, match="11 arrays"):
        nsfw_state_from_keras(weights[:9])


def test_aesthetic_heads_load_laion_state_dicts(tmp_path):
    torch.manual_seed(0)
    mlp = {k: v for k, v in build_head("aesthetic_mlp", 768).state_dict().items()}
    assert sorted(mlp) == sorted(f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias"))
    kind, state = aesthetic_state_from_laion(mlp)   # the published .pth's keys, unchanged
    head = build_head(kind, 768)
    head.load_state_dict(state, strict=True)
    x = np.random.default_rng(1).normal(size=(8, 768)).astype(np.float32)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    ref = xn
    for i in (0, 2, 4, 6, 7):   # no activations, dropout off at inference
        ref = ref @ state[f"layers.{i}.weight"].numpy().T + state[f"layers.{i}.bias"].numpy()
    np.testing.assert_allclose(score(head, x), ref[:, 0], rtol=1e-4, atol=1e-5)
    w, b = torch.randn(1, 768), torch.randn(1)
    kind, state = aesthetic_state_from_laion({"weight": w, "bias": b})
    linear = build_head(kind, 768)
    linear.load_state_dict(state)
    np.testing.assert_allclose(score(linear, x), (xn @ w.numpy().T + b.numpy())[:, 0], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="not a LAION aesthetic"):
        aesthetic_state_from_laion({"fc.weight": w})


def test_head_folder_on_s3_and_bad_folders(tmp_path, s3_bucket):
    import fsspec

    save_head(build_head("aesthetic_linear", 32), "aesthetic_linear", tmp_path / "lin")
    fs = fsspec.filesystem("s3")
    fs.put(str(tmp_path / "lin") + "/", f"{s3_bucket}/heads/lin/", recursive=True)
    kind, head = load_head(f"{s3_bucket}/heads/lin")
    x = np.random.default_rng(2).normal(size=(4, 32)).astype(np.float32)
    np.testing.assert_allclose(score(head, x), score(load_head(str(tmp_path / "lin"))[1], x), atol=1e-6)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_head(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="unknown head kind"):
        build_head("clip", 32)
    with pytest.raises(ValueError, match="is not a 'nsfw' head"):
        save_head(head, "nsfw", tmp_path / "wrong")
