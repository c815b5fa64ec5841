"""Downloaded bytes → stored image: refusals from the header, colour conversions, resize modes, DCT scaling."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipelines.images import ImageSpec, Rejected, scaled_size, store
from tests.helpers.images import encoded, png_header_only


def photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """A smooth gradient with noise: JPEG-compressible like a photo, not flat."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) % 256], -1).astype(np.int16)
    arr = (arr + rng.integers(-8, 9, arr.shape)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(arr)


SPEC = ImageSpec(size=64, min_image_size=16)


def test_refusals_from_the_header():
    with pytest.raises(Rejected) as e:
        store(png_header_only(12_000, 12_000), SPEC)
    assert e.value.status == "too_large"
    with pytest.raises(Rejected) as e:  # over PIL's own limit: its DecompressionBombError is mapped too
        store(png_header_only(20_000, 20_000), ImageSpec(max_pixels=10**12))
    assert e.value.status == "too_large" and "decompression bomb" in str(e.value).lower()
    with pytest.raises(Rejected) as e:
        store(encoded(Image.new("RGB", (1, 1)), "PNG"), SPEC)  # a tracking pixel
    assert e.value.status == "too_small"
    for data in (b"GIF89a garbage", b"<html>not an image</html>", encoded(photo(80, 60), "JPEG")[:900]):
        with pytest.raises(Rejected) as e:
            store(data, SPEC)
        assert e.value.status == "decode_error"


@pytest.mark.parametrize("img,fmt", [
    (Image.new("CMYK", (80, 64), (0, 255, 255, 0)), "JPEG"),
    (photo(80, 64).convert("P", palette=Image.Palette.ADAPTIVE, colors=4), "PNG"),
    (Image.fromarray(np.full((64, 80), 65535, np.uint16)), "PNG"),
    (Image.new("RGBA", (80, 64), (0, 0, 255, 0)), "PNG"),
    (photo(80, 64).convert("L"), "JPEG"),
    (photo(80, 64), "WEBP"),
])
def test_every_colour_model_becomes_8_bit_rgb_jpeg(img, fmt):
    s = store(encoded(img, fmt), SPEC)
    out = Image.open(io.BytesIO(s.data))
    assert out.format == "JPEG" and out.mode == "RGB" and (s.width, s.height) == out.size == (80, 64)
    if img.mode in ("RGBA", "I;16"):  # transparent → white; full-scale 16-bit → white
        assert np.asarray(out).min() > 240


def test_a_jpeg_that_fits_is_kept_as_sent_and_nothing_is_upscaled():
    data = encoded(photo(60, 40), "JPEG", quality=80)
    s = store(data, ImageSpec(size=64, min_image_size=16))
    assert s.data == data and (s.width, s.height, s.original_width, s.original_height) == (60, 40, 60, 40)
    up = store(data, ImageSpec(size=64, min_image_size=16, resize_only_if_bigger=False))
    assert (up.width, up.height) == (96, 64)


def test_large_jpegs_are_decoded_at_a_reduced_dct_scale_and_match_img2datasets_resizer():
    from img2dataset.resizer import Resizer

    img = photo(2000, 1500, seed=3)
    data = encoded(img, "JPEG", quality=92)
    s = store(data, ImageSpec(size=256))
    assert (s.width, s.height, s.original_width, s.original_height) == (341, 256, 2000, 1500)
    reduced = Image.open(io.BytesIO(data))
    reduced.draft("RGB", (341, 256))
    assert reduced.size == (500, 375)  # libjpeg decodes a quarter of the side: 1/16 of the pixels
    ref, w, h, *_ = Resizer(image_size=256, resize_mode="keep_ratio", resize_only_if_bigger=False)(io.BytesIO(data))
    assert (w, h) == (341, 256)
    got = np.asarray(Image.open(io.BytesIO(s.data))).astype(np.float32)
    want = np.asarray(Image.open(io.BytesIO(ref))).astype(np.float32)
    # img2dataset decodes all 3 M pixels; its own q95 re-encode differs from the unencoded resize by ~2.9
    assert np.abs(got - want).mean() < 2.0


@pytest.mark.parametrize("mode,size", [("keep_ratio", (85, 64)), ("keep_ratio_largest", (64, 48)),
                                       ("center_crop", (64, 64)), ("border", (64, 64)), ("no", (200, 150))])
def test_resize_modes(mode, size):
    s = store(encoded(photo(200, 150), "PNG"), ImageSpec(size=64, resize_mode=mode))
    assert (s.width, s.height) == size == Image.open(io.BytesIO(s.data)).size
    if mode == "border":
        assert np.asarray(Image.open(io.BytesIO(s.data)))[:4].min() > 240  # white padding


def test_scaled_size_keeps_the_short_side_exact():
    for w, h in ((333, 1000), (1000, 333), (257, 256), (4000, 3)):
        sw, sh = scaled_size(w, h, ImageSpec(size=256))
        assert min(sw, sh) == 256 or min(w, h) <= 256


def test_only_the_corpus_formats_are_decoded():
    """Issue 32 D8: what the header claims decides nothing; Pillow's other plugins (EPS → Ghostscript) stay shut."""
    from pipelines.images import IMAGE_FORMATS

    img = photo(80, 60)
    for fmt in IMAGE_FORMATS:
        assert (store(encoded(img, fmt), SPEC).original_width, fmt) == (80, fmt)
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 128 128\nnewpath 0 0 moveto 128 128 lineto stroke\n%%EOF\n"
    for data in (eps, encoded(img, "PCX"), encoded(img, "TGA"), encoded(img, "ICO"), encoded(img, "PPM")):
        with pytest.raises(Rejected) as e:
            store(data, SPEC)
        assert (e.value.status, str(e.value)) == ("decode_error", "not a recognised image")


def test_a_side_jpeg_cannot_hold_is_too_large_before_any_decode():
    """Issue 32 L12: 64×600000 (under max_pixels) kept at its size by resize_only_if_bigger."""
    with pytest.raises(Rejected) as e:
        store(png_header_only(64, 600_000), ImageSpec(size=256, max_pixels=40_000_000))
    assert e.value.status == "too_large" and "65535-pixel side limit" in str(e.value)
