"""Captioning and VQA evaluation with tiny stage-2 models (OPT and FlanT5 families)."""
from __future__ import annotations

import pytest
import torch

from training.config import EvalConfig, ModelConfig
from training.evaluate.captioning import evaluate_captioning, strip_prompt
from training.evaluate.data import ImageFolder, load_caption_annotations, load_vqa, preprocess
from training.evaluate.metrics import caption_scores, vqa_scores
from training.evaluate.generation import VQA_PROMPTS as PROMPTS
from training.evaluate.vqa import answer_questions, evaluate_vqa, vqa_prompt
from tests.helpers.coco import write_coco_eval_set

FAST = dict(batch_size=4, num_beams=2, max_new_tokens=6, caption_min_new_tokens=2, caption_metrics=[],
            tokenizer="simple", vqa_num_beams=2, vqa_max_new_tokens=4)



@pytest.fixture(scope="module")
def stage2(tiny_models):
    from training.stage2 import Blip2Stage2

    def build(family: str):
        torch.manual_seed(0)
        cfg = ModelConfig(vision="eva_vit_g", vision_path=str(tiny_models["vision_eva"]), frozen_dtype="float32",
                          image_size=64, qformer_init=str(tiny_models["bert"]), num_query_tokens=8,
                          llm_family=family, llm_path=str(tiny_models[family]))
        return Blip2Stage2.from_config(cfg).eval()

    return {f: build(f) for f in ("opt", "t5")}


@pytest.fixture(scope="module")
def coco(corpus, tmp_path_factory):
    return write_coco_eval_set(corpus, tmp_path_factory.mktemp("coco"), n=6)


def test_strip_prompt():
    assert strip_prompt("A photo of a red circle", "a photo of") == "a red circle"
    assert strip_prompt("  a red circle ", "a photo of") == "a red circle"


def test_captioning_scores_its_own_predictions(stage2, coco):
    model = stage2["opt"]
    cfg = EvalConfig(**FAST)
    images = load_caption_annotations(str(coco["karpathy"]))
    folder = ImageFolder(str(coco["images"]))
    r = evaluate_captioning(model, images, folder, cfg)
    preds = {p["image_id"]: p["caption"] for p in r["predictions"]}
    assert sorted(preds) == sorted(i.image_id for i in images)
    # the prompt and decoding settings reach the model: same as calling it directly
    px = preprocess([folder.load(i.file) for i in images[:4]], 64)
    direct = model.generate(px, "a photo of", num_beams=2, max_new_tokens=6, min_new_tokens=2)
    assert [preds[i.image_id] for i in images[:4]] == [strip_prompt(t, "a photo of") for t in direct]
    again = caption_scores({i.image_id: i.captions for i in images}, preds, tokenizer="simple")
    assert r["bleu4"] == pytest.approx(again["bleu4"]) and r["cider"] == pytest.approx(again["cider"])
    assert r["prompt"] == "a photo of" and r["missing"] == 0 and r["skipped"] == {}


@pytest.mark.parametrize("family", ["opt", "t5"])
def test_vqa_uses_the_paper_prompt(stage2, coco, family):
    model = stage2[family]
    cfg = EvalConfig(**FAST)
    assert vqa_prompt(model, cfg) == PROMPTS[family]
    assert vqa_prompt(model, EvalConfig(vqa_prompt="Q: {} A:")) == "Q: {} A:"
    questions = load_vqa(str(coco["questions"]), str(coco["answers"]))[:4]
    folder = ImageFolder(str(coco["images"]))
    answers = answer_questions(model, questions, folder, cfg)
    px = preprocess([folder.load(q.file) for q in questions], 64)
    direct = model.generate(px, [PROMPTS[family].format(q.question) for q in questions], num_beams=2,
                            max_new_tokens=4, min_new_tokens=1, length_penalty=-1.0)
    assert [answers[q.question_id] for q in questions] == [a.strip() for a in direct]


def test_vqa_evaluation_scores_its_own_answers(stage2, coco):
    questions = load_vqa(str(coco["questions"]), str(coco["answers"]))
    r = evaluate_vqa(stage2["opt"], questions, ImageFolder(str(coco["images"])), EvalConfig(**FAST))
    preds = {p["question_id"]: p["answer"] for p in r["predictions"]}
    again = vqa_scores(preds, {q.question_id: {"answers": q.answers, "answer_type": q.answer_type}
                               for q in questions})
    assert r["accuracy"] == pytest.approx(again["accuracy"]) and r["questions"] == 12
    assert set(r["per_answer_type"]) == {"number", "other"}
    with pytest.raises(ValueError, match="no question carries human answers"):
        for q in questions:
            q.answers = []
        evaluate_vqa(stage2["opt"], questions[:1], ImageFolder(str(coco["images"])), EvalConfig(**FAST))
