"""Downloaded bytes → a checked, resized, 8-bit RGB JPEG (or the original bytes when they already fit).

The header is read before any pixel is decoded, so decompression bombs (``max_pixels``) and
tracking pixels (``min_image_size``) are refused for the price of a few bytes. JPEGs are
decoded at the smallest DCT scale (1/2, 1/4, 1/8) that still covers the output size
(libjpeg's own downscaling: a quarter of the pixels decoded per halving), the rest is
resized (see :func:`resize`) to img2dataset's sizes, and an RGB JPEG that already fits is
stored as it came. CMYK, palette, 16-bit and alpha images become 8-bit RGB (alpha composited
on white); truncated files are refused instead of being decoded with grey fill.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np

RESIZE_MODES = ("no", "keep_ratio", "center_crop", "border", "keep_ratio_largest")
# The only formats Pillow may decode from downloaded or adapter bytes: what an image corpus needs.
# Other plugins stay unreachable (EPS would run Ghostscript on server-chosen PostScript).
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
JPEG_MAX_SIDE = 65535


class Rejected(Exception):
    """An image that is not kept; ``status`` is a download-contract status."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ImageSpec:
    size: int = 256
    resize_mode: str = "keep_ratio"
    resize_only_if_bigger: bool = True
    quality: int = 95
    max_pixels: int = 40_000_000
    min_image_size: int = 0


@dataclass(frozen=True)
class Stored:
    data: bytes
    width: int
    height: int
    original_width: int
    original_height: int


def scaled_size(width: int, height: int, spec: ImageSpec) -> tuple[int, int]:
    """The size the resize mode scales to, before a centre crop or border pad."""
    if spec.resize_mode == "no":
        return width, height
    by_short = spec.resize_mode in ("keep_ratio", "center_crop")
    side = min(width, height) if by_short else max(width, height)
    if spec.resize_only_if_bigger and side <= spec.size:
        return width, height
    scale = spec.size / side  # rounded as albumentations' Smallest/LongestMaxSize do (img2dataset's sizes)
    return max(1, round(width * scale)), max(1, round(height * scale))


def to_rgb(img):
    """Any PIL image → 8-bit RGB. Alpha is composited on white (as img2dataset does)."""
    from PIL import Image

    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img).astype(np.uint32)
        if img.mode.startswith("I;16") or arr.max(initial=0) > 255:  # 16-bit data: keep the top 8 bits
            arr = arr >> 8
        img = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    elif img.mode == "F":
        img = Image.fromarray(np.asarray(img).clip(0, 255).astype(np.uint8))
    if img.mode == "RGB":
        return img
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        img.mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def open_checked(data: bytes, spec: ImageSpec):
    """The PIL image (pixels not yet decoded), refused on its header's size alone."""
    from PIL import Image, UnidentifiedImageError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        except Image.DecompressionBombError as e:
            raise Rejected("too_large", str(e)) from None
        except UnidentifiedImageError:
            raise Rejected("decode_error", "not a recognised image") from None
        except Exception as e:  # noqa: BLE001 — PIL raises many types for corrupt headers
            raise Rejected("decode_error", f"{type(e).__name__}: {e}") from None
    width, height = img.size
    if width * height > spec.max_pixels:
        raise Rejected("too_large", f"{width}x{height} = {width * height} pixels > max_pixels {spec.max_pixels}")
    if min(width, height) < max(spec.min_image_size, 1):
        raise Rejected("too_small", f"{width}x{height} is under min_image_size {spec.min_image_size}")
    return img


def decode(img, target: tuple[int, int]):
    """Full decode (at a reduced JPEG scale when ``target`` allows) → 8-bit RGB PIL image."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            if img.format == "JPEG" and (target[0] < img.size[0] or target[1] < img.size[1]):
                img.draft(img.mode if img.mode in ("RGB", "L") else None, target)
            img.load()  # truncated files fail here
        except Image.DecompressionBombError as e:
            raise Rejected("too_large", str(e)) from None
        except Exception as e:  # noqa: BLE001 — PIL raises many types for corrupt files
            raise Rejected("decode_error", f"{type(e).__name__}: {e}") from None
    return to_rgb(img)


def resize(img, scaled: tuple[int, int], spec: ImageSpec) -> np.ndarray:
    """PIL RGB image → array scaled to ``scaled`` (w, h), then cropped or padded as the mode asks.

    A downscale by k ≥ 2 first averages k×k blocks (PIL ``reduce``: the area filter at an integer
    factor), then OpenCV's bilinear filter takes the rest (< 2×, where it does not alias): a third
    of the CPU of one area resize, within a JPEG re-encode's noise of it (tested against img2dataset)."""
    import cv2

    w, h = img.size
    if (w, h) != scaled:
        k = min(w // scaled[0], h // scaled[1])
        if k >= 2:
            img = img.reduce(k)
        down = scaled[0] < w or scaled[1] < h
        rgb = cv2.resize(np.asarray(img), scaled, interpolation=cv2.INTER_LINEAR if down else cv2.INTER_LANCZOS4)
    else:
        rgb = np.asarray(img)
    h, w = rgb.shape[:2]
    if spec.resize_mode == "center_crop" and (w > spec.size or h > spec.size):
        top, left = max(0, (h - spec.size) // 2), max(0, (w - spec.size) // 2)
        rgb = rgb[top:top + spec.size, left:left + spec.size]
    elif spec.resize_mode == "border" and (w < spec.size or h < spec.size):
        top, left = (spec.size - h) // 2, (spec.size - w) // 2
        rgb = cv2.copyMakeBorder(rgb, top, spec.size - h - top, left, spec.size - w - left,
                                 cv2.BORDER_CONSTANT, value=(255, 255, 255))
    return rgb


def store(data: bytes, spec: ImageSpec) -> Stored:
    """Check, decode, resize and encode one downloaded image; raises :class:`Rejected`."""
    import cv2

    img = open_checked(data, spec)
    width, height = img.size
    fmt, mode = img.format, img.mode
    scaled = scaled_size(width, height, spec)
    if max(scaled) > JPEG_MAX_SIDE:  # refused before decoding: the stored JPEG could never hold it
        raise Rejected("too_large", f"{width}x{height} would be stored as {scaled[0]}x{scaled[1]}, over JPEG's "
                                    f"{JPEG_MAX_SIDE}-pixel side limit")
    rgb = decode(img, scaled)
    unchanged = scaled == (width, height) and spec.resize_mode in ("no", "keep_ratio", "keep_ratio_largest")
    if unchanged and fmt == "JPEG" and mode == "RGB":
        return Stored(data, width, height, width, height)  # decoded once to prove it is whole; kept as sent
    out = resize(rgb, scaled, spec)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(out, cv2.COLOR_RGB2BGR), [int(cv2.IMWRITE_JPEG_QUALITY), spec.quality])
    if not ok:
        raise Rejected("decode_error", "could not encode the resized image")
    return Stored(buf.tobytes(), out.shape[1], out.shape[0], width, height)
