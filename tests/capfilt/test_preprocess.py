"""Decode once, both models' pixels; bad bytes become counted outcomes."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from capfilt.preprocess import OK, TOO_LARGE, UNDECODABLE, ZERO_SIZE, Preprocess, decode_image, load_image_processor


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_decode_outcomes():
    jpeg = _encode(Image.new("RGB", (50, 40), (200, 10, 10)), "JPEG")
    assert decode_image(jpeg, 10**6)[1] == OK
    assert decode_image(b"", 10**6) == (None, ZERO_SIZE)
    assert decode_image(None, 10**6) == (None, ZERO_SIZE)
    assert decode_image(b"<html>not found</html>", 10**6) == (None, UNDECODABLE)
    assert decode_image(jpeg[: len(jpeg) // 2], 10**6) == (None, UNDECODABLE)
    assert decode_image(jpeg, max_pixels=50 * 40 - 1) == (None, TOO_LARGE)


def test_odd_modes_become_rgb():
    for img, fmt in ((Image.new("CMYK", (20, 20), (0, 255, 0, 0)), "JPEG"), (Image.new("P", (20, 20), 3), "PNG"),
                     (Image.new("I;16", (20, 20), 40000), "PNG"), (Image.new("LA", (20, 20), (9, 100)), "PNG")):
        decoded, outcome = decode_image(_encode(img, fmt), 10**6)
        assert outcome == OK and decoded.mode == "RGB" and decoded.size == (20, 20)


def test_preprocess_equals_each_processor_on_its_own(tiny_models):
    from transformers import BlipProcessor, CLIPProcessor

    pre = Preprocess.from_models(str(tiny_models["captioner"]), str(tiny_models["ranker"]), max_pixels=10**6)
    imgs = [Image.new("RGB", (96, 80), (10 * i, 200, 30)) for i in range(2)]
    batch = {"key": np.array(["a", "bad", "b"], dtype=object),
             "image": np.array([_encode(imgs[0], "PNG"), b"junk", _encode(imgs[1], "PNG")], dtype=object)}
    out = pre(batch)
    assert out["outcome"].tolist() == [OK, UNDECODABLE, OK] and "image" not in out
    blip = BlipProcessor.from_pretrained(tiny_models["captioner"]).image_processor(images=imgs, return_tensors="np")
    clip = CLIPProcessor.from_pretrained(tiny_models["ranker"]).image_processor(images=imgs, return_tensors="np")
    np.testing.assert_array_equal(out["caption_pixels"][[0, 2]], blip["pixel_values"])
    np.testing.assert_array_equal(out["rank_pixels"][[0, 2]], clip["pixel_values"])
    assert not out["caption_pixels"][1].any()


def test_image_processor_from_s3_fetches_only_configs(tiny_models, s3_bucket):
    import fsspec

    fs = fsspec.filesystem("s3")
    fs.put_file(str(tiny_models["ranker"] / "processor_config.json"), f"{s3_bucket[5:]}/ranker/processor_config.json")
    proc = load_image_processor(f"{s3_bucket}/ranker")
    assert proc(images=[Image.new("RGB", (70, 70))], return_tensors="np")["pixel_values"].shape == (1, 3, 64, 64)
