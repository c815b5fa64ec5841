"""CapFilt throughput: our Ray Data job vs a plain single-process loop, side by side in one run.

Both sides use the same random "tiny but not trivial" BLIP captioner and CLIP ranker (built
here from configs, several times the test models' size), the same images, the same batch size
and the same generation settings: 10 captions per image sampled as BLIP does (top-k 50, top-p
0.9, repetition penalty 1.1), ``--length`` generated tokens each.

    .venv/bin/python benchmarks/capfilt.py --images 96 --batch-size 8          # a quick look
    .venv/bin/python benchmarks/capfilt.py --images 2048 --per-shard 64 --batch-size 8 --length 10 \
        --captioners 2 --caption-cpus 0.5 --colocate --decode-tasks 2 --repeat 3   # 2-core figures (also 4096)

The loop: decode -> BLIP processor -> generate -> CLIP processor -> CLIPModel -> top 2, one
batch after the other in one process (torch uses every core). The job: decode in CPU tasks,
captioner and ranker on their own actors (or, with --colocate, both in each captioner
actor), so decode, captioning and ranking overlap, one single-threaded process per core.
``--caption-cpus 0.5`` leaves logical CPUs for the decode and writer tasks (the actors use
whole cores anyway). With ``--real-sizes`` (for a CUDA machine) the models get BLIP-large /
CLIP ViT-L/14 shapes.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def build_models(out: Path, image_size: int, real_sizes: bool, tokenizer=None, device: str = "cpu") -> dict[str, Path]:
    """Random BLIP + CLIP, saved in save_pretrained layout (the job loads them from disk like real weights).

    ``tokenizer``: the captioner's (default: the tiny test vocabulary; a 30k-word one gives
    BLIP-large's real LM-head size). ``device``: where the random init runs (seconds on a GPU).
    """
    import torch
    from transformers import (BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor,
                              CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor)

    from orchestration.tiny_models import CLIP_MEAN, CLIP_STD, bert_tokenizer, clip_tokenizer

    torch.manual_seed(0)
    tok = tokenizer or bert_tokenizer(dec_token=True)
    if real_sizes:  # BLIP-large (ViT-L/16 384px + BERT-base decoder) and CLIP ViT-L/14 224px
        from orchestration import model_sizes as ms

        bv, bt, cv = ms.BLIP_LARGE_VISION, ms.BERT_BASE, ms.CLIP_L14_VISION
        ct = {k: v for k, v in ms.CLIP_L14_TEXT.items() if k != "max_position_embeddings"}
        proj, caption_px, rank_px, positions = ms.CLIP_L14_PROJECTION, 384, 224, 512
    else:
        bv = dict(hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=6,
                  image_size=image_size, patch_size=16)
        bt = dict(hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=6)
        cv = dict(hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=6,
                  image_size=image_size, patch_size=16)
        ct = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4)
        proj, caption_px, rank_px, positions = 128, image_size, image_size, 64
    text = dict(vocab_size=len(tok), max_position_embeddings=positions, bos_token_id=tok.bos_token_id,
                pad_token_id=tok.pad_token_id, sep_token_id=tok.sep_token_id, eos_token_id=tok.sep_token_id,
                encoder_hidden_size=bv["hidden_size"], **bt)
    ctok = clip_tokenizer()
    ctext = dict(vocab_size=len(ctok), max_position_embeddings=77, bos_token_id=ctok.bos_token_id,
                 eos_token_id=ctok.eos_token_id, pad_token_id=ctok.pad_token_id, **ct)
    paths = {"captioner": out / "captioner", "ranker": out / "ranker"}
    with torch.device(device):
        blip = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=bv))
        clip = CLIPModel(CLIPConfig(text_config=ctext, vision_config=cv, projection_dim=proj))
    blip.save_pretrained(paths["captioner"])
    clip.save_pretrained(paths["ranker"])
    BlipProcessor(BlipImageProcessor(size={"height": caption_px, "width": caption_px}, image_mean=CLIP_MEAN,
                                     image_std=CLIP_STD), tok).save_pretrained(paths["captioner"])
    CLIPProcessor(CLIPImageProcessor(size={"shortest_edge": rank_px}, crop_size={"height": rank_px, "width": rank_px},
                                     image_mean=CLIP_MEAN, image_std=CLIP_STD), ctok).save_pretrained(paths["ranker"])
    return paths


def build_input(root: Path, n: int, per_shard: int, size: int) -> str:
    import hashlib

    import pyarrow as pa

    from pipelines.schema import DOWNLOAD
    from pipelines.shardio import ShardSet
    from pipelines.synthetic import make_corpus

    items = make_corpus(root / "corpus", n=n, seed=0, size=size)
    ss = ShardSet(str(root / "download"))
    for s in range(0, n, per_shard):
        rows = []
        for it in items[s:s + per_shard]:
            data = (root / "corpus" / it.file).read_bytes()
            rows.append(dict(key=f"bench/{it.index:06d}", source="synthetic", policy="web", url=None,
                             caption=it.caption, captions=[it.caption], duplicate_of=None, meta=None, image=data, width=size,
                             height=size, original_width=size, original_height=size, status="ok", error=None,
                             sha256=hashlib.sha256(data).hexdigest()))
        ss.write_shard(s // per_shard, pa.Table.from_pylist(rows, schema=DOWNLOAD.arrow_schema()), DOWNLOAD)
    return ss.uri


def plain_loop(input_uri: str, models: dict, batch_size: int, length: int) -> tuple[float, int]:
    """The obvious single-process implementation. Returns (seconds, images)."""
    import torch
    from PIL import Image
    from transformers import BlipForConditionalGeneration, BlipProcessor, CLIPModel, CLIPProcessor

    from pipelines.schema import DOWNLOAD
    from pipelines.shardio import ShardSet

    start = time.perf_counter()
    blip_proc = BlipProcessor.from_pretrained(models["captioner"])
    blip = BlipForConditionalGeneration.from_pretrained(models["captioner"]).eval()
    clip_proc = CLIPProcessor.from_pretrained(models["ranker"])
    clip = CLIPModel.from_pretrained(models["ranker"]).eval()
    prompt = blip_proc.tokenizer("a picture of ", return_tensors="pt").input_ids
    torch.manual_seed(0)
    rows = [r for _, b in ShardSet(input_uri).iter_batches(DOWNLOAD) for r in b.to_pylist() if r["status"] == "ok"]
    kept = 0
    for s in range(0, len(rows), batch_size):
        batch = rows[s:s + batch_size]
        images = [Image.open(io.BytesIO(r["image"])).convert("RGB") for r in batch]
        with torch.inference_mode():
            px = blip_proc(images=images, return_tensors="pt")["pixel_values"]
            out = blip.generate(pixel_values=px, input_ids=prompt.repeat(len(batch), 1), do_sample=True, top_p=0.9,
                                top_k=50, repetition_penalty=1.1, num_return_sequences=10, min_new_tokens=length,
                                max_new_tokens=length)
            caps = blip_proc.tokenizer.batch_decode(out[:, prompt.shape[1] - 1:], skip_special_tokens=True)
            texts = [t for b, r in enumerate(batch) for t in [r["caption"], *caps[b * 10:(b + 1) * 10]]]
            enc = clip_proc(text=texts, images=images, return_tensors="pt", padding=True, truncation=True,
                            max_length=clip.config.text_config.max_position_embeddings)
            img = torch.nn.functional.normalize(clip.get_image_features(pixel_values=enc["pixel_values"]).pooler_output, dim=-1)
            txt = torch.nn.functional.normalize(clip.get_text_features(input_ids=enc["input_ids"],
                                                                        attention_mask=enc["attention_mask"]).pooler_output, dim=-1)
            scores = torch.einsum("bd,bcd->bc", img, txt.view(len(batch), 11, -1))
            kept += scores.topk(2, dim=1).indices.numel() // 2
    return time.perf_counter() - start, kept


def _worker_ready() -> int:
    time.sleep(0.5)  # holds its CPU, so the next call lands on another worker
    return os.getpid()


def ray_job(input_uri: str, output_uri: str, models: dict, batch_size: int, length: int, args) -> tuple[float, dict]:
    import ray

    from capfilt.config import CapFiltConfig
    from capfilt.job import run_capfilt

    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    # Start the clock on a running Ray, as a job submitted to a cluster finds it: its
    # prestarted worker processes booted (they would otherwise boot inside the timed window).
    ray.get([ray.remote(num_cpus=1)(_worker_ready).remote() for _ in range(int(ray.cluster_resources()["CPU"]))])
    from transformers import AutoTokenizer

    # The config's lengths count the prompt's decoder ids ([DEC] + prompt, without [SEP]).
    prompt_ids = len(AutoTokenizer.from_pretrained(models["captioner"])(CapFiltConfig.prompt).input_ids) - 1
    cfg = CapFiltConfig(input=input_uri, output=output_uri, captioner=str(models["captioner"]),
                        ranker=str(models["ranker"]), min_length=length + prompt_ids, max_length=length + prompt_ids,
                        top_p=0.9, top_k=50, repetition_penalty=1.1, batch_size=batch_size,
                        rank_batch_size=batch_size, caption_num_cpus=args.caption_cpus, rank_num_cpus=args.rank_cpus,
                        caption_concurrency=(args.captioners, args.captioners),
                        decode_concurrency=args.decode_tasks,
                        caption_num_gpus=args.gpus_per_actor if args.gpu else 0.0,
                        rank_num_gpus=args.gpus_per_actor if args.gpu else 0.0,
                        colocate_ranker=args.colocate, write_candidates=True, write_embeddings=True)
    marks = []  # (seconds since start, images in the shard) per completed shard

    def log(message: str) -> None:
        if " complete (" in message:
            marks.append((time.perf_counter() - start, int(message.split(" complete (")[1].split()[0])))

    start = time.perf_counter()
    summary = run_capfilt(cfg, seed=0, log=log)
    seconds = time.perf_counter() - start
    summary["first_shard_s"] = round(marks[0][0], 2) if marks else None
    if len(marks) > 1:  # steady state: from the first finished shard to the last
        summary["steady_images_per_s"] = round(sum(n for _, n in marks[1:]) / (marks[-1][0] - marks[0][0]), 2)
    ray.shutdown()
    return seconds, summary


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=96)
    p.add_argument("--per-shard", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--length", type=int, default=12, help="generated tokens per caption (min = max)")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of the local Ray (default: all)")
    p.add_argument("--caption-cpus", type=float, default=1.0)
    p.add_argument("--rank-cpus", type=float, default=0.5)
    p.add_argument("--captioners", type=int, default=1)
    p.add_argument("--decode-tasks", type=int, default=None, help="decode tasks in flight (default: Ray Data decides)")
    p.add_argument("--real-sizes", action="store_true", help="BLIP-large / CLIP ViT-L/14 shapes (for a GPU)")
    p.add_argument("--gpu", action="store_true", help="model actors on GPUs")
    p.add_argument("--gpus-per-actor", type=float, default=1.0, help="with --gpu: 0.5 puts captioner + ranker on one GPU")
    p.add_argument("--colocate", action="store_true", help="ranker inside the captioner actors")
    p.add_argument("--skip-loop", action="store_true")
    p.add_argument("--repeat", type=int, default=1, help="job + loop pairs, one after the other (the median ratio is printed)")
    args = p.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench-capfilt-"))
    try:
        models = build_models(root / "models", args.image_size, args.real_sizes)
        input_uri = build_input(root, args.images, args.per_shard, args.image_size)
        ratios = []
        for rep in range(args.repeat):  # job and loop alternate, so a slow spell of the machine hits both
            job_s, summary = ray_job(input_uri, str(root / f"out{rep}"), models, args.batch_size, args.length, args)
            loop_s, loop_n = (None, 0) if args.skip_loop else plain_loop(input_uri, models, args.batch_size, args.length)
            n = summary["images_out"]
            result = {"run": rep + 1, "images": args.images, "batch_size": args.batch_size,
                      "caption_tokens": args.length, "cpus": os.cpu_count(), "job_s": round(job_s, 2),
                      "job_images_per_s": round(n / job_s, 3), "first_shard_s": summary["first_shard_s"],
                      "steady_images_per_s": summary.get("steady_images_per_s")}
            if loop_s:
                result.update(loop_s=round(loop_s, 2), loop_images_per_s=round(loop_n / loop_s, 3),
                              speedup=round((n / job_s) / (loop_n / loop_s), 3))
                ratios.append(result["speedup"])
            print(json.dumps(result))
            print(f"job  {result['job_images_per_s']:.2f} images/s ({job_s:.1f} s, Ray start excluded, model loads included)")
            if summary.get("steady_images_per_s"):
                print(f"     first shard after {summary['first_shard_s']:.1f} s (actor start-up, model loads, pipeline fill); "
                      f"{summary['steady_images_per_s']:.2f} images/s from then on")
            if loop_s:
                print(f"loop {result['loop_images_per_s']:.2f} images/s ({loop_s:.1f} s, model loads included)")
                print(f"ratio job/loop: {result['speedup']:.2f}x", flush=True)
        if len(ratios) > 1:
            print(f"ratio job/loop over {len(ratios)} runs: median {statistics.median(ratios):.2f}x "
                  f"(min {min(ratios):.2f}x, max {max(ratios):.2f}x)")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
