"""The Q-Former: equal to transformers' Blip2QFormerModel, BERT init, the three attention masks."""
from __future__ import annotations

import pytest
import torch

from tests.training.stage1_helpers import CAPTIONS, build_model, model_config, pixels
from training.qformer import attention_bias, bidirectional_mask, multimodal_causal_mask, run_qformer



@pytest.fixture(scope="module")
def model(tiny_models):
    m = build_model(model_config(tiny_models), seed=1)
    with torch.no_grad():  # make the (fresh, near-zero) query/cross-attention params matter
        m.query_tokens.normal_(0, 1.0)
    return m


def hf_qformer(model, attn_implementation="eager"):
    """An independent transformers Blip2QFormerModel holding the same weights."""
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    cfg = Blip2QFormerConfig.from_dict(model.qformer.config.to_dict())
    cfg._attn_implementation = attn_implementation
    ref = Blip2QFormerModel(cfg).eval()
    ref.load_state_dict(model.qformer.state_dict())
    return ref


@torch.no_grad()
def test_query_only_equals_transformers(model):
    ref = hf_qformer(model)
    image_embeds, _ = model.encode_image(pixels(3))
    queries = model.query_tokens.expand(3, -1, -1)
    ours = run_qformer(model.qformer, queries, model.num_queries, None, image_embeds)
    theirs = ref(query_embeds=queries, encoder_hidden_states=image_embeds,
                 encoder_attention_mask=torch.ones(image_embeds.shape[:2], dtype=torch.long)).last_hidden_state
    assert ours.shape == (3, 8, 64)
    assert (ours - theirs).abs().max() <= 1e-5
    assert ours[0].sub(ours[1]).abs().max() > 1e-3  # the queries do read the image


@torch.no_grad()
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_query_and_text_equals_transformers(model, impl):
    """Bi-directional mask (ITM) over [queries; padded text] vs HF's own 2-D mask path."""
    ref = hf_qformer(model, impl)
    image_embeds, _ = model.encode_image(pixels(3))
    ids, mask = model.tokenize(CAPTIONS[:3])
    assert (mask == 0).any()  # padding is exercised
    queries = model.query_tokens.expand(3, -1, -1)
    embeds = model.embeddings(input_ids=ids, query_embeds=queries)
    ours = run_qformer(model.qformer, embeds, model.num_queries, bidirectional_mask(model.num_queries, mask),
                       image_embeds)
    full_mask = torch.cat([torch.ones(3, model.num_queries, dtype=torch.long), mask], dim=1)
    theirs = ref(query_embeds=embeds, query_length=model.num_queries, attention_mask=full_mask,
                 encoder_hidden_states=image_embeds).last_hidden_state
    valid = full_mask.bool()
    assert (ours - theirs)[valid].abs().max() <= 1e-5


@torch.no_grad()
def test_text_only_pass_equals_bert(model, tiny_models):
    """The Q-Former's text path right after init is the BERT encoder (no token-type embedding)."""
    from transformers import BertModel

    bert = BertModel.from_pretrained(tiny_models["bert"], add_pooling_layer=False).eval()
    ids, mask = model.tokenize(CAPTIONS[:3])
    fresh = build_model(model.cfg, seed=5)
    ours = run_qformer(fresh.qformer, fresh.embeddings(input_ids=ids), 0, bidirectional_mask(0, mask), None)
    bert.embeddings.token_type_embeddings.weight.zero_()
    theirs = bert(input_ids=ids, attention_mask=mask).last_hidden_state
    assert (ours - theirs)[mask.bool()].abs().max() <= 1e-5


def test_bert_init_copies_ffn_into_query_ffn_and_keeps_cross_attention_fresh(model, tiny_models):
    from safetensors.torch import load_file

    bert = load_file(str(tiny_models["bert"] / "model.safetensors"))
    fresh = build_model(model.cfg, seed=7)
    layer = fresh.qformer.encoder.layer[1]
    w = bert["bert.encoder.layer.1.intermediate.dense.weight"]
    assert torch.equal(layer.intermediate.dense.weight, w) and torch.equal(layer.intermediate_query.dense.weight, w)
    assert torch.equal(layer.output_query.LayerNorm.weight, bert["bert.encoder.layer.1.output.LayerNorm.weight"])
    assert torch.equal(fresh.qformer.layernorm.bias, bert["bert.embeddings.LayerNorm.bias"])
    std = fresh.qformer.config.initializer_range  # BERT's (the tiny one's 0.1; bert-base's 0.02)
    cross = fresh.qformer.encoder.layer[0].crossattention.attention.key.weight
    assert cross.shape == (64, fresh.vision.width) and 0.5 * std < cross.std() < 1.5 * std  # fresh, not copied
    vocab = bert["bert.embeddings.word_embeddings.weight"]
    word = fresh.embeddings.word_embeddings.weight
    assert word.shape[0] == vocab.shape[0] + 1 and torch.equal(word[:-1], vocab)  # + [DEC]
    assert fresh.itg_head.predictions.decoder.weight is word
    assert torch.equal(fresh.itg_head.predictions.bias[:-1], bert["cls.predictions.bias"])
    assert fresh.query_tokens.shape == (1, 8, 64) and 0.5 * std < fresh.query_tokens.std() < 1.5 * std


def test_masks_match_their_definitions():
    text_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    Q, T = 2, 4
    causal = multimodal_causal_mask(Q, text_mask)
    bidir = bidirectional_mask(Q, text_mask)
    for b in range(2):
        for i in range(Q + T):
            for j in range(Q + T):
                key_ok = j < Q or bool(text_mask[b, j - Q])
                assert bidir[b, i, j] == key_ok
                if i < Q:
                    expected = j < Q  # queries see only queries
                else:
                    expected = j < Q or (j <= i and key_ok)  # text: all queries + earlier text
                assert causal[b, i, j] == expected, (b, i, j)
    bias = attention_bias(causal, "eager", torch.float32)
    assert bias.shape == (2, 1, Q + T, Q + T) and bias[0, 0, 0, Q] == torch.finfo(torch.float32).min


@torch.no_grad()
def test_causal_mask_hides_the_future_and_the_text_from_queries(model):
    image_embeds, _ = model.encode_image(pixels(2))
    ids, mask = model.tokenize(["a red circle left of a blue square"] * 2)
    ids[1, 4] = model.tokenizer.convert_tokens_to_ids("green")  # change token 4 of row 1 only
    queries = model.query_tokens.expand(2, -1, -1)
    embeds = model.embeddings(input_ids=ids, query_embeds=queries)
    image_embeds = image_embeds[:1].expand(2, -1, -1)
    out = run_qformer(model.qformer, embeds, model.num_queries, multimodal_causal_mask(model.num_queries, mask),
                      image_embeds)
    Q = model.num_queries
    assert torch.allclose(out[0, : Q + 4], out[1, : Q + 4], atol=1e-6)  # queries + earlier text unchanged
    assert (out[0, Q + 4:] - out[1, Q + 4:]).abs().max() > 1e-3        # the changed token and later differ
