"""Decode each image once and make both models' pixel tensors from that one decoded image.

Only the image processors' small config files are fetched (not the weights), so CPU decode
workers never copy a multi-GB model directory from S3. The processors' recipes (resize,
center crop, rescale, normalize) run as ``ImageTransform``s: transformers' PIL-backend
arithmetic in PIL + NumPy, so a decode worker never imports transformers or torch (~5 s of
CPU per worker process, paid again by every worker an autoscaler adds).
"""
from __future__ import annotations

import io
import math
import tempfile
import warnings
from dataclasses import dataclass
from functools import cached_property

import fsspec
import numpy as np
from PIL import Image

from pipelines.images import IMAGE_FORMATS

# Outcomes of decoding one row; everything but "ok" is counted and skipped.
OK, UNDECODABLE, ZERO_SIZE, TOO_LARGE = "ok", "undecodable", "zero_size", "too_large"
_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def load_image_processor(model_uri: str):
    """The model's image processor, from a local or ``s3://`` save_pretrained directory or a Hub id
    (then only these small files are fetched into the HF cache)."""
    from transformers import AutoImageProcessor

    from pipelines.storage import hub_snapshot, is_hub_id

    if is_hub_id(model_uri):
        model_uri = hub_snapshot(model_uri, allow_patterns=list(_PROCESSOR_FILES))
    fs, root = fsspec.core.url_to_fs(model_uri)
    with tempfile.TemporaryDirectory() as tmp:
        found = False
        for name in _PROCESSOR_FILES:
            path = f"{root.rstrip('/')}/{name}"
            if fs.exists(path):
                fs.get(path, f"{tmp}/{name}")
                found = True
        if not found:
            raise FileNotFoundError(f"{model_uri} has no {' or '.join(_PROCESSOR_FILES)}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoImageProcessor.from_pretrained(tmp, trust_remote_code=False)


# Processor classes whose whole pipeline is resize -> center crop -> rescale -> normalize.
_RECIPE_PROCESSORS = ("BlipImageProcessor", "CLIPImageProcessor")


@dataclass(frozen=True)
class ImageTransform:
    """An HF image processor's recipe, as transformers' PIL backend runs it (a test compares them).

    resize (PIL, the processor's filter) to ``size`` (h, w) or so that the short side is
    ``shortest_edge`` -> center crop to ``crop`` (zero-padded if smaller) -> x * ``rescale``
    (in float64, then float32) -> (x - mean) / std in float32 -> [3, H, W].
    The last two steps are a per-channel table of the 256 uint8 levels (10x faster, same bits).
    """

    size: tuple[int, int] | None = None
    shortest_edge: int | None = None
    resample: int = Image.Resampling.BICUBIC
    crop: tuple[int, int] | None = None
    rescale: float | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    @classmethod
    def from_processor(cls, proc) -> "ImageTransform | None":
        """The recipe of a BLIP or CLIP image processor; None for any other processor class or a
        setting this class doesn't reproduce (the processor then runs as itself)."""
        name = type(proc).__name__.removesuffix("Pil").removesuffix("Fast")
        if name not in _RECIPE_PROCESSORS:
            return None
        try:
            return cls._from_settings(proc)
        except (AttributeError, TypeError, ValueError):
            return None

    @classmethod
    def _from_settings(cls, proc) -> "ImageTransform | None":
        size, crop = proc.size, getattr(proc, "crop_size", None)
        extra = [k for k in ("longest_edge", "max_height", "max_width", "min_pixels", "max_pixels")
                 if getattr(size, k, None)]
        if extra or getattr(proc, "do_pad", None) or getattr(proc, "do_reduce_labels", None):
            return None
        kw = {}
        if proc.do_resize:
            if size.height and size.width:
                kw["size"] = (int(size.height), int(size.width))
            elif size.shortest_edge:
                kw["shortest_edge"] = int(size.shortest_edge)
            else:
                return None
            kw["resample"] = int(proc.resample if proc.resample is not None else Image.Resampling.BILINEAR)
        if getattr(proc, "do_center_crop", None):
            kw["crop"] = (int(crop.height), int(crop.width))
        if proc.do_rescale:
            kw["rescale"] = float(proc.rescale_factor)
        if proc.do_normalize:
            mean, std = proc.image_mean, proc.image_std
            kw["mean"] = tuple(float(m) for m in (mean if isinstance(mean, (list, tuple)) else [mean] * 3))
            kw["std"] = tuple(float(v) for v in (std if isinstance(std, (list, tuple)) else [std] * 3))
        return cls(**kw)

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(h, w) after resizing (to ``size`` or by ``shortest_edge``), with transformers' rounding."""
        if self.size:
            return self.size
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)

    def __call__(self, image: Image.Image) -> np.ndarray:
        if self.size or self.shortest_edge:
            h, w = self.resized_size(*image.size)
            image = image.resize((w, h), resample=self.resample)
        x = np.asarray(image)  # [H, W, 3] uint8
        if self.crop:
            x = _center_crop(x, *self.crop)
        out = np.empty((3, *x.shape[:2]), np.float32)
        for c in range(3):  # rescale + normalize = a lookup of each uint8 level
            np.take(self._levels[c], x[:, :, c], out=out[c])
        return out

    @cached_property
    def _levels(self) -> np.ndarray:
        """[3, 256] float32: what each uint8 level of each channel becomes. The processor's float
        ops applied once to every possible input value, so the lookup gives its exact output."""
        x = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)  # [256 levels, 3 channels]
        x = (x.astype(np.float64) * self.rescale).astype(np.float32) if self.rescale else x.astype(np.float32)
        if self.mean:
            x = (x - np.array(self.mean, np.float32)) / np.array(self.std, np.float32)
        return np.ascontiguousarray(x.T)


