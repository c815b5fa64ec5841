"""Each stage-1 loss against a plain-torch reference written from the paper's definitions."""
from __future__ import annotations

import math

import pytest
import torch

from tests.training.stage1_helpers import CAPTIONS, build_model, model_config, pixels
from training.losses import itc_loss, itg_loss, negative_weights, sample_from, sample_hard_negatives


EPS = 0.1  # label smoothing


def smoothed_ce(logits: torch.Tensor, target: int) -> torch.Tensor:
    """-(1-ε)·log p[target] - ε·mean_c log p[c] for one row of logits."""
    logp = logits - torch.logsumexp(logits, dim=0)
    return -(1 - EPS) * logp[target] - EPS * logp.mean()


def ref_itc(image_feat, text_feat, temp):
    """Max over queries of the query/[CLS] cosine, both directions, smoothed CE, averaged."""
    G, Q, _ = image_feat.shape
    sim = torch.empty(G, G)
    for i in range(G):
        for j in range(G):
            sim[i, j] = max(float(image_feat[i, q] @ text_feat[j]) for q in range(Q)) / temp
    i2t = torch.stack([smoothed_ce(sim[i], i) for i in range(G)]).mean()
    t2i = torch.stack([smoothed_ce(sim[:, i], i) for i in range(G)]).mean()
    return (i2t + t2i) / 2, sim


def unit(*shape, seed):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return x / x.norm(dim=-1, keepdim=True)


def test_itc_equals_reference_and_splits_by_rank():
    img, txt, temp = unit(6, 4, 16, seed=0), unit(6, 16, seed=1), 0.07
    loss, sim_i2t, sim_t2i = itc_loss(img, txt, img, txt, torch.tensor(temp), offset=0)
    ref, sim = ref_itc(img, txt, temp)
    assert abs(loss.item() - ref.item()) < 1e-5
    assert torch.allclose(sim_i2t, sim, atol=1e-5) and torch.allclose(sim_t2i, sim.t(), atol=1e-5)
    # the global loss is the mean of the per-"rank" losses on row slices (offset = first global row)
    parts = [itc_loss(img[s:s + 3], txt[s:s + 3], img, txt, torch.tensor(temp), offset=s)[0] for s in (0, 3)]
    assert abs(sum(parts).item() / 2 - ref.item()) < 1e-5


def test_negative_weights_mask_the_diagonal_and_handle_degenerate_rows():
    sim = torch.randn(4, 4, generator=torch.Generator().manual_seed(0)) / 0.07
    cand = ~torch.eye(4, dtype=torch.bool)
    w = negative_weights(sim, cand)
    for i in range(4):
        e = torch.exp(sim[i] - sim[i].max())
        e[i] = 0
        assert torch.allclose(w[i], e / e.sum(), atol=1e-6)
    # no candidate → all zero → index -1; non-finite similarities → uniform over candidates
    sim[1, 2] = float("nan")
    cand[3] = False
    w = negative_weights(sim, cand)
    assert torch.allclose(w[1], torch.tensor([1 / 3, 0, 1 / 3, 1 / 3]))
    assert w[3].sum() == 0 and torch.isfinite(w).all()
    idx = sample_from(w, torch.Generator().manual_seed(0))
    assert idx[3] == -1 and (idx[:3] >= 0).all() and all(idx[i] != i for i in range(3))


def test_sampling_follows_the_weights_and_never_picks_excluded():
    sim = torch.tensor([[5.0, 1.0, 2.0, 2.0]]) / 1.0
    cand = torch.tensor([[False, True, True, False]])  # 0 = itself, 3 = a duplicate caption
    w = negative_weights(sim, cand)
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_from(w, gen) for _ in range(3000)]).flatten()
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    assert freq[0] == 0 and freq[3] == 0
    expected = math.e / (math.e + math.e ** 2)
    assert abs(freq[1].item() - expected) < 0.03
    t, i = sample_hard_negatives(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1, 1, dtype=torch.bool))
    assert t.tolist() == [-1] and i.tolist() == [-1]  # batch of one: no negative at all


