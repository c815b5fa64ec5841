"""One-line caption/VQA inference (Python API and CLI) on tiny exported stage-2 models."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from orchestration import api
from training.config import ModelConfig
from training.stage2 import Blip2Stage2


def cfg_for(tiny_models, eva, family: str) -> ModelConfig:
    return ModelConfig(vision="eva_vit_g", vision_path=str(eva), frozen_dtype="float32",
                       image_size=64, qformer_init=str(tiny_models["bert"]), num_query_tokens=8,
                       llm_family=family, llm_path=str(tiny_models[family]))


@pytest.fixture(scope="module")
def eva(tiny_models):
    return tiny_models["vision_eva"]


@pytest.fixture(scope="module")
def exported(tiny_models, eva, tmp_path_factory):
    """family -> an exported tiny stage-2 directory (HF Blip2ForConditionalGeneration layout)."""
    out = {}
    for family in ("opt", "t5"):
        torch.manual_seed(11)
        path = tmp_path_factory.mktemp(f"api-{family}")
        Blip2Stage2.from_config(cfg_for(tiny_models, eva, family)).save_pretrained(path)
        out[family] = path
    return out


@pytest.fixture(scope="module")
def images(corpus):
    root, items = corpus
    return [root / items[i].file for i in range(3)]


def reference(path, images, prompt, **gen):
    model = Blip2Stage2.from_pretrained(path).eval()
    pixel_values = model.preprocess([Image.open(p).convert("RGB") for p in images])
    return model.generate(pixel_values, prompt, **gen)


def test_caption_one_liner_matches_model_generate_with_paper_defaults(exported, images):
    result = api.caption(str(images[0]), model=exported["opt"])
    assert set(result) == {"pred_caption"} and isinstance(result["pred_caption"], str)
    expected = reference(exported["opt"], images[:1], "a photo of", num_beams=5, max_new_tokens=30, min_new_tokens=8)
    assert result["pred_caption"] == expected[0]
    # path, PIL image and array give the same answer; a list gives a list
    pil = Image.open(images[0]).convert("RGB")
    assert api.caption(pil, model=exported["opt"]) == result
    assert api.caption(np.asarray(pil), model=exported["opt"]) == result
    many = api.caption([str(p) for p in images], model=exported["opt"], num_beams=1, max_new_tokens=5)
    assert len(many) == 3 and all(isinstance(r["pred_caption"], str) for r in many)


@pytest.mark.parametrize("family,template", [("opt", "Question: {} Answer:"), ("t5", "Question: {} Short answer:")])
def test_vqa_one_liner_uses_paper_prompt_beam5_lp_minus1(exported, images, family, template):
    question = "what color is the shape?"
    result = api.vqa(str(images[1]), question, model=exported[family])
    expected = reference(exported[family], images[1:2], template.format(question), num_beams=5,
                         max_new_tokens=10, min_new_tokens=1, length_penalty=-1.0)
    assert result == {"pred_answer": expected[0]}
    from training.config import EvalConfig

    settings = EvalConfig(vqa_num_beams=1, vqa_max_new_tokens=3, vqa_prompt="Q: {} A:")  # what blip2 vqa passes
    assert api.vqa(str(images[1]), question, model=exported[family], settings=settings)["pred_answer"] == reference(
        exported[family], images[1:2], f"Q: {question} A:", num_beams=1, max_new_tokens=3, min_new_tokens=1,
        length_penalty=-1.0)[0]
    custom = api.vqa(str(images[1]), question, model=exported[family], prompt="Q: {} A:", num_beams=1)
    assert custom["pred_answer"] == reference(exported[family], images[1:2], f"Q: {question} A:", num_beams=1,
                                              max_new_tokens=10, min_new_tokens=1, length_penalty=-1.0)[0]


def test_models_are_cached_per_path(exported):
    a = api.load_model(exported["opt"], device="cpu")
    assert api.load_model(str(exported["opt"]), device="cpu") is a
    assert api.load_model(exported["t5"], device="cpu") is not a


def test_lavis_state_dict_file(tiny_models, eva, exported, images, tmp_path):
    source = Blip2Stage2.from_pretrained(exported["opt"])
    lavis = {("opt_proj." + k[len("language_projection."):]) if k.startswith("language_projection.") else k: v
             for k, v in source.trainable_state_dict().items() if not k.startswith("qformer.")}
    for k, v in source.qformer.state_dict().items():
        k = k.replace(".attention.attention.", ".attention.self.").replace(".crossattention.attention.",
                                                                           ".crossattention.self.")
        lavis["Qformer.bert.embeddings.LayerNorm." + k.rsplit(".", 1)[1] if k.startswith("layernorm.")
              else "Qformer.bert." + k] = v
    torch.save({"model": lavis}, tmp_path / "blip2_opt_stage2.pth")
    got = api.caption(str(images[0]), model=tmp_path / "blip2_opt_stage2.pth", config=cfg_for(tiny_models, eva, "opt"),
                      num_beams=1, max_new_tokens=6, min_new_tokens=6)
    want = api.caption(str(images[0]), model=exported["opt"], num_beams=1, max_new_tokens=6, min_new_tokens=6)
    assert got == want


def test_bad_image_is_a_clear_error(exported, tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="cannot read image .*broken.jpg"):
        api.caption(str(tmp_path / "broken.jpg"), model=exported["opt"])
    with pytest.raises(ValueError, match="must be a path"):
        api.caption(42, model=exported["opt"])


def test_cli_caption_and_vqa(exported, images, tmp_path, capsys):
    from orchestration.cli import main

    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    rc = main(["caption", str(images[0]), str(tmp_path / "broken.jpg"), str(images[2]), "--model", str(exported["opt"]),
               "--json"])
    out, err = capsys.readouterr()
    assert rc == 1, err  # one bad image: reported, counted, the others still captioned
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["image"] for r in rows] == [str(images[0]), str(images[2])]
    assert rows[0]["pred_caption"] == api.caption(str(images[0]), model=exported["opt"])["pred_caption"]
    assert "broken.jpg" in err and "1 of 3 images failed" in err

    rc = main(["vqa", str(images[1]), "--question", "what shape is it?", "--model", str(exported["t5"])])
    out, err = capsys.readouterr()
    assert rc == 0, err
    image, answer = out.rstrip("\n").split("\t")
    assert image == str(images[1])
    assert answer == api.vqa(str(images[1]), "what shape is it?", model=exported["t5"])["pred_answer"]


@pytest.mark.parametrize("command", [("caption",), ("vqa", "--question", "what shape is it?")])
def test_cli_wrong_model_is_one_clear_line(command, images, tmp_path, capsys):
    from orchestration.cli import main

    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    (not_a_model / "notes.txt").write_text("no config here")
    for model in (tmp_path / "missing", not_a_model):
        assert main([*command, str(images[0]), "--model", str(model)]) == 2
        out, err = capsys.readouterr()
        lines = err.strip().splitlines()
        assert out == "" and len(lines) == 1, err
        assert lines[0].startswith(f"blip2 {command[0]}: cannot load --model {model}"), err


def test_model_directory_on_s3(exported, images, s3_bucket):
    import fsspec

    uri = f"{s3_bucket}/models/stage2-opt"
    fs, root = fsspec.core.url_to_fs(uri)
    fs.put(str(exported["opt"]) + "/", root + "/", recursive=True)
    assert fs.exists(root + "/model.safetensors")
    gen = dict(num_beams=1, max_new_tokens=5, min_new_tokens=5)
    assert api.caption(str(images[0]), model=uri, **gen) == api.caption(str(images[0]), model=exported["opt"], **gen)