def _center_crop(x: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
    """transformers' center_crop on [H, W, C]: centred window, zero padding where the image is smaller."""
    h, w = x.shape[:2]
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    if top >= 0 and left >= 0:
        return x[top:top + crop_h, left:left + crop_w]
    new_h, new_w = max(crop_h, h), max(crop_w, w)
    pad_top, pad_left = math.ceil((new_h - h) / 2), math.ceil((new_w - w) / 2)
    padded = np.zeros((new_h, new_w, x.shape[2]), x.dtype)
    padded[pad_top:pad_top + h, pad_left:pad_left + w] = x
    top, left = top + pad_top, left + pad_left
    return padded[max(0, top):min(new_h, top + crop_h), max(0, left):min(new_w, left + crop_w)]


def decode_image(data: bytes | None, max_pixels: int) -> tuple[Image.Image | None, str]:
    """RGB image and ``ok``, or None and the reason it cannot be used."""
    if not data:
        return None, ZERO_SIZE
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as img:
            w, h = img.size
            if w == 0 or h == 0:
                return None, ZERO_SIZE
            if w * h > max_pixels:
                return None, TOO_LARGE
            return img.convert("RGB"), OK
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None, UNDECODABLE


class HFTransform:
    """Fallback for a processor ``ImageTransform`` can't express: the processor itself, per image."""

    def __init__(self, proc):
        self.proc = proc

    def __call__(self, image: Image.Image) -> np.ndarray:
        return self.proc(images=[image], return_tensors="np")["pixel_values"][0]


class Preprocess:
    """Ray Data UDF: ``image`` bytes -> ``caption_pixels`` [B, 3, H, W] and ``rank_pixels`` [B, 3, h, w] float32.

    Rows that fail to decode keep zero tensors and their ``outcome``; the model stages skip
    them, so every input row still reaches the writer and is counted exactly once.
    Picklable: built once on the driver and shipped to the CPU decode tasks.
    """

    def __init__(self, caption_proc, rank_proc, max_pixels: int):
        """``caption_proc`` None: no captioner runs (precomputed captions), only ranker pixels."""
        self.caption_tf = None if caption_proc is None else (
            ImageTransform.from_processor(caption_proc) or HFTransform(caption_proc))
        self.rank_tf = ImageTransform.from_processor(rank_proc) or HFTransform(rank_proc)
        self.max_pixels = max_pixels
        self.caption_shape = None if self.caption_tf is None else _pixel_shape(self.caption_tf)
        self.rank_shape = _pixel_shape(self.rank_tf)
        caption_values = 0 if self.caption_shape is None else int(np.prod(self.caption_shape))
        self.row_bytes = 4 * (caption_values + int(np.prod(self.rank_shape)))  # float32 pixels

    @classmethod
    def from_models(cls, captioner_uri: str | None, ranker_uri: str, max_pixels: int) -> "Preprocess":
        caption_proc = None if captioner_uri is None else load_image_processor(captioner_uri)
        return cls(caption_proc, load_image_processor(ranker_uri), max_pixels)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["key"])
        outcomes = []
        caption_px = None if self.caption_tf is None else np.zeros((n, *self.caption_shape), np.float32)
        rank_px = np.zeros((n, *self.rank_shape), np.float32)
        for i, data in enumerate(batch.pop("image")):
            img, outcome = decode_image(data, self.max_pixels)
            outcomes.append(outcome)
            if img is not None:
                if caption_px is not None:
                    caption_px[i] = self.caption_tf(img)
                rank_px[i] = self.rank_tf(img)
        batch["outcome"] = np.array(outcomes, dtype=object)
        if caption_px is not None:
            batch["caption_pixels"] = caption_px
        batch["rank_pixels"] = rank_px
        return batch


def _pixel_shape(transform) -> tuple[int, int, int]:
    """(3, H, W) the transform produces, found by running it once on a blank image."""
    return tuple(transform(Image.new("RGB", (8, 8))).shape)
