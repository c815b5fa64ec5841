"""Every benchmark's annotation formats (COCO, Karpathy, LAVIS, VQAv2, OK-VQA, GQA, NoCaps, Flickr30K),
image folders (local and moto S3), the eval transform."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers.benchmarks import GQA_ANSWERS, OKVQA_ANSWERS, VQAV2_ANSWERS, write_benchmark_sets
from tests.helpers.coco import write_coco_eval_set
from training.evaluate.data import (CLIP_MEAN, CLIP_STD, ImageFolder, load_caption_annotations, load_gqa,
                                    load_vqa, preprocess)


@pytest.fixture(scope="module")
def sets(corpus, tmp_path_factory):
    return write_benchmark_sets(corpus, tmp_path_factory.mktemp("benchmarks"))



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


def _every_file_loads(folder: ImageFolder, files) -> None:
    for f in files:
        folder.load(f)


def test_vqav2_and_okvqa_official_pairs(sets):
    s = sets["vqav2"]
    qs = load_vqa(str(s["questions"]), str(s["annotations"]))
    assert [q.answers for q in qs] == [a for _, a, _ in VQAV2_ANSWERS]
    assert [q.answer_type for q in qs] == [t for _, _, t in VQAV2_ANSWERS]
    assert qs[0].file.startswith("COCO_val2014_") and qs[0].file.endswith(".jpg")
    _every_file_loads(ImageFolder(str(s["images"])), [q.file for q in qs])
    # test-dev: no annotations; its data_subtype names the test2015 images
    t = sets["vqav2_test-dev"]
    dev = load_vqa(str(t["questions"]))
    assert all(not q.answers for q in dev) and dev[0].file == qs[0].file.replace("val2014", "test2015")
    _every_file_loads(ImageFolder(str(t["images"])), [q.file for q in dev])
    # OK-VQA v1.1: the 5 annotators' answers, each listed twice, read from "answer"
    o = sets["okvqa"]
    ok = load_vqa(str(o["questions"]), str(o["annotations"]))
    assert [len(q.answers) for q in ok] == [10] * len(OKVQA_ANSWERS)
    assert ok[0].answers[:4] == ["surfing", "surfing", "surf", "surf"]
    _every_file_loads(ImageFolder(str(o["images"])), [q.file for q in ok])


def test_gqa_official_and_lavis_formats(sets, tmp_path):
    g = sets["gqa"]
    qs = load_gqa(str(g["questions"]))
    assert [(q.question, q.answers) for q in qs] == [(q, [a]) for q, a in GQA_ANSWERS]
    assert qs[0].file == f"{qs[0].image_id}.jpg" and qs[0].image_id.startswith("n")
    _every_file_loads(ImageFolder(str(g["images"])), [q.file for q in qs])
    lavis = [{"question_id": q.question_id, "image": q.file, "question": q.question, "answer": q.answers[0]}
             for q in qs]
    (tmp_path / "gqa_lavis.json").write_text(json.dumps(lavis))
    again = load_gqa(str(tmp_path / "gqa_lavis.json"))
    assert [(q.question_id, q.file, q.answers) for q in again] == [(q.question_id, q.file, q.answers) for q in qs]


def test_nocaps_keeps_each_image_domain(sets):
    n = sets["nocaps"]
    images = load_caption_annotations(str(n["annotations"]))
    assert [i.domain for i in images] == ["in-domain"] * 2 + ["near-domain"] * 2 + ["out-domain"] * 2
    assert all(len(i.captions) == 3 for i in images)
    _every_file_loads(ImageFolder(str(n["images"])), [i.file for i in images])


def test_karpathy_splits_and_lavis_exports_agree(sets):
    f = sets["flickr30k"]
    karpathy = load_caption_annotations(str(f["karpathy"]))         # split=test: 8 of the 10 rows
    lavis = load_caption_annotations(str(f["lavis"]))
    assert len(karpathy) == len(lavis) == 8
    assert [i.captions for i in karpathy] == [i.captions for i in lavis]
    assert [f"flickr30k-images/{i.file}" for i in karpathy] == [i.file for i in lavis]
    _every_file_loads(ImageFolder(str(f["images"])), [i.file for i in karpathy])
    _every_file_loads(ImageFolder(str(f["lavis_images"])), [i.file for i in lavis])
    assert len(load_caption_annotations(str(f["karpathy"]), split="train")) == 2
    c = sets["coco"]
    coco = load_caption_annotations(str(c["karpathy"]))
    assert len(coco) == 8 and coco[0].file.startswith("val2014/COCO_val2014_")
    _every_file_loads(ImageFolder(str(c["images"])), [i.file for i in coco])
    with pytest.raises(ValueError, match="no image in split 'val'"):
        load_caption_annotations(str(f["karpathy"]), split="val")


@pytest.mark.parametrize("content, loader, message", [
    ({"questions": [{"question_id": 1, "image_id": 2}]}, load_vqa, r"questions\[0\] has no 'question' field"),
    ({"questions": [{"question_id": 1, "image_id": 2, "question": ["x"]}]}, load_vqa,
     r"questions\[0\] field 'question' is a list"),
    ([{"question_id": 1, "question": "q?"}], load_vqa, "entry 0 has no 'image' field"),
    ([{"question_id": 1, "question": "q?", "image": "a.jpg", "answer": 3}], load_vqa,
     "entry 0 field 'answer' is neither"),
    ({"7": {"question": "q?", "answer": "a"}}, load_gqa, "question '7' has no 'imageId' field"),
    ({"images": [{"id": 1, "file_name": "a.jpg", "domain": "far-domain"}], "annotations": []},
     load_caption_annotations, "field 'domain' is 'far-domain'"),
    ({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 1}]},
     load_caption_annotations, r"annotations\[0\] has no 'caption' field"),
    ({"images": [{"filename": "a.jpg", "split": "test"}]}, load_caption_annotations,
     r"images\[0\] has no 'sentences' field"),
])
def test_bad_fields_name_the_file_and_field(tmp_path, content, loader, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=message) as err:
        loader(str(path))
    assert str(path) in str(err.value)


def test_vqa_annotation_errors_name_the_annotations_file(sets, tmp_path):
    bad = tmp_path / "ann.json"
    bad.write_text(json.dumps({"annotations": [{"question_id": 1, "answers": [{"answer_id": 1}]}]}))
    raw = {"questions": [{"question_id": 1, "image_id": 1, "question": "q?"}]}
    (tmp_path / "q.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"ann.json: annotations\[0\].answers has no 'answer' field"):
        load_vqa(str(tmp_path / "q.json"), str(bad))
