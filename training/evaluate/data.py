"""Evaluation inputs: each benchmark's annotation files, image folders, the eval transform.

Each published format is read here and nowhere else (local paths or ``s3://``):
- Captions / retrieval (:func:`load_caption_annotations`):
  - LAVIS' JSON exports (COCO Karpathy test, ``flickr30k_test.json``, ...): a list of
    ``{"image": "val2014/x.jpg", "caption": [str, ...] | str, "domain"?}``; entries naming the
    same image are merged.
  - Official COCO captions and NoCaps (``nocaps_val_4500_captions.json``): ``{"images": [{"id",
    "file_name", "domain"?}], "annotations": [{"image_id", "caption"}]}``; NoCaps' ``domain`` is
    ``in-domain`` | ``near-domain`` | ``out-domain``.
  - Karpathy's split files (``dataset_coco.json``, ``dataset_flickr30k.json``): ``{"images":
    [{"filename", "filepath"?, "split", "sentences": [{"raw"}]}]}``, one split kept (``test``:
    COCO 5k / Flickr30K 1k).
- VQA (:func:`load_vqa`): VQAv2 and OK-VQA's official pair (``{"data_subtype"?, "questions":
  [{"question_id", "image_id", "question"}]}`` + ``{"annotations": [{"question_id", "answers":
  [{"answer"}], "answer_type"?}]}``; no annotations for VQAv2 test-dev), or LAVIS' single list
  ``[{"question_id", "question", "image", "answer": [str, ...]}]``.
- GQA (:func:`load_gqa`): the balanced questions file ``{qid: {"imageId", "question", "answer"}}``
  (images ``{imageId}.jpg``), or LAVIS' list ``[{"question_id", "image", "question", "answer"}]``.

A missing or mistyped field is a ``ValueError`` naming the file, the entry and the field.
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
from training.evaluate.metrics import NOCAPS_DOMAINS

# CLIP normalisation, as used by both frozen encoders (EVA in BLIP-2 and CLIP ViT-L).
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
# VQAv2 test-dev questions name their subset "test-dev2015"; its images are COCO test2015's
_COCO_IMAGE_SET = {"test-dev2015": "test2015"}


@dataclass
class CaptionImage:
    image_id: str
    file: str                      # relative to the image folder
    captions: list[str] = field(default_factory=list)
    domain: str | None = None      # NoCaps: in-domain | near-domain | out-domain


@dataclass
class VqaQuestion:
    question_id: str
    image_id: str
    file: str
    question: str
    answers: list[str]             # the human answers (10 in VQAv2 / OK-VQA, 1 in GQA); empty for test-dev
    answer_type: str | None = None


def read_json(uri: str):
    with fsspec.open(uri, "rb") as f:
        return json.load(f)


def need(entry, key: str, uri: str, where: str, kind: type | tuple = (str, int)):
    """``entry[key]``, or a ValueError naming the file, the entry and the field."""
    if not isinstance(entry, dict):
        raise ValueError(f"{uri}: {where} is a {type(entry).__name__}, not an object")
    if key not in entry:
        raise ValueError(f"{uri}: {where} has no {key!r} field")
    value = entry[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"{uri}: {where} field {key!r} is a {type(value).__name__} ({value!r:.40})")
    return value


def _domain(entry: dict, uri: str, where: str) -> str | None:
    domain = entry.get("domain")
    if domain is not None and domain not in NOCAPS_DOMAINS:
        raise ValueError(f"{uri}: {where} field 'domain' is {domain!r}, not one of {', '.join(NOCAPS_DOMAINS)}")
    return domain


def load_caption_annotations(uri: str, split: str = "test") -> list[CaptionImage]:
    """Images with their reference captions, in file order, ids as strings.

    split: the Karpathy split kept from a ``dataset_*.json`` file (other formats hold one split).
    """
    data = read_json(uri)
    images: dict[str, CaptionImage] = {}
    if isinstance(data, list):  # LAVIS exports
        for i, entry in enumerate(data):
            where = f"entry {i}"
            file = need(entry, "image", uri, where, str)
            caps = entry.get("caption", [])
            caps = [caps] if isinstance(caps, str) else caps
            if not isinstance(caps, list):
                raise ValueError(f"{uri}: {where} field 'caption' is a {type(caps).__name__}")
            image_id = str(entry.get("image_id", file))
            item = images.setdefault(image_id, CaptionImage(image_id, file, domain=_domain(entry, uri, where)))
            item.captions.extend(c for c in caps if isinstance(c, str))
    elif isinstance(data, dict) and isinstance(data.get("images"), list) and "annotations" in data:  # COCO, NoCaps
        for i, img in enumerate(data["images"]):
            where = f"images[{i}]"
            key = str(need(img, "id", uri, where))
            images[key] = CaptionImage(key, need(img, "file_name", uri, where, str), domain=_domain(img, uri, where))
        for i, ann in enumerate(need(data, "annotations", uri, "the file", list)):
            where = f"annotations[{i}]"
            key = str(need(ann, "image_id", uri, where))
            if key not in images:
                raise ValueError(f"{uri}: {where} names unknown image_id {ann['image_id']}")
            images[key].captions.append(need(ann, "caption", uri, where, str))
    elif isinstance(data, dict) and isinstance(data.get("images"), list):  # Karpathy's dataset_*.json
        for i, img in enumerate(data["images"]):
            where = f"images[{i}]"
            if need(img, "split", uri, where, str) != split:
                continue
            name = need(img, "filename", uri, where, str)
            file = f"{img['filepath']}/{name}" if img.get("filepath") else name
            key = str(img.get("cocoid", img.get("imgid", file)))
            sentences = need(img, "sentences", uri, where, list)
            images[key] = CaptionImage(key, file, [need(s, "raw", uri, f"{where}.sentences", str) for s in sentences])
        if not images:
            raise ValueError(f"{uri}: no image in split {split!r}")
    else:
        raise ValueError(f"{uri}: neither a Karpathy-style list, a COCO/NoCaps {{images, annotations}} file "
                         "nor a Karpathy dataset_*.json {images: [{split, sentences}]} file")
    empty = [i.image_id for i in images.values() if not i.captions]
    if empty:
        raise ValueError(f"{uri}: {len(empty)} images have no caption (e.g. {empty[0]})")
    return list(images.values())


def coco_image_name(data_subtype: str | None) -> str:
    """File name pattern of a VQAv2 / OK-VQA question's COCO image (their files name no image)."""
    subset = _COCO_IMAGE_SET.get(data_subtype or "val2014", data_subtype or "val2014")
    return f"COCO_{subset}_{{image_id:012d}}.jpg"


