"""Frozen image encoders: patch features ``[B, N, D]`` for the Q-Former to cross-attend to.

* ``eva_vit_g`` — EVA ViT-g/14 as stored in HF BLIP-2 checkpoints (``Blip2VisionModel``, 39 layers,
  width 1408). Its ``post_layernorm`` is BLIP-2's *trained* ``ln_vision``, so it is taken out of
  the frozen tower here; a new stage 1 starts ``ln_vision`` fresh as LAVIS does, and only
  ``model.ln_vision_init=copy`` (continuing from a BLIP-2 checkpoint) takes it (``ln_init``).
* ``clip_vit_l`` — CLIP ViT-L/14 (``CLIPVisionModel``) with the last layer removed (paper §3.1:
  second-to-last layer's features), all 257 tokens, no post-LayerNorm.

A frozen tower's precision is LAVIS' (``convert_weights_to_fp16``): only Linear/Conv weights and
biases take ``frozen_dtype``; LayerNorms and the class/position embeddings stay fp32. Each of
those layers casts its input to its own weight dtype, so the matmuls run in ``frozen_dtype`` and
the residual stream and LayerNorms in fp32 — what LAVIS' EVA gets from CUDA autocast (its class
and position embeddings are added in fp32 too), here on any device and without re-casting weights
every step. LAVIS' CLIP ViT-L runs its stream in fp16; here it is fp32 as EVA's (more precise).
``model.frozen_weights=all`` casts everything.
Frozen towers stay in eval mode and never require grad.
"""
from __future__ import annotations

import types

import torch
from torch import nn

from pipelines.storage import local_dir

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
MATMUL_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)  # the layers LAVIS casts to fp16
LAVIS_LN_EPS = 1e-5  # LAVIS' ln_vision: nn.LayerNorm's default


