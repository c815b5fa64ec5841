"""COCO / VQAv2 annotation loading, image folders (local and moto S3), the eval transform."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers.coco import write_coco_eval_set
from training.evaluate.data import (CLIP_MEAN, CLIP_STD, ImageFolder, load_caption_annotations, load_vqa,
                                    preprocess)





def test_karpathy_and_official_formats_agree(corpus, tmp_path):
    paths = write_coco_eval_set(corpus, tmp_path, n=5)
    a = load_caption_annotations(str(paths["karpathy"]))
    b = load_caption_annotations(str(paths["coco"]))
    assert [x.file for x in a] == [x.file for x in b] == [it.file for it in corpus[1][:5]]
    assert [x.captions for x in a] == [x.captions for x in b]
    assert len(a[0].captions) == 2 and a[0].captions[0] == corpus[1][0].caption
    # one-caption-per-entry Karpathy files (the train-split layout) are merged per image
    flat = [{"image": "x.jpg", "caption": "one"}, {"image": "x.jpg", "caption": "two"}]
    (tmp_path / "flat.json").write_text(json.dumps(flat))
    merged = load_caption_annotations(str(tmp_path / "flat.json"))
    assert len(merged) == 1 and merged[0].captions == ["one", "two"]


def test_bad_annotation_files_are_refused(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"foo": 1}))
    with pytest.raises(ValueError, match="neither a Karpathy"):
        load_caption_annotations(str(tmp_path / "a.json"))
    (tmp_path / "b.json").write_text(json.dumps([{"image": "x.jpg", "caption": []}]))
    with pytest.raises(ValueError, match="have no caption"):
        load_caption_annotations(str(tmp_path / "b.json"))


def test_vqa_formats(corpus, tmp_path):
    paths = write_coco_eval_set(corpus, tmp_path, n=3)
    qs = load_vqa(str(paths["questions"]), str(paths["answers"]))
    assert len(qs) == 6 and qs[0].file == corpus[1][0].file and len(qs[0].answers) == 10
    assert qs[1].answer_type == "number"
    # official files without an "image" field: the COCO file name pattern
    raw = json.loads(paths["questions"].read_text())
    for q in raw["questions"]:
        del q["image"]
    (tmp_path / "q2.json").write_text(json.dumps(raw))
    qs2 = load_vqa(str(tmp_path / "q2.json"), str(paths["answers"]))
    assert qs2[2].file == "COCO_val2014_000000000001.jpg"
    # LAVIS single-list format
    lavis = [{"question_id": 1, "question": "what?", "image": "a.jpg", "answer": ["x", "y"]}]
    (tmp_path / "lavis.json").write_text(json.dumps(lavis))
    (q,) = load_vqa(str(tmp_path / "lavis.json"))
    assert (q.question_id, q.file, q.answers) == ("1", "a.jpg", ["x", "y"])


def test_image_folder_on_s3_and_preprocess(corpus, s3_bucket):
    root, items = corpus
    folder = ImageFolder(s3_bucket + "/coco")
    folder.fs.put(str(root / "images") + "/", folder.root + "/images/", recursive=True)
    img = folder.load(items[0].file)
    local = Image.open(root / items[0].file).convert("RGB")
    assert np.array_equal(np.asarray(img), np.asarray(local))
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        folder.load("images/nope.jpg")
    px = preprocess([img, local], 64)
    assert px.shape == (2, 3, 64, 64) and px.dtype == torch.float32
    # the eval transform: bicubic resize then CLIP mean/std
    expected = (np.asarray(local.resize((64, 64), Image.BICUBIC), dtype=np.float32) / 255 - CLIP_MEAN) / CLIP_STD
    assert torch.allclose(px[1], torch.from_numpy(expected.transpose(2, 0, 1)), atol=1e-6)
