"""The BLIP captioner: BLIP's sampler (penalty, min length, top-k, top-p), seeded per image so
batching never changes a caption."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from capfilt.captioner import Captioner, SeededSampler, blip_decode, row_seed, row_uniforms
from capfilt.config import CapFiltConfig

BLIP = {"top_p": 0.9, "top_k": 50, "repetition_penalty": 1.1}  # BLIP's generate(sample=True)
PROMPT_IDS = 4  # [DEC] a picture of


def make_captioner(tiny_models, **kw) -> Captioner:
    args = {"prompt": "a picture of ", "num_captions": 10, **BLIP, "min_length": 7, "max_length": 14, "seed": 0, **kw}
    return Captioner(str(tiny_models["captioner"]), **args)


@pytest.fixture(scope="module")
def captioner(tiny_models):
    return make_captioner(tiny_models)


def test_config_defaults_are_blips_sampler():
    cfg = CapFiltConfig()
    assert (cfg.top_p, cfg.top_k, cfg.repetition_penalty, cfg.min_length, cfg.max_length) == (0.9, 50, 1.1, 10, 30)


def test_lengths_count_the_prompt_ids(tiny_models, captioner):
    assert captioner.prompt_ids.shape[1] == PROMPT_IDS and captioner.max_new_tokens == 14 - PROMPT_IDS
    with pytest.raises(ValueError, match="no token after"):
        make_captioner(tiny_models, min_length=0, max_length=PROMPT_IDS)


def test_ten_captions_per_image_without_the_prompt(captioner):
    pixels = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0)).numpy()
    out = captioner(pixels, ["a", "b", "c"])
    assert [len(c) for c in out] == [10, 10, 10]
    assert all(isinstance(t, str) and t for caps in out for t in caps)
    assert not any(t.startswith("a picture of") for caps in out for t in caps)
    assert len({t for caps in out for t in caps}) > 10  # sampled, not one greedy caption repeated


def test_captions_do_not_depend_on_batching(captioner):
    pixels = torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(1)).numpy()
    keys = [f"k{i}" for i in range(5)]
    whole = captioner(pixels, keys)
    split = captioner(pixels[:2], keys[:2]) + captioner(pixels[2:], keys[2:])
    reordered = captioner(pixels[::-1].copy(), keys[::-1])[::-1]
    assert whole == split == reordered


def test_seed_and_key_change_the_samples(tiny_models, captioner):
    other = make_captioner(tiny_models, seed=1)
    pixels = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2)).numpy()
    assert captioner(pixels, ["x"]) != other(pixels, ["x"])
    assert captioner(pixels, ["x"]) != captioner(pixels, ["y"])
    assert row_seed(0, "x", 0) != row_seed(0, "x", 1) and row_seed(0, "x", 0) == row_seed(0, "x", 0)


def test_sampler_draws_by_inverse_cdf_within_the_nucleus():
    from transformers import TopPLogitsWarper

    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 4)
    scores = TopPLogitsWarper(0.9)(None, probs.log())  # keeps 0.5, 0.3, 0.15
    uniforms = torch.tensor([[0.1], [0.6], [0.99], [0.85]], dtype=torch.float64)
    out = SeededSampler(uniforms, prompt_len=0)(torch.zeros(4, 0, dtype=torch.long), scores)
    chosen = out.argmax(-1).tolist()
    # renormalised nucleus CDF: 0.526, 0.842, 1.0
    assert chosen == [0, 1, 2, 2]
    assert torch.isinf(out).sum().item() == 4 * 3  # exactly one finite logit per row


def test_sampling_frequencies_follow_the_nucleus_distribution():
    from transformers import TopPLogitsWarper

    probs = torch.tensor([[0.6, 0.25, 0.1, 0.05]])
    scores = TopPLogitsWarper(0.9)(None, probs.log())
    rng = torch.Generator().manual_seed(0)
    u = torch.rand(4000, 1, generator=rng, dtype=torch.float64)
    out = SeededSampler(u, prompt_len=0)(torch.zeros(4000, 0, dtype=torch.long), scores.repeat(4000, 1))
    freq = np.bincount(out.argmax(-1).numpy(), minlength=4) / 4000
    np.testing.assert_allclose(freq, [0.6 / 0.95, 0.25 / 0.95, 0.1 / 0.95, 0.0], atol=0.03)


def hf_generate_reference(captioner, pixels, keys, top_k, top_p, repetition_penalty, min_length, max_length):
    """BLIP's own ``generate`` with the same seeded draws. generate applies its penalty and
    min-length processors, then custom processors, then its own warpers: so its warpers are
    off (top_k=0, top_p=1) and ours come ahead of the sampler, which keeps HF's order."""
    from transformers import TopKLogitsWarper, TopPLogitsWarper

    prompt = captioner.processor.tokenizer("a picture of ", return_tensors="pt").input_ids.repeat(len(keys), 1)
    uniforms = row_uniforms(0, keys, 10, max_length)
    warpers = ([TopKLogitsWarper(top_k)] if top_k else []) + ([TopPLogitsWarper(top_p)] if top_p < 1 else [])
    with torch.inference_mode():
        out = captioner.model.generate(
            pixel_values=torch.as_tensor(pixels), input_ids=prompt, do_sample=True, top_p=1.0, top_k=0,
            repetition_penalty=repetition_penalty, num_return_sequences=10, min_length=min_length,
            max_length=max_length, logits_processor=[*warpers, SeededSampler(uniforms, prompt.shape[1] - 1)])
    return out[:, prompt.shape[1] - 1:]


