"""A tiny COCO-format evaluation set (Karpathy list, official captions JSON, a VQAv2 pair) made
from the synthetic corpus; image paths are relative to the corpus folder."""
from __future__ import annotations

import json
from pathlib import Path


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
