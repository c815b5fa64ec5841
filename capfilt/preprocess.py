"""Decode each image once and make both models' pixel tensors from that one decoded image.

Only the image processors' small config files are fetched (not the weights), so CPU decode
workers never copy a multi-GB model directory from S3.
"""
from __future__ import annotations

import io
import tempfile
import warnings

import fsspec
import numpy as np
from PIL import Image

# Outcomes of decoding one row; everything but "ok" is counted and skipped.
OK, UNDECODABLE, ZERO_SIZE, TOO_LARGE = "ok", "undecodable", "zero_size", "too_large"
_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def load_image_processor(model_uri: str):
    """The model's image processor, from a local or ``s3://`` save_pretrained directory."""
    from transformers import AutoImageProcessor

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
            return AutoImageProcessor.from_pretrained(tmp)


def decode_image(data: bytes | None, max_pixels: int) -> tuple[Image.Image | None, str]:
    """RGB image and ``ok``, or None and the reason it cannot be used."""
    if not data:
        return None, ZERO_SIZE
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            if w == 0 or h == 0:
                return None, ZERO_SIZE
            if w * h > max_pixels:
                return None, TOO_LARGE
            return img.convert("RGB"), OK
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None, UNDECODABLE


class Preprocess:
    """Ray Data UDF: ``image`` bytes -> ``caption_pixels`` [B, 3, H, W] and ``rank_pixels`` [B, 3, h, w] float32.

    Rows that fail to decode keep zero tensors and their ``outcome``; the model stages skip
    them, so every input row still reaches the writer and is counted exactly once.
    Picklable: built once on the driver and shipped to the CPU decode tasks.
    """

    def __init__(self, caption_proc, rank_proc, max_pixels: int):
        self.caption_proc, self.rank_proc, self.max_pixels = caption_proc, rank_proc, max_pixels
        self.caption_shape = _pixel_shape(caption_proc)
        self.rank_shape = _pixel_shape(rank_proc)
        self.row_bytes = 4 * (int(np.prod(self.caption_shape)) + int(np.prod(self.rank_shape)))  # float32 pixels

    @classmethod
    def from_models(cls, captioner_uri: str, ranker_uri: str, max_pixels: int) -> "Preprocess":
        return cls(load_image_processor(captioner_uri), load_image_processor(ranker_uri), max_pixels)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["key"])
        images, outcomes = [], []
        for data in batch.pop("image"):
            img, outcome = decode_image(data, self.max_pixels)
            images.append(img)
            outcomes.append(outcome)
        good = [i for i, img in enumerate(images) if img is not None]
        caption_px = np.zeros((n, *self.caption_shape), np.float32)
        rank_px = np.zeros((n, *self.rank_shape), np.float32)
        if good:
            decoded = [images[i] for i in good]
            caption_px[good] = self.caption_proc(images=decoded, return_tensors="np")["pixel_values"]
            rank_px[good] = self.rank_proc(images=decoded, return_tensors="np")["pixel_values"]
        batch["outcome"] = np.array(outcomes, dtype=object)
        batch["caption_pixels"] = caption_px
        batch["rank_pixels"] = rank_px
        return batch


def _pixel_shape(processor) -> tuple[int, int, int]:
    """(3, H, W) the processor produces, found by running it once on a blank image."""
    probe = processor(images=[Image.new("RGB", (8, 8))], return_tensors="np")["pixel_values"]
    return tuple(probe.shape[1:])
