"""Evaluation inputs: COCO-format caption files, VQAv2 question/annotation files, image folders.

Accepted annotation formats (local paths or ``s3://``):
- Karpathy test split (as LAVIS ships it): a JSON list of ``{"image": "val2014/x.jpg",
  "caption": [str, ...] | str, ...}``; entries naming the same image are merged.
- Official COCO captions: ``{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}``.
- VQAv2: the official pair (``{"questions": [{"question_id", "image_id", "question"}]}`` +
  ``{"annotations": [{"question_id", "answers": [{"answer"}], "answer_type"}]}``), or a single
  LAVIS-style list ``[{"question_id", "question", "image", "answer": [str, ...]}]``.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field

import fsspec
import numpy as np
import torch
from PIL import Image

from pipelines.images import IMAGE_FORMATS

# CLIP normalisation, as used by both frozen encoders (EVA in BLIP-2 and CLIP ViT-L).
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


@dataclass
class CaptionImage:
    image_id: str
    file: str                      # relative to the image folder
    captions: list[str] = field(default_factory=list)


@dataclass
class VqaQuestion:
    question_id: str
    image_id: str
    file: str
    question: str
    answers: list[str]             # the human answers (10 in VQAv2); may be empty for test-dev
    answer_type: str | None = None


def read_json(uri: str):
    with fsspec.open(uri, "rb") as f:
        return json.load(f)


def load_caption_annotations(uri: str) -> list[CaptionImage]:
    """Images with their reference captions, in file order, ids as strings."""
    data = read_json(uri)
    images: dict[str, CaptionImage] = {}
    if isinstance(data, list):  # Karpathy / LAVIS
        for i, entry in enumerate(data):
            if "image" not in entry:
                raise ValueError(f"{uri}: entry {i} has no 'image' field")
            caps = entry.get("caption", [])
            caps = [caps] if isinstance(caps, str) else list(caps)
            image_id = str(entry.get("image_id", entry["image"]))
            item = images.setdefault(image_id, CaptionImage(image_id, entry["image"]))
            item.captions.extend(c for c in caps if isinstance(c, str))
    elif isinstance(data, dict) and "images" in data and "annotations" in data:  # official COCO
        for img in data["images"]:
            images[str(img["id"])] = CaptionImage(str(img["id"]), img["file_name"])
        for ann in data["annotations"]:
            key = str(ann["image_id"])
            if key not in images:
                raise ValueError(f"{uri}: annotation for unknown image_id {ann['image_id']}")
            images[key].captions.append(ann["caption"])
    else:
        raise ValueError(f"{uri}: neither a Karpathy-style list nor a COCO {{images, annotations}} file")
    empty = [i.image_id for i in images.values() if not i.captions]
    if empty:
        raise ValueError(f"{uri}: {len(empty)} images have no caption (e.g. {empty[0]})")
    return list(images.values())


def load_vqa(questions_uri: str, annotations_uri: str | None = None,
             image_name: str = "COCO_val2014_{image_id:012d}.jpg") -> list[VqaQuestion]:
    """VQAv2 questions joined with their human answers.

    image_name: file name pattern when a question carries no ``image`` field (official VQAv2).
    """
    qdata = read_json(questions_uri)
    if isinstance(qdata, list):  # LAVIS style: question and answers in one list
        return [VqaQuestion(str(q["question_id"]), str(q.get("image_id", q["image"])), q["image"],
                            q["question"], list(q.get("answer", []) if not isinstance(q.get("answer"), str)
                                                else [q["answer"]]), q.get("answer_type"))
                for q in qdata]
    questions = qdata["questions"]
    anns = {}
    if annotations_uri:
        anns = {str(a["question_id"]): a for a in read_json(annotations_uri)["annotations"]}
    out = []
    for q in questions:
        qid = str(q["question_id"])
        ann = anns.get(qid, {})
        if annotations_uri and not ann:
            raise ValueError(f"{annotations_uri}: no annotation for question {qid}")
        image_id = q["image_id"]
        file = q.get("image") or image_name.format(image_id=int(image_id) if str(image_id).isdigit() else image_id)
        out.append(VqaQuestion(qid, str(image_id), file, q["question"],
                               [a["answer"] for a in ann.get("answers", [])], ann.get("answer_type")))
    return out


class ImageFolder:
    """Images under a local folder or ``s3://`` prefix, addressed by relative path. Picklable."""

    def __init__(self, uri: str):
        self.uri = uri.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.uri)

    def __reduce__(self):
        return (ImageFolder, (self.uri,))

    def read(self, rel: str) -> bytes:
        return self.fs.cat(f"{self.root}/{rel.lstrip('/')}")

    def load(self, rel: str) -> Image.Image:
        """RGB image; raises with the path named when it is missing or does not decode."""
        try:
            with Image.open(io.BytesIO(self.read(rel)), formats=IMAGE_FORMATS) as im:
                return im.convert("RGB")
        except FileNotFoundError:
            raise FileNotFoundError(f"image {rel!r} not found under {self.uri}") from None
        except Exception as e:  # noqa: BLE001 - PIL raises many kinds
            raise ValueError(f"image {rel!r} under {self.uri} does not decode: {e}") from None


def preprocess(images: list[Image.Image], size: int) -> torch.Tensor:
    """Eval transform: bicubic resize to ``size`` x ``size`` + CLIP mean/std → float32 [B, 3, size, size]."""
    arrays = []
    for img in images:
        arr = np.asarray(img.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
        arrays.append(((arr - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1))
    return torch.from_numpy(np.ascontiguousarray(np.stack(arrays)))


def model_device(model) -> torch.device:
    """Where a model's inputs go (``Blip2Stage1`` has ``.device``; any nn.Module has parameters)."""
    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) else next(model.parameters()).device


def load_overrides(device: str) -> dict:
    """ModelConfig overrides for ``from_pretrained`` at eval time: half-precision frozen towers
    are for GPUs, on CPU they run in fp32."""
    return {"frozen_dtype": "float32"} if torch.device(device).type == "cpu" else {}