@pytest.mark.parametrize("words, blip", [
    (["a", "circle", "'", "s", "square", ",", "left", "of", "a", "triangle", "."],
     "a circle's square, left of a triangle."),
    (["the", "square", "'", "s", "color", "!"], "the square's color!"),
    (["a", "red", ",", "a", "blue", "and", "a", "green", "circle", "."], "a red, a blue and a green circle."),
    (["##s", "circle"], "circle"),             # a word piece first: BLIP cuts len(prompt) characters
    ([",", "a", "circle"], "a circle"),
])
def test_captions_decode_as_blip_did(captioner, words, blip):
    """transformers 5 decodes ``a man ' s dog`` where BLIP (transformers 4.15) wrote ``a man's
    dog``: the captioner decodes BLIP's way whatever the checkpoint's tokenizer config says."""
    tok = captioner.processor.tokenizer
    ids = torch.cat([captioner.prompt_ids[0], torch.tensor(tok.convert_tokens_to_ids(words)),
                     torch.tensor([tok.sep_token_id, tok.pad_token_id])])[None]
    assert tok.unk_token_id not in ids.tolist()[0]
    assert blip_decode(tok, ids, "a picture of ") == [blip]
    if "'" in blip:  # what transformers 5 gives without the clean-up
        assert "' s" in tok.batch_decode(ids[:, PROMPT_IDS:], skip_special_tokens=True)[0]


@pytest.mark.parametrize("top_k, top_p, penalty, min_length, max_length", [
    (50, 0.9, 1.1, 10, 30),    # BLIP's settings
    (5, 0.9, 1.5, 7, 14),      # a top-k and a penalty that bite on the tiny vocabulary
    (50, 0.9, 1.1, 10, 10),    # fixed length
    (0, 1.0, 1.0, 0, 18),      # plain sampling
])
def test_samples_are_blips_own_generate(tiny_models, top_k, top_p, penalty, min_length, max_length):
    """The captioner runs the prompt and projects each image's features once for its 10
    samples; BLIP's ``generate`` does both 10 times. Same seeded draws: the same tokens."""
    cap = make_captioner(tiny_models, top_k=top_k, top_p=top_p, repetition_penalty=penalty,
                         min_length=min_length, max_length=max_length)
    pixels = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(3)).numpy()
    keys = [f"k{i}" for i in range(4)]
    ours = cap.token_ids(pixels, keys)[:, PROMPT_IDS:]
    reference = hf_generate_reference(cap, pixels, keys, top_k, top_p, penalty, min_length, max_length)
    assert ours.shape == reference.shape and torch.equal(ours, reference)
    assert ours.shape[1] <= max_length - PROMPT_IDS
    min_new = max(min_length - PROMPT_IDS, 0)
    assert (ours[:, :min_new] != cap.model.config.text_config.sep_token_id).all()  # no [SEP] before min_length
    assert len({tuple(r) for r in ours.tolist()}) > 10


def test_penalty_and_top_k_change_the_samples(tiny_models):
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5)).numpy()
    base = make_captioner(tiny_models, top_k=0, repetition_penalty=1.0).token_ids(pixels, ["a", "b"])
    assert not torch.equal(make_captioner(tiny_models, top_k=0).token_ids(pixels, ["a", "b"]), base)
    assert not torch.equal(make_captioner(tiny_models, top_k=3, repetition_penalty=1.0).token_ids(pixels, ["a", "b"]),
                           base)


def test_every_draw_stays_in_the_top_p_nucleus(captioner):
    """400 first tokens of one image: all inside its top-k 50 / top-p 0.9 nucleus (after the
    penalty). (HF generate with the sampler as its custom processor draws before its warpers
    are applied, and leaves the nucleus.)"""
    pixels = np.repeat(torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(4)).numpy(), 40, axis=0)
    keys = [f"k{i}" for i in range(40)]
    prompt_len = captioner.prompt_ids.shape[1]
    first = captioner.token_ids(pixels, keys)[:, prompt_len]
    with torch.inference_mode():
        embeds = captioner.model.vision_model(pixel_values=torch.as_tensor(pixels[:1]))[0]
        logits = captioner.model.text_decoder(input_ids=captioner.prompt_ids, encoder_hidden_states=embeds).logits[:, -1]
    for processor in captioner.logits_processors(torch.zeros(1, 1))[:-1]:
        logits = processor(captioner.prompt_ids, logits)
    nucleus = torch.isfinite(logits)[0]
    assert 0 < nucleus.sum() < nucleus.numel()
    assert nucleus[first].all()
    assert len(set(first.tolist())) > 20  # sampled, not greedy

    prompt = captioner.processor.tokenizer("a picture of ", return_tensors="pt").input_ids.repeat(40, 1)
    uniforms = row_uniforms(0, keys, 10, captioner.max_new_tokens)
    with torch.inference_mode():
        leaky = captioner.model.generate(pixel_values=torch.as_tensor(pixels), input_ids=prompt, do_sample=True,
                                         **BLIP, num_return_sequences=10, max_new_tokens=1,
                                         logits_processor=[SeededSampler(uniforms, prompt.shape[1] - 1)])
    assert not nucleus[leaky[:, prompt.shape[1] - 1]].all()