def test_itg_loss_equals_reference():
    logits = torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[10, 3, 4, 5, 2], [10, 6, 2, -100, -100]])
    terms = [smoothed_ce(logits[b, t - 1], int(labels[b, t])) for b in range(2) for t in range(1, 5)
             if labels[b, t] != -100]
    assert abs(itg_loss(logits, labels).item() - torch.stack(terms).mean().item()) < 1e-5


@pytest.fixture(scope="module")
def model(tiny_models):
    m = build_model(model_config(tiny_models), seed=2)
    with torch.no_grad():
        m.query_tokens.normal_(0, 1.0)
        m.itm_head.weight.mul_(10)
    return m


@torch.no_grad()
def test_model_losses_equal_per_sample_references(model):
    """forward() with fixed negatives vs losses rebuilt one unpadded sample at a time."""
    texts, px = CAPTIONS[:4], pixels(4, seed=3)
    neg_text, neg_image = torch.tensor([2, 3, 0, -1]), torch.tensor([1, -1, 3, 2])
    out = model(px, texts, itm_negatives=(neg_text, neg_image))

    image_embeds, image_feat = model.encode_image(px)
    text_feat = torch.cat([model.encode_text([t])[2] for t in texts])
    ref, _ = ref_itc(image_feat, text_feat, model.temp.item())
    assert abs(out["loss_itc"].item() - ref.item()) < 1e-5

    def match_logits(i, t):
        ids, mask = model.tokenize([texts[t]])  # one caption: no padding
        return model.itm_logits(image_embeds[i:i + 1], ids, mask)[0]

    pairs = [(i, i, 1) for i in range(4)]
    pairs += [(int(neg_image[t]), t, 0) for t in range(4) if neg_image[t] >= 0]
    pairs += [(i, int(neg_text[i]), 0) for i in range(4) if neg_text[i] >= 0]
    assert len(pairs) == 10  # 3B minus the two rows without a negative
    itm = torch.stack([-torch.log_softmax(match_logits(i, t), dim=0)[y] for i, t, y in pairs]).mean()
    assert abs(out["loss_itm"].item() - itm.item()) < 1e-5

    terms = []
    for i, text in enumerate(texts):
        ids, mask = model.tokenize([text])
        ids[0, 0] = model.tokenizer.bos_token_id  # [DEC] replaces [CLS]
        logits = model.itg_logits(image_embeds[i:i + 1], ids, mask)[0]
        terms += [smoothed_ce(logits[t - 1], int(ids[0, t])) for t in range(1, ids.shape[1])]
    assert abs(out["loss_itg"].item() - torch.stack(terms).mean().item()) < 1e-5
    assert abs(out["loss"].item() - (ref + itm + torch.stack(terms).mean()).item()) < 1e-4


@torch.no_grad()
@pytest.mark.parametrize("texts", [["a red circle"], ["a red circle"] * 3])
def test_itm_without_any_negative_uses_the_positives_only(model, texts):
    """Batch of one / all captions identical: no candidate negative, ITM = CE over the B positives."""
    px = pixels(len(texts), seed=8)
    out = model(px, texts)
    image_embeds, _ = model.encode_image(px)
    ids, mask = model.tokenize(texts)
    logits = model.itm_logits(image_embeds, ids, mask)
    expected = torch.stack([-torch.log_softmax(row, dim=0)[1] for row in logits]).mean()
    assert abs(out["loss_itm"].item() - expected.item()) < 1e-5
    assert all(torch.isfinite(v) for v in out.values())


def test_temperature_is_clamped_like_lavis(model):
    with torch.no_grad():
        model.temp.fill_(5.0)
    model(pixels(2), CAPTIONS[:2])
    assert model.temp.item() == pytest.approx(0.5)
    with torch.no_grad():
        model.temp.fill_(0.07)