def _input_to_weight_dtype(module: nn.Module, args: tuple) -> tuple:
    dtype = module.weight.dtype
    return tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def _output_to_fp32(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return output.float()


def _eva_embeddings_fp32(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
    """``Blip2VisionEmbeddings.forward`` as LAVIS' EVA sums it: the patch projection (in the
    frozen dtype) upcast, then the fp32 class and position embeddings added in fp32 (HF casts them
    to the patch dtype first, one fp16 rounding of the whole stream's start)."""
    batch, _, height, width = pixel_values.shape
    patches = self.patch_embedding(pixel_values).float().flatten(2).transpose(1, 2)
    x = torch.cat([self.class_embedding.float().expand(batch, 1, -1), patches], dim=1)
    pos = self.interpolate_pos_encoding(x, height, width) if interpolate_pos_encoding else self.position_embedding
    return x + pos[:, : x.size(1)].float()


def cast_tower(model: nn.Module, dtype: torch.dtype, weights: str = "linear") -> nn.Module:
    """``linear``: Linear/Conv weights (and biases) in ``dtype``, the rest fp32, as LAVIS;
    ``all``: every parameter and buffer in ``dtype``. Either way a Linear/Conv layer (and a
    LayerNorm) casts its input to its weight dtype."""
    from transformers.models.blip_2.modeling_blip_2 import Blip2VisionEmbeddings

    if weights not in ("linear", "all"):
        raise ValueError(f"frozen_weights must be linear or all, got {weights!r}")
    model.to(dtype if weights == "all" else torch.float32)
    if dtype == torch.float32 or getattr(model, "_cast_hooks", False):
        return model
    for name, module in model.named_modules():
        if isinstance(module, MATMUL_LAYERS):
            module.to(dtype)
        if isinstance(module, (*MATMUL_LAYERS, nn.LayerNorm)):
            module.register_forward_pre_hook(_input_to_weight_dtype)
        if weights == "linear" and isinstance(module, Blip2VisionEmbeddings):
            module.forward = types.MethodType(_eva_embeddings_fp32, module)   # EVA: LAVIS' fp32 stream
        elif weights == "linear" and name.rsplit(".", 1)[-1] == "embeddings":
            # CLIP ViT-L: the stream is fp32 from here (LAVIS' own clip_vit runs it in fp16 under
            # autocast; fp32 is the more precise of the two, see docs/lavis_differences.md)
            module.register_forward_hook(_output_to_fp32)
    model._cast_hooks = True
    return model


def make_ln_vision(vision: "FrozenImageEncoder", init: str) -> nn.LayerNorm:
    """The trainable ``ln_vision``: ``fresh`` (weight 1, bias 0, LAVIS' eps) or ``copy`` of the
    tower's own final LayerNorm (weights and eps; EVA towers of BLIP-2 checkpoints only)."""
    if init == "fresh":
        return nn.LayerNorm(vision.width, eps=LAVIS_LN_EPS)
    ln = vision.ln_init[0]
    if init != "copy" or ln is None:
        raise ValueError(f"ln_vision_init={init!r}: fresh, or copy for an eva_vit_g tower (got {vision.kind})")
    out = nn.LayerNorm(vision.width, eps=ln.eps)
    out.load_state_dict(ln.float().state_dict())
    return out


class FrozenImageEncoder(nn.Module):
    def __init__(self, kind: str, model: nn.Module, ln_init: nn.LayerNorm | None, trainable: bool = False):
        super().__init__()
        self.kind = kind
        self.model = model
        self.dtype = next(m.weight.dtype for m in model.modules() if isinstance(m, MATMUL_LAYERS))
        self.ln_init = [ln_init]  # a list keeps it out of state_dict / parameters()
        self.trainable = trainable
        self.width = model.config.hidden_size
        if not trainable:
            self.model.requires_grad_(False)
            self.model.eval()

    @classmethod
    def from_pretrained(cls, kind: str, path: str, dtype: str = "float16", trainable: bool = False,
                        weights: str = "linear", image_size: int = 0):
        """``image_size``: the resolution the caller feeds (``model.image_size``); a tower built
        for another one is refused here rather than failing later on its position embeddings."""
        path = local_dir(path)
        if kind == "eva_vit_g":
            from transformers import Blip2VisionModel

            model = Blip2VisionModel.from_pretrained(path, dtype=torch.float32, trust_remote_code=False)
            ln = model.post_layernorm
            model.post_layernorm = nn.Identity()
        elif kind == "clip_vit_l":
            from transformers import CLIPVisionModel

            model = CLIPVisionModel.from_pretrained(path, dtype=torch.float32, trust_remote_code=False)
            tower = getattr(model, "vision_model", model)  # transformers 5 flattened CLIPVisionModel
            tower.encoder.layers = tower.encoder.layers[:-1]  # paper: use the second-to-last layer
            model.config.num_hidden_layers -= 1
            ln = None
        else:
            raise ValueError(f"unknown image encoder {kind!r} (eva_vit_g | clip_vit_l)")
        if image_size and image_size != model.config.image_size:
            raise ValueError(f"model.image_size={image_size} but the vision tower at {path} is built for "
                             f"{model.config.image_size} px: set model.image_size={model.config.image_size}")
        return cls(kind, cast_tower(model, DTYPES[dtype], weights), ln, trainable=trainable)

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.trainable:
            self.model.eval()  # frozen: dropout/drop-path stay off whatever the parent does
        return self

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``pixel_values [B, 3, H, W]`` → features ``[B, N, D]`` (the residual stream's dtype: fp32
        unless ``frozen_weights=all``)."""
        if self.trainable:  # fine-tuning: the trainer's autocast and grad mode apply as to any module
            return self.model(pixel_values=pixel_values.to(self.dtype)).last_hidden_state
        # Frozen: no graph, and the weights' own dtype outside the trainer's autocast (bf16
        # autocast would otherwise re-cast 1B fp16 weights every step and lose mantissa bits).
        with torch.no_grad(), torch.autocast(pixel_values.device.type, enabled=False):
            return self.model(pixel_values=pixel_values).last_hidden_state
