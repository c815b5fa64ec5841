"""COCO / VQAv2 annotation loading, image folders (local and moto S3), the eval transform.

``write_coco_eval_set`` is also used by the other eval tests: it turns the synthetic corpus into
a tiny COCO-format set (Karpathy list, official captions JSON, VQAv2 question/annotation pair).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training.evaluate.data import (CLIP_MEAN, CLIP_STD, ImageFolder, load_caption_annotations, load_vqa,
                                    preprocess)


def write_coco_eval_set(corpus, out: Path, n: int = 12) -> dict[str, Path]:
    """Karpathy + official COCO caption files (2 captions per image) and a VQAv2 pair, for the
    first ``n`` corpus images; image paths are relative to the corpus folder."""
    root, items = corpus
    items = items[:n]
    out.mkdir(parents=True, exist_ok=True)
    karpathy = [{"image": it.file, "caption": [it.caption, f"a picture of {it.caption}"]} for it in items]
    coco = {"images": [{"id": it.index, "file_name": it.file} for it in items],
            "annotations": [{"image_id": it.index, "id": 2 * it.index + j, "caption": c}
                            for it in items for j, c in enumerate([it.caption, f"a picture of {it.caption}"])]}
    questions, annotations = [], []
    for it in items:
        for j, (q, answers, kind) in enumerate([
            (f"what color is the {it.shapes[0]}?", [it.colors[0]] * 9 + ["dark " + it.colors[0]], "other"),
            ("how many shapes are there?", [str(len(it.shapes))] * 7 + [["zero", "one", "two"][len(it.shapes)]] * 3,
             "number"),
        ]):
            qid = it.index * 10 + j
            questions.append({"question_id": qid, "image_id": it.index, "question": q, "image": it.file})
            annotations.append({"question_id": qid, "image_id": it.index, "answer_type": kind,
                                "answers": [{"answer": a, "answer_id": k + 1} for k, a in enumerate(answers)]})
    paths = {"karpathy": out / "coco_karpathy_test.json", "coco": out / "captions_test.json",
             "questions": out / "vqa_questions.json", "answers": out / "vqa_annotations.json",
             "images": root}
    paths["karpathy"].write_text(json.dumps(karpathy))
    paths["coco"].write_text(json.dumps(coco))
    paths["questions"].write_text(json.dumps({"questions": questions}))
    paths["answers"].write_text(json.dumps({"annotations": annotations}))
    return paths


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