def _answers(value, uri: str, where: str) -> list[str]:
    """LAVIS answer lists: a string or a list of strings."""
    answers = [value] if isinstance(value, str) else value
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise ValueError(f"{uri}: {where} field 'answer' is neither a string nor a list of strings")
    return answers


def load_vqa(questions_uri: str, annotations_uri: str | None = None, image_name: str = "") -> list[VqaQuestion]:
    """VQAv2 / OK-VQA questions joined with their human answers (none without ``annotations_uri``).

    image_name: file name pattern when a question carries no ``image`` field (official files);
    "": ``COCO_{subset}_{image_id:012d}.jpg`` from the questions file's ``data_subtype``.
    """
    qdata = read_json(questions_uri)
    if isinstance(qdata, list):  # LAVIS style: question and answers in one list
        out = []
        for i, q in enumerate(qdata):
            where = f"entry {i}"
            file = need(q, "image", questions_uri, where, str)
            out.append(VqaQuestion(str(need(q, "question_id", questions_uri, where)), str(q.get("image_id", file)),
                                   file, need(q, "question", questions_uri, where, str),
                                   _answers(q.get("answer", []), questions_uri, where), q.get("answer_type")))
        return out
    questions = need(qdata, "questions", questions_uri, "the file", list)
    image_name = image_name or coco_image_name(qdata.get("data_subtype"))
    anns = {}
    if annotations_uri:
        for i, a in enumerate(need(read_json(annotations_uri), "annotations", annotations_uri, "the file", list)):
            anns[str(need(a, "question_id", annotations_uri, f"annotations[{i}]"))] = (i, a)
    out = []
    for i, q in enumerate(questions):
        where = f"questions[{i}]"
        qid = str(need(q, "question_id", questions_uri, where))
        image_id = need(q, "image_id", questions_uri, where)
        answers, answer_type = [], None
        if annotations_uri:
            if qid not in anns:
                raise ValueError(f"{annotations_uri}: no annotation for question {qid}")
            j, ann = anns[qid]
            awhere = f"annotations[{j}]"
            answers = [need(a, "answer", annotations_uri, f"{awhere}.answers", str)
                       for a in need(ann, "answers", annotations_uri, awhere, list)]
            answer_type = ann.get("answer_type")
        file = q.get("image") or image_name.format(image_id=int(image_id) if str(image_id).isdigit() else image_id)
        out.append(VqaQuestion(qid, str(image_id), file, need(q, "question", questions_uri, where, str),
                               answers, answer_type))
    return out


def load_gqa(uri: str) -> list[VqaQuestion]:
    """GQA balanced questions (official dict or LAVIS list); one ground-truth answer each."""
    data = read_json(uri)
    out = []
    if isinstance(data, dict):  # official: {qid: {...}}
        for qid, q in data.items():
            where = f"question {qid!r}"
            image_id = str(need(q, "imageId", uri, where))
            answer = q.get("answer")
            out.append(VqaQuestion(str(qid), image_id, f"{image_id}.jpg", need(q, "question", uri, where, str),
                                   _answers(answer, uri, where) if answer is not None else []))
    elif isinstance(data, list):
        for i, q in enumerate(data):
            where = f"entry {i}"
            file = need(q, "image", uri, where, str)
            answer = q.get("answer")
            out.append(VqaQuestion(str(need(q, "question_id", uri, where)), str(q.get("image_id", file)), file,
                                   need(q, "question", uri, where, str),
                                   _answers(answer, uri, where)[:1] if answer is not None else []))
    else:
        raise ValueError(f"{uri}: neither GQA's {{question_id: question}} file nor a LAVIS list")
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
