"""All-gathers and the stage-1 losses on 2 real gloo processes vs one process on the whole batch."""
from __future__ import annotations

import os
from dataclasses import asdict

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from orchestration.ray_session import free_port
from tests.training.stage1_helpers import CAPTIONS, build_model, model_config, pixels
from training import distributed as D
from training.config import ModelConfig
from training.losses import itc_loss, negative_weights


B = 2  # per rank
TEXTS = [CAPTIONS[0], CAPTIONS[1], CAPTIONS[3], CAPTIONS[4]]  # rank 0 has a longer caption than rank 1
NEG_TEXT = torch.tensor([2, 3, 1, 0])   # global indices: negative text per image
NEG_IMAGE = torch.tensor([3, 2, 0, 1])  # negative image per text


def _worker(rank: int, world: int, port: int, cfg: dict, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = {"world": D.world_size(), "rank": D.rank()}
        # uneven dim-0 sizes, gradient of the with-grad gather lands on the owner
        x = torch.full((rank + 1, 2), float(rank + 1), requires_grad=True)
        gathered = D.all_gather_with_grad(x)
        coeff = torch.arange(gathered.shape[0], dtype=torch.float32)[:, None]
        (gathered * coeff).sum().backward()
        result.update(gathered=gathered.detach(), grad=x.grad, offset=D.rank_offset(rank + 1, x.device),
                      nograd=D.all_gather_no_grad(x).requires_grad)

        model = build_model(ModelConfig(**cfg), seed=0)
        rows = slice(rank * B, (rank + 1) * B)
        px = pixels(2 * B, seed=4)[rows]
        texts = TEXTS[rows]
        out = model(px, texts, itm_negatives=(NEG_TEXT[rows], NEG_IMAGE[rows]))
        result.update({k: v.item() for k, v in out.items()})
        with torch.no_grad():
            _, image_feat = model.encode_image(px)
            text_feat = model.encode_text(texts)[2]
            _, sim_i2t, sim_t2i = itc_loss(image_feat, text_feat, D.all_gather_no_grad(image_feat),
                                           D.all_gather_no_grad(text_feat), model.temp, D.rank_offset(B, px.device))
        cand = torch.ones_like(sim_i2t, dtype=torch.bool)
        cand[torch.arange(B), torch.arange(B) + rank * B] = False
        result.update(sim_i2t=sim_i2t, weights=negative_weights(sim_t2i, cand))

        # what the trainer does: DDP around the model, sampled hard negatives, backward
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(model.train())
        out = ddp(px, texts, generator=torch.Generator().manual_seed(rank))
        out["loss"].backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        result.update(ddp_loss=out["loss"].item(), grad_temp=grads["temp"], grad_cross=grads[
            "qformer.encoder.layer.0.crossattention.attention.value.weight"],
            all_grads=all(g is not None and torch.isfinite(g).all() for g in grads.values()))
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def cfg(tiny_models):
    return model_config(tiny_models)


def test_single_process_needs_no_process_group():
    assert not dist.is_initialized()
    x = torch.randn(3, 2, requires_grad=True)
    assert D.world_size() == 1 and D.rank() == 0 and D.rank_offset(3, x.device) == 0
    assert D.all_gather_no_grad(x) is x and D.all_gather_with_grad(x) is x  # LAVIS: identity on one GPU
    assert D.global_max(7, x.device) == 7


def test_two_gloo_ranks_equal_one_process_on_the_concatenated_batch(cfg, tmp_path):
    mp.spawn(_worker, args=(2, free_port(), asdict(cfg), str(tmp_path)), nprocs=2, join=True)
    r = [torch.load(tmp_path / f"rank{i}.pt") for i in range(2)]
    assert [x["world"] for x in r] == [2, 2] and [x["rank"] for x in r] == [0, 1]

    # gathers: rank order, uneven sizes, summed gradients, offsets, no grad through the no-grad gather
    expected = torch.tensor([[1.0, 1.0], [2.0, 2.0], [2.0, 2.0]])
    assert torch.equal(r[0]["gathered"], expected) and torch.equal(r[1]["gathered"], expected)
    assert torch.equal(r[0]["grad"], torch.tensor([[0.0, 0.0]]) * 2)
    assert torch.equal(r[1]["grad"], torch.tensor([[1.0, 1.0], [2.0, 2.0]]) * 2)  # both ranks' coefficients
    assert [x["offset"] for x in r] == [0, 1] and not r[0]["nograd"]
    # under DDP every rank ends the step with the same (averaged), finite gradients
    assert all(x["all_grads"] and torch.isfinite(torch.tensor(x["ddp_loss"])) for x in r)
    assert torch.equal(r[0]["grad_temp"], r[1]["grad_temp"]) and r[0]["grad_temp"].abs() > 0
    assert torch.allclose(r[0]["grad_cross"], r[1]["grad_cross"])

    model = build_model(cfg, seed=0)
    px = pixels(2 * B, seed=4)
    with torch.no_grad():
        out = model(px, TEXTS, itm_negatives=(NEG_TEXT, NEG_IMAGE))
        _, image_feat = model.encode_image(px)
        text_feat = model.encode_text(TEXTS)[2]
        _, sim_i2t, sim_t2i = itc_loss(image_feat, text_feat, image_feat, text_feat, model.temp, 0)
    # equal per-rank batches and 3B ITM rows per rank: the global mean is the mean of the rank means
    for key in ("loss_itc", "loss_itm"):
        assert abs((r[0][key] + r[1][key]) / 2 - out[key].item()) < 1e-5, key
    assert torch.allclose(torch.cat([r[0]["sim_i2t"], r[1]["sim_i2t"]]), sim_i2t, atol=1e-5)
    weights = negative_weights(sim_t2i, ~torch.eye(2 * B, dtype=torch.bool))
    assert torch.allclose(torch.cat([r[0]["weights"], r[1]["weights"]]), weights, atol=1e-6)
