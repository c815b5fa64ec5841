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


def _processors():
    """BLIP- and CLIP-style processors and variants (other filters, no normalisation, no crop)."""
    from transformers import BlipImageProcessor, CLIPImageProcessor

    return [BlipImageProcessor(size={"height": 48, "width": 40}),
            BlipImageProcessor(size={"height": 32, "width": 32}, resample=2, do_normalize=False),
            CLIPImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 40, "width": 40}),
            CLIPImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 30, "width": 44}, resample=1),
            CLIPImageProcessor(size={"shortest_edge": 24}, do_center_crop=False, do_rescale=False)]


def test_image_transform_is_the_processors_arithmetic():
    """Exactly the HF processor's output, for noise images of many shapes (wide, tall, smaller
    than the crop, 1 pixel high), with every option the transform reads."""
    from capfilt.preprocess import ImageTransform

    rng = np.random.default_rng(0)
    shapes = [(64, 64), (97, 31), (23, 150), (10, 12), (1, 80), (300, 7)]
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in shapes]
    for proc in _processors():
        transform = ImageTransform.from_processor(proc)
        assert transform is not None
        for img in images:
            if proc.size.shortest_edge and not proc.do_center_crop and img.size != (64, 64):
                continue  # without a crop the output shape follows the aspect ratio (not a batchable setup)
            expected = proc(images=[img], return_tensors="np")["pixel_values"][0]
            got = transform(img)
            assert got.dtype == np.float32 and got.shape == expected.shape, (proc.size, img.size)
            np.testing.assert_array_equal(got, expected)


def test_processors_it_cannot_express_run_as_themselves():
    from transformers import BlipImageProcessor

    from capfilt.preprocess import ImageTransform, Preprocess

    proc = BlipImageProcessor(size={"height": 32, "width": 32}, do_pad=True)
    assert ImageTransform.from_processor(proc) is None
    assert ImageTransform.from_processor(object()) is None  # any other processor class
    pre = Preprocess(proc, proc, max_pixels=10**6)
    img = Image.new("RGB", (50, 40), (200, 10, 10))
    out = pre({"key": np.array(["a"], dtype=object), "image": np.array([_encode(img, "PNG")], dtype=object)})
    np.testing.assert_array_equal(out["caption_pixels"][0], proc(images=[img], return_tensors="np")["pixel_values"][0])


def test_decode_workers_need_neither_transformers_nor_torch(tiny_models, tmp_path):
    """The Preprocess shipped to CPU decode tasks unpickles and runs in a process that never
    imports transformers or torch (each costs seconds per worker process)."""
    import pickle
    import subprocess
    import sys

    pre = Preprocess.from_models(str(tiny_models["captioner"]), str(tiny_models["ranker"]), max_pixels=10**6)
    (tmp_path / "pre.pkl").write_bytes(pickle.dumps(pre))
    (tmp_path / "img.png").write_bytes(_encode(Image.new("RGB", (70, 50), (1, 2, 3)), "PNG"))
    code = ("import pickle, sys, numpy as np; pre = pickle.load(open(sys.argv[1], 'rb'));"
            "out = pre({'key': np.array(['k'], dtype=object), 'image': np.array([open(sys.argv[2], 'rb').read()], dtype=object)});"
            "assert out['outcome'][0] == 'ok' and out['caption_pixels'].any();"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path / "pre.pkl"), str(tmp_path / "img.png")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
