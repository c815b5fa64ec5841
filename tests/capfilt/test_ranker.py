"""The CLIP ranker and the keep-the-best-two rule."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from capfilt.ranker import Ranker, select

NEG = float("-inf")


def test_select_keeps_the_two_best_usable_distinct_captions():
    caps = ["orig", "s1", "s2", "s3", "s4"]
    assert select(caps, np.array([0.1, 0.5, 0.3, 0.7, 0.2]), keep=2) == [3, 1]
    assert select(caps, np.array([0.9, NEG, 0.3, NEG, 0.2]), keep=2) == [0, 2]   # empty captions never kept
    assert select(["a b", "a b", "c", "d", "e"], np.array([0.5, 0.5, 0.1, 0.2, 0.0]), keep=2) == [0, 3]  # duplicates once
    assert select(caps, np.array([0.2, 0.5, 0.5, 0.1, 0.0]), keep=2) == [1, 2]   # ties: earlier first
    assert select(caps, np.array([NEG, NEG, NEG, NEG, 0.1]), keep=2) is None      # too few usable


def test_keep_original_puts_the_original_first():
    caps = ["orig", "s1", "s2", "s3"]
    assert select(caps, np.array([0.0, 0.5, 0.3, 0.7]), keep=2, keep_original=True) == [0, 3]
    # an empty original cannot be kept: fall back to the ranking
    assert select(["", "s1", "s2", "s3"], np.array([NEG, 0.5, 0.3, 0.7]), keep=2, keep_original=True) == [3, 1]


@pytest.fixture(scope="module")
def ranker(tiny_models):
    return Ranker(str(tiny_models["ranker"]))


def test_scores_match_a_plain_clip_forward(ranker, tiny_models):
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(tiny_models["ranker"]).eval()
    proc = CLIPProcessor.from_pretrained(tiny_models["ranker"])
    images = [Image.new("RGB", (80, 64), c) for c in ((200, 20, 20), (20, 20, 200))]
    captions = [["a red circle", "a blue square", "green"], ["yellow", "a blue square below a red circle", "x"]]
    pixels = proc(images=images, return_tensors="pt")["pixel_values"]
    scores, image_emb, texts = ranker.score(pixels.numpy(), captions)
    assert scores.shape == (2, 3) and image_emb.shape == (2, model.config.projection_dim)
    for b, image in enumerate(images):
        for c, text in enumerate(captions[b]):
            with torch.no_grad():
                out = model(**proc(text=[text], images=image, return_tensors="pt"))
            assert scores[b, c].item() == pytest.approx(float((out.image_embeds * out.text_embeds).sum()), abs=1e-4)
    assert torch.allclose(image_emb.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_empty_and_overlong_captions_are_counted_not_fatal(ranker):
    limit = ranker.max_tokens
    long = " ".join(["red circle"] * (2 * limit))
    texts = ranker.embed_texts(["", "   ", long, "a red circle"])
    assert texts.empty.tolist() == [True, True, False, False]
    assert texts.truncated.tolist() == [False, False, True, False]
    assert torch.isfinite(texts.emb).all()
    pixels = torch.zeros(1, 3, 64, 64)
    scores, _, _ = ranker.score(pixels, [["", long, "a red circle"]])
    assert scores[0, 0].item() == NEG and torch.isfinite(scores[0, 1:]).all()


def test_length_buckets_keep_every_caption_in_its_place(ranker):
    """Many captions are embedded in length-sorted chunks; each row must still be its own
    caption's embedding (as embedded alone, without padding) with its own flags."""
    rng = np.random.default_rng(0)
    words = ["red", "blue", "circle", "square", "above", "left", "of", "a", "the", "small"]
    texts = [" ".join(rng.choice(words, rng.integers(1, 14))) for _ in range(100)]
    texts[7], texts[42] = "", " ".join(["red circle"] * (2 * ranker.max_tokens))
    batched = ranker.embed_texts(texts)
    assert len({len(ranker.tokenizer(t).input_ids) for t in texts}) > 5  # several buckets really formed
    for i, text in enumerate(texts):
        alone = ranker.embed_texts([text])
        assert torch.allclose(batched.emb[i], alone.emb[0], atol=1e-5), i
        assert batched.empty[i] == alone.empty[0] and batched.truncated[i] == alone.truncated[0]
    assert batched.empty[7] and batched.truncated[42] and batched.empty.sum() == 1
