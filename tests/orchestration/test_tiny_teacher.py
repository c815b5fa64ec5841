"""The demo's teachers: each tiny model learns its part of the shapes world, the taught copy
loads through the pipeline's own loaders, and a second run reuses it."""
from __future__ import annotations

import json

from orchestration.tiny_teacher import TAUGHT, names_the_image, teach_tiny_models
from pipelines.synthetic import Item

STEPS = 60


def test_each_taught_model_learns_and_loads_like_real_weights(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM

    from capfilt.captioner import Captioner
    from capfilt.ranker import Ranker

    taught = teach_tiny_models(tiny_models, tmp_path / "taught", prompt="a picture of ", seed=3,
                               steps={name: STEPS for name in TAUGHT}, images=64)
    for name in TAUGHT:
        info = json.loads((taught[name] / ".complete").read_text())
        assert info["steps"] == STEPS and info["final_loss"] < 0.6 * info["first_loss"], (name, info)
    assert taught["vision_eva"] == tiny_models["vision_eva"]  # the frozen towers stay as built
    Captioner(str(taught["captioner"]), prompt="a picture of ", num_captions=2, top_p=0.9, top_k=50,
              repetition_penalty=1.1, min_length=6, max_length=16, seed=0)
    Ranker(str(taught["ranker"]))
    AutoModelForCausalLM.from_pretrained(taught["opt"])

    stamps = {name: (taught[name] / ".complete").stat().st_mtime_ns for name in TAUGHT}
    again = teach_tiny_models(tiny_models, tmp_path / "taught", prompt="a picture of ", seed=3)
    assert {name: (again[name] / ".complete").stat().st_mtime_ns for name in TAUGHT} == stamps


def test_names_the_image_checks_colours_and_shapes_not_order():
    item = Item(0, "x.jpg", "a red circle above a blue square", ("red", "blue"), ("circle", "square"))
    assert names_the_image("a blue square below a red circle.", item)
    assert not names_the_image("a red circle above a green square", item)
    assert not names_the_image("a red circle", item)
