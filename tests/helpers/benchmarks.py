"""Tiny evaluation sets in each benchmark's published format, made from the synthetic corpus.

Written from the formats' documentation (VQA API, OK-VQA v1.1, GQA's balanced questions, NoCaps'
``nocaps_val_4500_captions.json``, Karpathy's ``dataset_*.json``, LAVIS' JSON exports). Images are
copied under the names each format implies (``COCO_val2014_{id:012d}.jpg``, ``{imageId}.jpg``, ...).
The VQA answers hold the cases the official normalisation treats specially; the tests score
fixed predictions against them by hand.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

# (question, 10 human answers, answer_type): VQAv2 val
VQAV2_ANSWERS = [
    ("how many shapes are there?", ["2"] * 2 + ["two"] * 5 + ["3"] * 3, "number"),   # number words
    ("what animal is it?", ["dog"] * 3 + ["the dog"] * 4 + ["dogs"] * 3, "other"),     # articles, punctuation
    ("can you park here?", ["don't"] + ["no"] * 9, "other"),                           # contractions
    ("how many people?", ["1,000"] * 6 + ["1000"] + ["thousand"] * 3, "number"),     # 1,000-style numbers
    ("how many birds?", ["1,000"] * 10, "number"),                                     # identical answers
    ("is it sunny?", ["yes"] * 10, "yes/no"),                                          # trailing period
]
# OK-VQA v1.1: 5 annotators, each answer listed twice (10 for the VQA script); "raw_answer" kept
OKVQA_ANSWERS = [
    ("what sport is this?", ["surfing", "surf", "surfboarding", "surfing", "surf"]),
    ("what is the horse doing?", ["race", "racing", "run", "horse race", "race"]),
    ("where is this?", ["beach", "ocean", "ocean", "ocean", "sea"]),
]
# (question, answer): GQA balanced test-dev
GQA_ANSWERS = [("what animal is it?", "dog"), ("what animal is this?", "dog"), ("is it sunny?", "yes"),
               ("which side is the cup on?", "left")]


def _copy(corpus_root: Path, item, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(corpus_root / item.file, dest)


def _vqa_pair(out: Path, items, answers, subtype: str, with_answers: bool, okvqa: bool = False) -> dict:
    questions, annotations = [], []
    for i, (it, case) in enumerate(zip(items, answers)):
        qid = it.index * 1000 + i
        question, human = case[0], case[1]
        questions.append({"question_id": qid, "image_id": it.index, "question": question})
        if okvqa:
            anns = [{"answer": a, "raw_answer": a, "answer_confidence": "yes", "answer_id": k + 1}
                    for k, a in enumerate(a for a in human for _ in range(2))]
            annotations.append({"question_id": qid, "image_id": it.index, "question_type": "eight",
                                "answer_type": "other", "confidence": 3, "answers": anns})
        else:
            annotations.append({"question_id": qid, "image_id": it.index, "question_type": question.split()[0],
                                "answer_type": case[2], "multiple_choice_answer": human[0],
                                "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1}
                                            for k, a in enumerate(human)]})
    q = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "license": {},
         "data_subtype": subtype, "questions": questions}
    paths = {"questions": out / f"questions_{subtype}.json"}
    paths["questions"].write_text(json.dumps(q))
    if with_answers:
        paths["annotations"] = out / f"annotations_{subtype}.json"
        paths["annotations"].write_text(json.dumps({"info": {}, "data_subtype": subtype, "annotations": annotations}))
    return paths


def write_benchmark_sets(corpus, out: Path) -> dict[str, dict[str, Path]]:
    """{benchmark: {"images": folder, annotation file names: paths}} for every benchmark reader."""
    root, items = corpus
    out.mkdir(parents=True, exist_ok=True)
    sets: dict[str, dict[str, Path]] = {}

    # VQAv2 val and test-dev, OK-VQA: official pairs; the files name no image, the COCO names are implied
    coco = out / "coco"
    for it in items[:12]:
        _copy(root, it, coco / "val2014" / f"COCO_val2014_{it.index:012d}.jpg")
        _copy(root, it, coco / "test2015" / f"COCO_test2015_{it.index:012d}.jpg")
    sets["vqav2"] = {"images": coco / "val2014", **_vqa_pair(out, items, VQAV2_ANSWERS, "val2014", True)}
    sets["vqav2_test-dev"] = {"images": coco / "test2015",
                              **_vqa_pair(out, items, VQAV2_ANSWERS, "test-dev2015", False)}
    okvqa_dir = out / "okvqa"
    okvqa_dir.mkdir()
    sets["okvqa"] = {"images": coco / "val2014",
                     **_vqa_pair(okvqa_dir, items[6:], OKVQA_ANSWERS, "val2014", True, okvqa=True)}

    # GQA: testdev_balanced_questions.json, images/{imageId}.jpg
    gqa = {}
    for i, (it, (question, answer)) in enumerate(zip(items, GQA_ANSWERS)):
        image_id = f"n{100 + it.index}"
        _copy(root, it, out / "gqa" / "images" / f"{image_id}.jpg")
        gqa[f"20{i:05d}"] = {"imageId": image_id, "question": question, "answer": answer,
                             "fullAnswer": f"It is {answer}.", "isBalanced": True, "groups": {"global": None},
                             "types": {"structural": "query", "semantic": "obj", "detailed": "objType"},
                             "semantic": [], "entailed": [], "equivalent": [f"20{i:05d}"], "annotations": {}}
    sets["gqa"] = {"images": out / "gqa" / "images", "questions": out / "gqa" / "testdev_balanced_questions.json"}
    sets["gqa"]["questions"].write_text(json.dumps(gqa))

    # NoCaps val: COCO-style with a domain per image, Open Images ids as file names
    domains = ["in-domain", "in-domain", "near-domain", "near-domain", "out-domain", "out-domain"]
    images, annotations = [], []
    for k, (it, domain) in enumerate(zip(items[:6], domains)):
        name = f"{0x13ea2087020900 + it.index:016x}.jpg"
        _copy(root, it, out / "nocaps" / "validation" / name)
        images.append({"id": k, "file_name": name, "open_images_id": name[:-4], "domain": domain,
                       "height": 96, "width": 96, "coco_url": f"https://example.invalid/{name}"})
        annotations += [{"image_id": k, "id": 10 * k + j, "caption": c}
                        for j, c in enumerate([it.caption, f"a picture of {it.caption}", f"there is {it.caption}"])]
    sets["nocaps"] = {"images": out / "nocaps" / "validation", "annotations": out / "nocaps" / "nocaps_val_4500_captions.json"}
    sets["nocaps"]["annotations"].write_text(json.dumps({"licenses": [], "info": {}, "images": images,
                                                         "annotations": annotations}))

    # Flickr30K: Karpathy's dataset_flickr30k.json (test + train rows) and LAVIS' flickr30k_test.json
    flickr = out / "flickr30k"
    rows, lavis = [], []
    for k, it in enumerate(items[:10]):
        name = f"{1000092795 + it.index}.jpg"
        _copy(root, it, flickr / "flickr30k-images" / name)
        caps = [it.caption, f"a picture of {it.caption}"]
        split = "test" if k < 8 else "train"
        rows.append({"filename": name, "imgid": k, "split": split, "sentids": [2 * k, 2 * k + 1],
                     "sentences": [{"raw": c, "tokens": c.split(), "imgid": k, "sentid": 2 * k + j}
                                   for j, c in enumerate(caps)]})
        if split == "test":
            lavis.append({"image": f"flickr30k-images/{name}", "caption": caps})
    sets["flickr30k"] = {"images": flickr / "flickr30k-images", "karpathy": flickr / "dataset_flickr30k.json",
                         "lavis_images": flickr, "lavis": flickr / "flickr30k_test.json"}
    sets["flickr30k"]["karpathy"].write_text(json.dumps({"images": rows, "dataset": "flickr30k"}))
    sets["flickr30k"]["lavis"].write_text(json.dumps(lavis))

    # COCO: Karpathy's dataset_coco.json (filepath + filename, cocoid)
    rows = [{"filepath": "val2014", "filename": f"COCO_val2014_{it.index:012d}.jpg", "cocoid": it.index,
             "split": "test" if k < 8 else "restval", "imgid": k,
             "sentences": [{"raw": c} for c in (it.caption, f"a picture of {it.caption}")]}
            for k, it in enumerate(items[:12])]
    sets["coco"] = {"images": coco, "karpathy": out / "dataset_coco.json"}
    sets["coco"]["karpathy"].write_text(json.dumps({"images": rows, "dataset": "coco"}))
    return sets
