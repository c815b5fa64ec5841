"""GPU figures with the paper's architecture sizes and random weights (speed only), in one run.

stage1   BLIP-2 stage-1 training step (frozen EVA ViT-g/14 in fp16 + BERT-base Q-Former, 32
         queries, 32 text tokens, ITC + ITM + ITG) through the same ``Blip2Stage1.from_config`` /
         ``build_optimizer`` / ``autocast`` code the Ray Train loop runs: samples/s per GPU, peak
         memory, model FLOPs per sample (counted by ``torch.utils.flop_counter``) and MFU against
         the card's dense bf16 peak (989 TFLOP/s on H100/H200 SXM) and against a bf16 matmul
         measured here. Target: >= 400 samples/s per H100.
capfilt  The CapFilt job's own model stages (``capfilt.captioner.Captioner``: BLIP-large, 10
         nucleus captions per image with the seeded sampler; ``capfilt.ranker.Ranker``: CLIP
         ViT-L/14 over 11 candidates) on one GPU in fp16: images/s per GPU, side by side with
         plain HF ``generate`` sampling on the same model (what our seeded draws cost and our
         per-image sharing of prompt and cross-attention work saves), and
         the CPU decode + preprocess rate per core (how many CPUs one GPU needs).

    python benchmarks/gpu.py stage1 --batch 105 210        # on a CUDA machine
    python benchmarks/gpu.py capfilt --batch 64 --length 12 26
    python benchmarks/gpu.py stage1 capfilt --tiny          # CPU smoke run of the script itself

Random weights: generation never stops early (EOS is as likely as any token), so every caption
has exactly ``--length`` generated tokens: 26 is the most the config's max_length (30 ids, the
4 prompt ids included) allows (worst case), ~12 is typical of real BLIP captions. Both sides
sample as BLIP does (top-k 50, top-p 0.9, repetition penalty 1.1).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from orchestration.model_sizes import BERT_VOCAB, bert_tokenizer, eva_vit_g_config, random_texts  # noqa: E402
from orchestration.rehearse import DENSE_BF16_PEAK  # noqa: E402


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def save_random(model_cls, config, out: Path, dtype: torch.dtype) -> Path:
    """Random init on the GPU (seconds, not minutes on CPU), saved in save_pretrained layout."""
    torch.manual_seed(0)
    with torch.device(device()):
        model = model_cls(config)
    model.to(dtype).save_pretrained(out)
    del model
    return out


def matmul_peak() -> float:
    """Measured bf16 dense matmul FLOP/s (8192^3, median of 10 after warm-up)."""
    if not torch.cuda.is_available():
        return float("nan")
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * 8192 ** 3 / sorted(times)[len(times) // 2]


# -- stage 1 ------------------------------------------------------------------------------------
def stage1(args, work: Path) -> list[dict]:
    from transformers import BertConfig, BertForMaskedLM, Blip2VisionConfig, Blip2VisionModel

    from training.config import ModelConfig
    from training.stage1 import Blip2Stage1

    if args.tiny:
        vcfg = Blip2VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 image_size=56, patch_size=14)
        bcfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
        vocab, image_size = 1000, 56
    else:  # EVA ViT-g/14 (width 1408, 39 layers) + bert-base-uncased
        vcfg, bcfg, vocab, image_size = eva_vit_g_config(), {}, BERT_VOCAB, 224
    vision_dir = save_random(Blip2VisionModel, vcfg, work / "eva_vit_g", torch.float16)
    bert_dir = work / "bert"
    save_random(BertForMaskedLM, BertConfig(vocab_size=vocab, **bcfg), bert_dir, torch.float32)
    bert_tokenizer(vocab, dec_token=False).save_pretrained(bert_dir)

    dev = device()
    mcfg = ModelConfig(vision="eva_vit_g", vision_path=str(vision_dir), qformer_init=str(bert_dir),
                       frozen_dtype="float16" if dev.type == "cuda" else "float32", image_size=image_size,
                       num_query_tokens=32, embed_dim=256, max_text_len=32)
    torch.manual_seed(0)
    model = Blip2Stage1.from_config(mcfg).to(dev)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.vision.parameters())
    rows = []
    for compiled in ([False, True] if args.compile else [False]):
        if compiled:  # what train.compile does: the frozen tower compiled in place (static shapes)
            model.vision.model.compile(dynamic=False)
        rows += stage1_rows(args, model, image_size, vocab, dev, compiled, trainable, frozen)
    return rows


def stage1_rows(args, model, image_size, vocab, dev, compiled, trainable, frozen) -> list[dict]:
    from torch.utils.flop_counter import FlopCounterMode

    from training.config import TrainConfig
    from training.optim import autocast, build_optimizer, grad_scaler, optimizer_step

    rows = []
    for batch in args.batch:
        tcfg = TrainConfig(precision=args.precision if dev.type == "cuda" else "fp32", steps=1000, warmup_steps=10)
        opt, sched = build_optimizer(model, tcfg)
        scaler = grad_scaler(tcfg.precision, dev)
        pixels = torch.randn(batch, 3, image_size, image_size, device=dev)
        texts = random_texts(batch, args.words, vocab, seed=batch)

        def step():
            with autocast(tcfg.precision, dev):
                loss = model(pixels, texts)["loss"]
            scaler.scale(loss).backward()
            optimizer_step(opt, sched, scaler)

        model.train()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        for _ in range(args.warmup):
            step()
        with FlopCounterMode(display=False) as counter:
            step()
        flops = counter.get_total_flops()
        sync()
        t = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync()
        seconds = (time.perf_counter() - t) / args.steps
        with torch.no_grad():  # the frozen tower's share of the step
            model.vision(pixels)
            sync()
            t = time.perf_counter()
            for _ in range(3):
                model.vision(pixels)
            sync()
            vision_s = (time.perf_counter() - t) / 3
        if args.profile and batch == max(args.batch):
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                step()
                sync()
            table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25)
            Path(args.profile).write_text(table)
        rows.append({"bench": "stage1", "batch": batch, "precision": tcfg.precision, "compiled_vision": compiled,
                     "s_per_step": seconds, "vision_s": vision_s,
                     "samples_per_s": batch / seconds, "flops_per_sample": flops / batch,
                     "tflops_per_s": flops / seconds / 1e12, "trainable_params": trainable, "frozen_params": frozen,
                     "peak_mem_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else 0})
    return rows


# -- capfilt ------------------------------------------------------------------------------------
def capfilt(args, work: Path) -> list[dict]:
    import numpy as np

    from benchmarks.capfilt import build_models
    from capfilt.captioner import Captioner
    from capfilt.preprocess import Preprocess
    from capfilt.ranker import Ranker
    from pipelines.synthetic import make_corpus

    # BLIP-large + CLIP ViT-L/14 shapes (the CapFilt benchmark's --real-sizes), BERT's real vocabulary
    tok = None if args.tiny else bert_tokenizer(BERT_VOCAB, dec_token=True)
    models = build_models(work / "models", 64, real_sizes=not args.tiny, tokenizer=tok, device=str(device()))
    cap_dir, rank_dir = models["captioner"], models["ranker"]

    n_img = max(args.batch) * (args.rounds + 1)
    items = make_corpus(work / "corpus", n=n_img, seed=0, size=args.image_px)
    blobs = [(work / "corpus" / it.file).read_bytes() for it in items]
    captions = [it.caption for it in items]
    keys = [f"bench/{i:06d}" for i in range(n_img)]

    # CPU side: decode + both processors, one process (= one CPU of a decode task)
    pre = Preprocess.from_models(str(cap_dir), str(rank_dir), max_pixels=10 ** 8)
    pre({"key": np.array(keys[:8], dtype=object), "image": np.array(blobs[:8], dtype=object)})
    t = time.perf_counter()
    chunk = 64
    pixels = {"caption_pixels": [], "rank_pixels": []}
    for s in range(0, n_img, chunk):
        out = pre({"key": np.array(keys[s:s + chunk], dtype=object), "image": np.array(blobs[s:s + chunk], dtype=object)})
        for k in pixels:
            pixels[k].append(out[k])
    decode_rate = n_img / (time.perf_counter() - t)
    pixels = {k: np.concatenate(v) for k, v in pixels.items()}

    ranker = Ranker(str(rank_dir))
    rows = []
    for length in args.length:
        prompt_ids = 4  # [DEC] a picture of: the captioner's lengths count them
        captioner = Captioner(str(cap_dir), prompt="a picture of ", num_captions=10, top_p=0.9, top_k=50,
                              repetition_penalty=1.1, min_length=length + prompt_ids,
                              max_length=length + prompt_ids, seed=0)
        hf = captioner.model
        for batch in args.batch:
            def ours(s):
                caps = captioner(pixels["caption_pixels"][s:s + batch], keys[s:s + batch])
                return caps

            def plain_hf(s):  # HF's own BLIP sampling (global RNG): the baseline our seeded sampler adds to
                px = torch.as_tensor(pixels["caption_pixels"][s:s + batch]).to(captioner.device, captioner.dtype)
                ids = captioner.processor.tokenizer("a picture of ", return_tensors="pt").input_ids
                ids = ids.repeat(len(px), 1).to(captioner.device)  # generate swaps in [DEC] and drops [SEP] itself
                with torch.inference_mode():
                    out = hf.generate(pixel_values=px, input_ids=ids, do_sample=True, top_p=0.9, top_k=50,
                                      repetition_penalty=1.1, num_return_sequences=10, min_new_tokens=length,
                                      max_new_tokens=length)
                return captioner.processor.tokenizer.batch_decode(out, skip_special_tokens=True)

            def rank(s, caps):
                cands = [[captions[s + i], *c] for i, c in enumerate(caps)]
                return ranker.score(pixels["rank_pixels"][s:s + batch], cands)

            caps = ours(0)          # warm-up (kernels, allocator)
            rank(0, caps)
            plain_hf(0)
            t_cap = t_rank = t_hf = 0.0
            for r in range(1, args.rounds + 1):
                s = r * batch
                sync(); t = time.perf_counter()
                caps = ours(s)
                sync(); t_cap += time.perf_counter() - t
                t = time.perf_counter()
                scores, _, _ = rank(s, caps)
                sync(); t_rank += time.perf_counter() - t
                t = time.perf_counter()
                plain_hf(s)
                sync(); t_hf += time.perf_counter() - t
            assert all(len(c) == 10 for c in caps) and scores.shape == (batch, 11)
            n = batch * args.rounds
            rows.append({"bench": "capfilt", "batch": batch, "caption_tokens": length,
                         "images_per_s_per_gpu": n / (t_cap + t_rank), "caption_images_per_s": n / t_cap,
                         "rank_images_per_s": n / t_rank, "captions_per_s": 10 * n / (t_cap + t_rank),
                         "hf_generate_images_per_s": n / t_hf, "seeded_vs_hf": t_hf / t_cap,
                         "cpu_decode_images_per_s_per_core": decode_rate,
                         "peak_mem_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else 0})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", nargs="+", choices=["stage1", "capfilt"])
    ap.add_argument("--batch", type=int, nargs="+", default=None)
    ap.add_argument("--precision", default="bf16", choices=["fp16", "bf16"])
    ap.add_argument("--steps", type=int, default=20, help="timed stage-1 steps per batch size")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--words", type=int, default=30, help="words per training caption (max_text_len caps at 32 tokens)")
    ap.add_argument("--length", type=int, nargs="+", default=[12, 30], help="generated tokens per caption")
    ap.add_argument("--rounds", type=int, default=4, help="timed CapFilt batches")
    ap.add_argument("--image-px", type=int, default=384, help="side of the synthetic JPEGs")
    ap.add_argument("--compile", action="store_true", help="stage1: also with the frozen tower torch.compile'd")
    ap.add_argument("--profile", default=None, help="stage1: write a torch.profiler table of one step here")
    ap.add_argument("--tiny", action="store_true", help="tiny configs: a CPU smoke run of this script")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args()

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    peak = next((v for k, v in DENSE_BF16_PEAK.items() if k in name), float("nan"))
    measured = matmul_peak()
    print(f"device {name}  torch {torch.__version__}  dense bf16 peak {peak / 1e12:.0f} TFLOP/s (datasheet), "
          f"{measured / 1e12:.0f} TFLOP/s measured (8192^3 matmul)", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="blip2-gpu-bench-") as tmp:
        for what in args.what:
            a = argparse.Namespace(**vars(args))
            if a.batch is None:
                a.batch = ([4] if args.tiny else [105, 210]) if what == "stage1" else ([4] if args.tiny else [32, 64])
            if args.tiny:
                a.length, a.rounds, a.steps, a.warmup, a.image_px = [4], 1, 2, 1, 96
            rows += (stage1 if what == "stage1" else capfilt)(a, Path(tmp) / what)
    for r in rows:
        if r["bench"] == "stage1":
            r["mfu"] = r["tflops_per_s"] * 1e12 / peak
            r["of_measured_matmul"] = r["tflops_per_s"] * 1e12 / measured
            print(f"stage1  batch {r['batch']:4d} {r['precision']} {'compiled' if r['compiled_vision'] else 'eager':8s} "
                  f"{r['samples_per_s']:7.1f} samples/s  {r['s_per_step'] * 1e3:7.1f} ms/step "
                  f"(frozen ViT fwd {r['vision_s'] * 1e3:5.1f})  {r['flops_per_sample'] / 1e9:6.1f} GFLOP/sample  "
                  f"{r['tflops_per_s']:6.1f} TFLOP/s  MFU {r['mfu']:.1%} (of measured matmul {r['of_measured_matmul']:.1%})  "
                  f"peak mem {r['peak_mem_gib']:.1f} GiB  [target >= 400 samples/s per H100]")
        else:
            print(f"capfilt batch {r['batch']:4d} len {r['caption_tokens']:2d}  {r['images_per_s_per_gpu']:7.1f} images/s/GPU "
                  f"(caption {r['caption_images_per_s']:.1f}, rank {r['rank_images_per_s']:.1f})  "
                  f"plain HF generate {r['hf_generate_images_per_s']:.1f} (seeded/plain {r['seeded_vs_hf']:.2f}x)  "
                  f"CPU decode {r['cpu_decode_images_per_s_per_core']:.0f} images/s/core  peak mem {r['peak_mem_gib']:.1f} GiB")
    print(json.dumps(rows))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
