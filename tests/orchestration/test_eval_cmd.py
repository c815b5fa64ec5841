"""`blip2 eval` end to end: ``--task`` on a tiny COCO-format set, ``--benchmark`` on each benchmark's
official-format fixture (tests.helpers.benchmarks), both made from the synthetic corpus."""
from __future__ import annotations

import json

import fsspec
import pytest
import torch

from orchestration.cli import main
from training.config import ModelConfig
from training.evaluate.data import ImageFolder, load_caption_annotations
from training.evaluate.metrics import caption_scores, gqa_scores, vqa_scores
from training.evaluate.data import load_gqa, load_vqa
from tests.training.stage1_helpers import build_model, model_config
from tests.helpers.benchmarks import write_benchmark_sets
from tests.helpers.coco import write_coco_eval_set



@pytest.fixture(scope="module")
def coco(corpus, tmp_path_factory):
    return write_coco_eval_set(corpus, tmp_path_factory.mktemp("coco"), n=10)


@pytest.fixture(scope="module")
def stage1_dir(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("cmd-stage1")
    build_model(model_config(tiny_models),
                seed=0).save_pretrained(str(root / "model"))
    # as a GPU run saves it: a half-precision frozen tower, which `blip2 eval` runs in fp32 on CPU
    cfg_file = root / "model" / "blip2_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "frozen_dtype": "float16"}))
    return root / "model"


@pytest.fixture(scope="module")
def stage2_dir(tiny_models, tmp_path_factory):
    from training.stage2 import Blip2Stage2

    torch.manual_seed(0)
    cfg = ModelConfig(vision="eva_vit_g", vision_path=str(tiny_models["vision_eva"]), frozen_dtype="float32",
                      image_size=64, qformer_init=str(tiny_models["bert"]), num_query_tokens=8,
                      llm_family="opt", llm_path=str(tiny_models["opt"]))
    out = tmp_path_factory.mktemp("cmd-stage2") / "model"
    Blip2Stage2.from_config(cfg).save_pretrained(out)
    return out


def test_retrieval_command(stage1_dir, coco, tmp_path, capsys):
    out = tmp_path / "results.json"
    rc = main(["eval", "--task", "retrieval", "--model", str(stage1_dir), "--annotations", str(coco["karpathy"]),
               "--images", str(coco["images"]), "--out", str(out), "eval.k_test=4", "eval.batch_size=10"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "image→text R@1" in printed and "85.4" in printed
    r1 = next(line for line in printed.splitlines() if line.startswith("image→text R@1")).split()
    assert r1[4] == "10.00"  # chance column: 2 captions of 20 texts
    res = json.loads(out.read_text())
    m = res["metrics"]
    assert res["task"] == "retrieval" and res["reference"]["txt_r1"]["value"] == 85.4
    assert (m["images"], m["texts"], m["k_test"]) == (10, 20, 4)
    assert all(0 <= m[k] <= 100 for k in ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10"))
    assert m["chance"]["txt_r1"] == pytest.approx(10.0) and m["chance"]["img_r1"] == pytest.approx(10.0)
    assert r1[2:4] == [f"{m['txt_r1']:.2f}", f"{m['itc']['txt_r1']:.2f}"]  # re-ranked, ITC only
    # the official COCO captions file gives the same images, captions and so the same numbers
    out2 = tmp_path / "results2.json"
    assert main(["eval", "--task", "retrieval", "--model", str(stage1_dir), "--annotations", str(coco["coco"]),
                 "--images", str(coco["images"]), "--out", str(out2), "eval.k_test=4", "eval.batch_size=10"]) == 0
    m2 = json.loads(out2.read_text())["metrics"]
    assert {k: m2[k] for k in ("txt_r1", "img_r1", "r_mean")} == pytest.approx(
        {k: m[k] for k in ("txt_r1", "img_r1", "r_mean")})


def test_caption_command_on_s3_images_and_results(stage2_dir, coco, s3_bucket, capsys):
    images = ImageFolder(s3_bucket + "/coco")
    images.fs.put(str(coco["images"] / "images") + "/", images.root + "/images/", recursive=True)
    results = s3_bucket + "/eval/caption.json"
    assert main(["eval", "--task", "caption", "--model", str(stage2_dir), "--annotations", str(coco["karpathy"]),
                 "--images", images.uri, "--out", results, "eval.num_beams=2", "eval.max_new_tokens=6",
                 "eval.caption_min_new_tokens=2", "eval.caption_metrics=[spice]"]) == 0
    printed = capsys.readouterr().out
    assert "BLEU-4" in printed and "32.9" in printed and "111.1" in printed
    with fsspec.open(results, "r") as f:
        res = json.load(f)
    m = res["metrics"]
    assert len(m["predictions"]) == 10 and m["tokenizer"] in ("ptb", "simple")
    refs = {i.image_id: i.captions for i in load_caption_annotations(str(coco["karpathy"]))}
    again = caption_scores(refs, {p["image_id"]: p["caption"] for p in m["predictions"]}, tokenizer=m["tokenizer"])
    assert m["cider"] == pytest.approx(again["cider"]) and m["bleu4"] == pytest.approx(again["bleu4"])
    if "spice" in m["skipped"]:
        assert "SPICE skipped" in printed


def test_vqa_command(stage2_dir, coco, tmp_path, capsys):
    out = tmp_path / "vqa.json"
    rc = main(["eval", "--task", "vqa", "--model", str(stage2_dir), "--questions", str(coco["questions"]),
               "--annotations", str(coco["answers"]), "--images", str(coco["images"]), "--out", str(out),
               "eval.vqa_num_beams=2", "eval.vqa_max_new_tokens=3", "eval.limit=6"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "VQA accuracy" in printed and "53.5" in printed
    m = json.loads(out.read_text())["metrics"]
    assert m["questions"] == 6 and m["prompt"] == "Question: {} Answer:" and m["length_penalty"] == -1.0
    assert 0.0 <= m["accuracy"] <= 100.0


def test_bad_inputs_get_clear_errors(stage1_dir, coco, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["eval", "--task", "retrieval", "--model", str(stage1_dir), "--annotations", str(bad),
                 "--images", str(coco["images"])]) == 2
    assert "cannot read the annotations" in capsys.readouterr().err
    assert main(["eval", "--task", "retrieval", "--model", str(tmp_path / "no-model"), "--annotations",
                 str(coco["karpathy"]), "--images", str(coco["images"])]) == 2
    assert "cannot load the retrieval model" in capsys.readouterr().err
    assert main(["eval", "--task", "retrieval", "--model", str(stage1_dir), "--annotations", str(coco["karpathy"]),
                 "--images", str(tmp_path)]) == 1
    assert "not found under" in capsys.readouterr().err


@pytest.mark.slow
def test_retrieval_command_with_ray_data_features(stage1_dir, coco, tmp_path, capsys, ray_local):
    out = tmp_path / "ray.json"
    base = ["eval", "--task", "retrieval", "--model", str(stage1_dir), "--annotations", str(coco["karpathy"]),
            "--images", str(coco["images"]), "eval.k_test=4", "eval.batch_size=4"]
    assert main(base + ["--out", str(out), "eval.runner=ray"]) == 0
    assert main(base + ["--out", str(tmp_path / "local.json"), "eval.runner=local"]) == 0
    ray_m = json.loads(out.read_text())["metrics"]
    local_m = json.loads((tmp_path / "local.json").read_text())["metrics"]
    assert ray_m["runner"] == "ray" and local_m["runner"] == "in-process"
    for k in ("txt_r1", "txt_r5", "img_r1", "img_r5", "r_mean"):
        assert ray_m[k] == pytest.approx(local_m[k])


# -- --benchmark: one paper table row per command ------------------------------------------------
FAST_VQA = ["eval.vqa_num_beams=2", "eval.vqa_max_new_tokens=3"]
FAST_CAPTION = ["eval.num_beams=2", "eval.max_new_tokens=6", "eval.caption_min_new_tokens=2", "eval.caption_metrics=[]"]


@pytest.fixture(scope="module")
def sets(corpus, tmp_path_factory):
    return write_benchmark_sets(corpus, tmp_path_factory.mktemp("benchmarks"))


def _bench(name, model, images, *extra):
    return ["eval", "--benchmark", name, "--model", str(model), "--images", str(images), *extra]


def test_vqa_benchmarks(stage2_dir, sets, tmp_path, capsys):
    v = sets["vqav2"]
    out = tmp_path / "vqav2.json"
    # a tiny model is none of the paper's rows: eval.paper_model names the one to compare with
    assert main(_bench("vqav2", stage2_dir, v["images"], "--questions", str(v["questions"]), "--annotations",
                       str(v["annotations"]), "--out", str(out), *FAST_VQA,
                       "eval.paper_model=BLIP-2 ViT-g OPT-2.7B")) == 0
    printed = capsys.readouterr().out
    assert "Table 2 (zero-shot VQA), VQAv2 val, row 'BLIP-2 ViT-g OPT-2.7B'" in printed and "53.5" in printed
    assert "settings: prompt 'Question: {} Answer:', beam 2, length penalty -1" in printed
    res = json.loads(out.read_text())
    assert res["benchmark"] == "vqav2" and res["reference"]["accuracy"]["value"] == 53.5
    questions = load_vqa(str(v["questions"]), str(v["annotations"]))
    preds = {p["question_id"]: p["answer"] for p in res["metrics"]["predictions"]}
    again = vqa_scores(preds, {q.question_id: {"answers": q.answers} for q in questions})
    assert res["metrics"]["accuracy"] == pytest.approx(again["accuracy"])

    # test-dev: no annotations; the answers go out in the evaluation server's format
    t = sets["vqav2_test-dev"]
    assert main(_bench("vqav2", stage2_dir, t["images"], "--questions", str(t["questions"]), *FAST_VQA)) == 2
    assert "--answers-out" in capsys.readouterr().err
    answers = tmp_path / "vqav2_test-dev_results.json"
    assert main(_bench("vqav2", stage2_dir, t["images"], "--questions", str(t["questions"]),
                       "--answers-out", str(answers), *FAST_VQA)) == 0
    printed = capsys.readouterr().out
    assert "VQAv2 test-dev: scored by the VQA evaluation server" in printed
    server = json.loads(answers.read_text())
    assert [r["question_id"] for r in server] == [int(q.question_id) for q in questions]
    assert all(set(r) == {"question_id", "answer"} and isinstance(r["answer"], str) for r in server)

    o = sets["okvqa"]
    assert main(_bench("okvqa", stage2_dir, o["images"], "--questions", str(o["questions"]), "--annotations",
                       str(o["annotations"]), *FAST_VQA)) == 0
    printed = capsys.readouterr().out
    assert "OK-VQA test" in printed and "its rows: BLIP-2 ViT-L OPT-2.7B 30.2" in printed


def test_gqa_benchmark_writes_eval_py_predictions(stage2_dir, sets, tmp_path, capsys):
    g = sets["gqa"]
    out, answers = tmp_path / "gqa.json", tmp_path / "gqa_predictions.json"
    assert main(_bench("gqa", stage2_dir, g["images"], "--questions", str(g["questions"]), "--out", str(out),
                       "--answers-out", str(answers), *FAST_VQA)) == 0
    printed = capsys.readouterr().out
    assert "exact match" in printed and "GQA test-dev (balanced)" in printed
    m = json.loads(out.read_text())["metrics"]
    gold = {q.question_id: q.answers[0] for q in load_gqa(str(g["questions"]))}
    preds = {r["questionId"]: r["prediction"] for r in json.loads(answers.read_text())}
    assert set(preds) == set(gold)
    assert (m["accuracy"], m["accuracy_raw"]) == pytest.approx(
        tuple(gqa_scores(preds, gold)[k] for k in ("accuracy", "accuracy_raw")))


def test_caption_benchmarks(stage2_dir, sets, tmp_path, capsys):
    n = sets["nocaps"]
    out = tmp_path / "nocaps.json"
    assert main(_bench("nocaps", stage2_dir, n["images"], "--annotations", str(n["annotations"]), "--out", str(out),
                       *FAST_CAPTION, "eval.paper_model=BLIP-2 ViT-g FlanT5-XL")) == 0
    printed = capsys.readouterr().out
    for label in ("in-domain CIDEr", "near-domain CIDEr", "out-domain CIDEr", "overall CIDEr"):
        assert label in printed
    assert "Table 3, NoCaps val" in printed and "121.6" in printed
    m = json.loads(out.read_text())["metrics"]
    assert set(m["per_domain"]) == {"in-domain", "near-domain", "out-domain"}
    assert m["per_domain"]["in-domain"]["images"] == 2 and m["images"] == 6
    # COCO Karpathy test from Karpathy's own dataset_coco.json (its test split: 8 of 12 images)
    c = sets["coco"]
    assert main(_bench("coco_caption", stage2_dir, c["images"], "--annotations", str(c["karpathy"]),
                       "--out", str(out), *FAST_CAPTION)) == 0
    printed = capsys.readouterr().out
    assert "Table 3, COCO Karpathy test" in printed and "BLEU-4" in printed
    assert json.loads(out.read_text())["metrics"]["images"] == 8
    assert main(_bench("nocaps", stage2_dir, c["images"], "--annotations", str(c["karpathy"]))) == 2
    assert "nocaps needs a domain per image" in capsys.readouterr().err


def test_retrieval_benchmarks(stage1_dir, sets, tmp_path, capsys):
    f = sets["flickr30k"]
    k_out, l_out = tmp_path / "karpathy.json", tmp_path / "lavis.json"
    assert main(_bench("flickr30k", stage1_dir, f["images"], "--annotations", str(f["karpathy"]),
                       "--out", str(k_out), "eval.batch_size=16", "eval.paper_model=BLIP-2 ViT-g")) == 0
    printed = capsys.readouterr().out
    assert "Table 5, Flickr30K 1K test, zero-shot" in printed and "97.6" in printed and "top 128" in printed
    assert main(_bench("flickr30k", stage1_dir, f["lavis_images"], "--annotations", str(f["lavis"]),
                       "--out", str(l_out), "eval.batch_size=16")) == 0
    assert "its rows: BLIP-2 ViT-L" in capsys.readouterr().out  # tiny encoder: no row of its own
    k, lv = json.loads(k_out.read_text())["metrics"], json.loads(l_out.read_text())["metrics"]
    assert (k["images"], k["texts"], k["k_test"]) == (8, 16, 128)
    assert {x: k[x] for x in ("txt_r1", "img_r1", "r_mean")} == pytest.approx({x: lv[x] for x in ("txt_r1", "img_r1", "r_mean")})
    c = sets["coco"]
    assert main(_bench("coco_retrieval", stage1_dir, c["images"], "--annotations", str(c["karpathy"]),
                       "eval.batch_size=16", "eval.paper_model=BLIP-2 ViT-L")) == 0
    printed = capsys.readouterr().out
    assert "Table 5, COCO 5K test" in printed and "83.5" in printed


def test_transformers_directories_evaluate_through_the_same_commands(stage1_dir, stage2_dir, sets, tmp_path, capsys):
    """Released checkpoints come as plain Blip2ForImageTextRetrieval / Blip2ForConditionalGeneration
    directories: the same commands read them and give our models' numbers."""
    from transformers import (AutoTokenizer, Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval,
                              Blip2Processor)

    from training.hf_io import export_retrieval
    from training.stage1 import Blip2Stage1

    exported = export_retrieval(Blip2Stage1.from_pretrained(str(stage1_dir), frozen_dtype="float32"),
                                str(tmp_path / "export1"))
    plain1, plain2 = tmp_path / "hf-retrieval", tmp_path / "hf-generation"
    Blip2ForImageTextRetrieval.from_pretrained(exported).save_pretrained(plain1)
    AutoTokenizer.from_pretrained(exported).save_pretrained(plain1)
    Blip2ForConditionalGeneration.from_pretrained(stage2_dir).save_pretrained(plain2)
    Blip2Processor.from_pretrained(stage2_dir).save_pretrained(plain2)
    assert not (plain1 / "blip2_config.json").exists() and not (plain2 / "blip2_config.json").exists()

    f = sets["flickr30k"]
    runs = {}
    for name, model in (("ours", stage1_dir), ("hf", plain1)):
        out = tmp_path / f"flickr-{name}.json"
        assert main(_bench("flickr30k", model, f["images"], "--annotations", str(f["karpathy"]), "--out", str(out),
                           "eval.batch_size=16")) == 0
        runs[name] = json.loads(out.read_text())["metrics"]
    keys = ("txt_r1", "txt_r5", "img_r1", "img_r5", "r_mean")
    assert {k: runs["hf"][k] for k in keys} == pytest.approx({k: runs["ours"][k] for k in keys})
    assert {k: runs["hf"]["itc"][k] for k in keys} == pytest.approx({k: runs["ours"]["itc"][k] for k in keys})

    v = sets["vqav2"]
    answers = {}
    for name, model in (("ours", stage2_dir), ("hf", plain2)):
        out = tmp_path / f"vqa-{name}.json"
        assert main(_bench("vqav2", model, v["images"], "--questions", str(v["questions"]), "--annotations",
                           str(v["annotations"]), "--answers-out", str(out), *FAST_VQA)) == 0
        answers[name] = json.loads(out.read_text())
    assert answers["hf"] == answers["ours"]
    capsys.readouterr()
