"""The frozen tower's precision is LAVIS' (convert_weights_to_fp16): Linear/Conv weights in
``frozen_dtype``; LayerNorms, class and position embeddings stay, and run, in fp32."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.training.stage1_helpers import pixels
from training.encoders import MATMUL_LAYERS, FrozenImageEncoder

# max |half - fp32| over max |fp32| of the tower's features (seed 0: ~1e-3 fp16, ~1e-2 bf16)
TOLERANCE = {"float16": 5e-3, "bfloat16": 3e-2}


@pytest.fixture(scope="module")
def towers(tiny_models):
    return {"eva_vit_g": tiny_models["vision_eva"],
            "clip_vit_l": tiny_models["vision"]}


def record_dtypes(model: nn.Module) -> tuple[dict, list]:
    """Forward hooks: {kind: set of (input dtype, output dtype)} per layer kind."""
    seen = {"norm": set(), "matmul": set()}

    def hook(kind):
        return lambda module, args, out: seen[kind].add((args[0].dtype, out.dtype))

    handles = [m.register_forward_hook(hook("norm" if isinstance(m, nn.LayerNorm) else "matmul"))
               for m in model.modules() if isinstance(m, (nn.LayerNorm, *MATMUL_LAYERS))]
    return seen, handles


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("kind", ["eva_vit_g", "clip_vit_l"])
def test_only_matmul_weights_are_cast_and_norms_run_in_fp32(towers, kind, dtype):
    half = FrozenImageEncoder.from_pretrained(kind, str(towers[kind]), dtype)
    full = FrozenImageEncoder.from_pretrained(kind, str(towers[kind]), "float32")
    low = getattr(torch, dtype)
    assert half.dtype == low
    matmul = {f"{name}.{p}" for name, m in half.model.named_modules() if isinstance(m, MATMUL_LAYERS)
              for p, _ in m.named_parameters(recurse=False)}
    for name, param in half.model.named_parameters():
        assert param.dtype == (low if name in matmul else torch.float32), name
    kept = {n for n, _ in half.model.named_parameters() if n not in matmul}
    assert any("class_embedding" in n for n in kept) and any("position_embedding" in n for n in kept)
    assert any("layer_norm" in n or "layrnorm" in n for n in kept)

    seen, handles = record_dtypes(half.model)
    px = pixels(2, seed=3)
    out = half(px)
    for h in handles:
        h.remove()
    assert seen["norm"] == {(torch.float32, torch.float32)}   # LayerNorms see and give fp32
    assert {o for _, o in seen["matmul"]} == {low} and {i for i, _ in seen["matmul"]} == {low}
    assert out.dtype == torch.float32                           # the residual stream is fp32
    ref = full(px)
    assert (out - ref).abs().max() <= TOLERANCE[dtype] * ref.abs().max()


def test_eva_embeddings_are_summed_in_fp32_as_lavis(towers):
    """The fp16 patch projection upcast, class and position embeddings added in fp32 (LAVIS'
    EVA); HF's own forward casts them to fp16 first (fidelity review F7: 3.6e-4 at scale 1.16)."""
    tower = FrozenImageEncoder.from_pretrained("eva_vit_g", str(towers["eva_vit_g"]), "float16")
    emb = tower.model.embeddings
    px = pixels(2, seed=5)
    with torch.no_grad():
        got = emb(px)
        patches = emb.patch_embedding(px.half()).float().flatten(2).transpose(1, 2)
        want = torch.cat([emb.class_embedding.expand(2, 1, -1), patches], 1) + emb.position_embedding
        hf = type(emb).forward(emb, px)                                      # HF's sum, in fp16
    assert got.dtype == torch.float32 and emb.class_embedding.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert hf.dtype == torch.float16 and not torch.equal(hf.float(), got)


def test_frozen_weights_all_casts_every_parameter(towers):
    tower = FrozenImageEncoder.from_pretrained("eva_vit_g", str(towers["eva_vit_g"]), "float16", weights="all")
    assert {p.dtype for p in tower.model.parameters()} == {torch.float16}
    assert tower(pixels(1)).dtype == torch.float16
    with pytest.raises(ValueError, match="frozen_weights"):
        FrozenImageEncoder.from_pretrained("eva_vit_g", str(towers["eva_vit_g"]), "float16", weights="some")


def test_a_tower_built_for_another_resolution_is_refused_naming_the_key(towers):
    """``model.image_size`` is the one resolution (ingest, eval, preprocess): a tower whose
    position embeddings expect another one is refused when it is loaded."""
    assert FrozenImageEncoder.from_pretrained("clip_vit_l", str(towers["clip_vit_l"]), "float32", image_size=64)
    with pytest.raises(ValueError, match=r"model\.image_size=32 .* built for 64 px: set model\.image_size=64"):
        FrozenImageEncoder.from_pretrained("clip_vit_l", str(towers["clip_vit_l"]), "float32", image_size=32)
