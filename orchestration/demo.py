"""The end-to-end demo: every step of the real pipeline, on this machine, in minutes.

It generates the synthetic shapes corpus, serves it on 127.0.0.1, and then runs exactly the
commands a user runs on a cluster — download, capfilt, curate, shards search, train (stage 1
and 2), eval, shards inspect, export-hf, caption — in one process and one local Ray session,
printing each command line before running it. Tiny models stand in for BLIP-large, CLIP, EVA,
BERT and OPT; the captioner, the CLIP ranker and OPT are first taught the shapes world
(``tiny_teacher``), so that each step's output can be checked against the truth: a quarter of
the web captions are wrong (as alt-text often is), CapFilt ranks all 11 captions and keeps the
top two as the paper does, and the stage-2 model, exported to transformers, captions held-out
images.
"""
from __future__ import annotations

import json
import os
import random
import shlex
import time
import urllib.parse
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from orchestration import cli
from pipelines.shardio import ShardSet

STEPS = ("models", "corpus", "download", "capfilt", "curate", "train1", "train2", "eval", "report", "export")
REPOSTS = 4                 # URLs that serve an image the list already has (exact duplicates for curate)
WRONG_WEB_CAPTIONS = 0.25   # share of web captions that describe another image (noisy alt-text)
SEARCH_QUERY = "a red circle above a blue square"
CAPTIONED = 4               # held-out images captioned by the exported model


def _banner(title: str) -> None:
    print(f"\n=== {title} " + "=" * max(0, 70 - len(title)), flush=True)


def _blip2(*argv: str) -> None:
    """Run one `blip2` command in-process (same Ray session), echoing it like a shell would."""
    print("$ blip2 " + " ".join(shlex.quote(a) for a in argv), flush=True)
    rc = cli.main(list(argv))
    if rc != 0:
        raise SystemExit(f"demo: `blip2 {argv[0]}` failed with exit code {rc}")


def web_captions(items, seed: int, wrong: float = WRONG_WEB_CAPTIONS) -> list[str]:
    """Each image's alt-text: its true caption, except for a seeded ``wrong`` share that carries
    another image's caption."""
    rng = random.Random(seed)
    texts = [it.caption for it in items]
    for i in rng.sample(range(len(items)), round(wrong * len(items))):
        texts[i] = next(t for t in rng.sample(texts, len(texts)) if t != items[i].caption)
    return texts


def write_url_list(items, base_url: str, path: Path, texts: list[str], broken: int = 2,
                   reposts: int = REPOSTS) -> Path:
    """A LAION-format URL list (parquet: URL, TEXT) for the served corpus, plus a few broken URLs
    so the download summary shows counted failures, and a few re-posts (another URL, same image)
    for curate's exact dedup."""
    urls = [f"{base_url}/{it.file}" for it in items] + [f"{base_url}/missing/{i}.jpg" for i in range(broken)]
    texts = list(texts) + ["a lost image"] * broken
    urls += [f"{base_url}/{it.file}?repost=1" for it in items[:reposts]]
    texts += [f"re-posted: {it.caption}" for it in items[:reposts]]
    pq.write_table(pa.table({"URL": urls, "TEXT": texts}), path)
    return path


def write_coco_annotations(items, path: Path) -> Path:
    """Karpathy-style COCO test annotations: one entry per image with its caption list."""
    path.write_text(json.dumps([{"image": it.file, "caption": [it.caption]} for it in items]))
    return path


def caption_truth(capfilt_dir: Path, items) -> dict:
    """How often the web caption and CapFilt's first kept caption name what the image shows."""
    from orchestration.tiny_teacher import names_the_image

    by_file = {it.file: it for it in items}
    web = kept = rows = 0
    cosines = []
    columns = ["url", "captions", "scores", "original_caption"]
    for _, batch in ShardSet(str(capfilt_dir)).iter_batches(columns=columns):
        for url, captions, scores, original in zip(*(batch.column(c).to_pylist() for c in columns)):
            item = by_file.get(urllib.parse.urlsplit(url).path.lstrip("/"))
            if item is None or "?" in url:  # the re-posts carry a prefixed caption
                continue
            rows += 1
            web += names_the_image(original or "", item)
            kept += names_the_image(captions[0], item)
            cosines.append(scores[0])
    cosines.sort()
    return {"rows": rows, "web_right": web, "kept_right": kept,
            "median_kept_cosine": round(cosines[len(cosines) // 2], 3) if cosines else None}


def caption_with_transformers(hf_dir: Path, files: list[Path], prompt: str, max_new_tokens: int) -> list[str]:
    """Greedy captions from the exported directory, read by plain transformers alone."""
    import torch
    from PIL import Image
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    model = Blip2ForConditionalGeneration.from_pretrained(hf_dir, trust_remote_code=False).eval()
    processor = Blip2Processor.from_pretrained(hf_dir, trust_remote_code=False)
    images = [Image.open(f).convert("RGB") for f in files]
    inputs = processor(images=images, text=[prompt] * len(images), return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=max_new_tokens, num_beams=1, do_sample=False)
    ids = ids[:, inputs["input_ids"].shape[1]:]  # decoder-only: the prompt's ids come back first
    return [t.strip() for t in processor.tokenizer.batch_decode(ids, skip_special_tokens=True)]


def quiet_libraries() -> None:
    """No per-file progress bars, CPU-fallback notices or Ray Data progress logs over the steps'
    output (errors still show; Ray's full logs stay in its session folder)."""
    import logging

    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    disable_progress_bars()
    # Ray Data re-reads this each time it configures its loggers (once per dataset); at INFO a
    # non-terminal stdout gets a progress log every 10 s. A terminal still shows its progress bars.
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
    logging.getLogger("ray.data").setLevel(os.environ["RAY_DATA_LOG_LEVEL"])


def run_demo(workdir: Path, images: int, heldout: int, stage1_steps: int, stage2_steps: int,
             seed: int, workers: int, teach_steps: int | None = None, extra: list[str] = ()) -> dict:
    from orchestration.config import load_config
    from orchestration.ray_session import ensure_ray, logs_dir
    from orchestration.tiny_models import build_tiny_models
    from orchestration.tiny_teacher import TAUGHT, names_the_image, teach_tiny_models
    from pipelines.synthetic import make_corpus, serve_directory

    t0 = time.time()
    quiet_libraries()
    timings: dict[str, float] = {}
    workdir = workdir.resolve()
    cfg = load_config("tiny", ["ray.log_to_driver=false", *extra])
    models_dir, corpus_dir, heldout_dir = workdir / "models", workdir / "corpus", workdir / "heldout"
    download_out, capfilt_out, train_out = workdir / "download", workdir / "capfilt", workdir / "train"

    def tick(name: str, start: float) -> None:
        timings[name] = round(time.time() - start, 1)

    _banner("1/10 tiny models (save_pretrained layout), captioner/CLIP/OPT taught the shapes world")
    s = time.time()
    random_models = build_tiny_models(models_dir, seed=seed)
    steps = None if teach_steps is None else {name: teach_steps for name in TAUGHT}
    models = teach_tiny_models(random_models, models_dir / "taught", prompt=cfg.capfilt.prompt, seed=seed, steps=steps)
    for name in ("captioner", "ranker", "opt", "vision_eva", "bert", "aesthetic"):
        print(f"  {name:>11}: {models[name]}")
    tick("models", s)
    m = {k: str(v) for k, v in models.items()}
    common = [f"seed={seed}",
              f"capfilt.captioner={m['captioner']}", f"capfilt.ranker={m['ranker']}",
              "model.vision=eva_vit_g", f"model.vision_path={m['vision_eva']}",
              f"model.qformer_init={m['bert']}", f"model.llm_path={m['opt']}",
              f"curate.aesthetic.head={m['aesthetic']}",
              *extra]

    _banner("2/10 synthetic corpus, served on 127.0.0.1")
    s = time.time()
    items = make_corpus(corpus_dir, n=images, seed=seed, size=96)
    held = make_corpus(heldout_dir, n=heldout, seed=seed + 1000, size=96)
    server = serve_directory(corpus_dir)
    alt_texts = web_captions(items, seed)
    url_list = write_url_list(items, server.base_url, workdir / "urls.parquet", alt_texts)
    annotations = write_coco_annotations(held, heldout_dir / "annotations.json")
    print(f"  {images} training images + {heldout} held-out images; serving {server.base_url}")
    print(f"  URL list (LAION format, 2 broken URLs, {WRONG_WEB_CAPTIONS:.0%} of the captions wrong): {url_list}")
    tick("corpus", s)

    # One Ray session for every step: the commands find it initialised. Its workers' logs go to
    # Ray's session folder, not over the steps' output (a failure still raises here).
    ray = ensure_ray(cfg.ray)
    ray_logs = logs_dir()
    print(f"  Ray workers' logs: {ray_logs}")
    try:
        _banner("3/10 download (bounded Ray tasks, address guard allows only 127.0.0.1)")
        s = time.time()
        _blip2("download", "--config", "tiny", "--input", str(url_list), "--output", str(download_out),
               "--no-progress", *common)
        tick("download", s)
    finally:
        server.shutdown()
        server.server_close()

    _banner("4/10 CapFilt (captioner x 10 captions + the web caption, CLIP ranks all 11, keeps 2)")
    s = time.time()
    _blip2("capfilt", "--config", "tiny", "--input", str(download_out), "--output", str(capfilt_out), *common)
    truth = caption_truth(capfilt_out, items)
    print(f"  captions naming the image's colours and shapes: web {truth['web_right']}/{truth['rows']}, "
          f"CapFilt's best {truth['kept_right']}/{truth['rows']}")
    tick("capfilt", s)

    _banner("5/10 curate (CLIP score, sha256 + semantic dedup, aesthetic head) and search the result")
    s = time.time()
    curated = workdir / "curated"
    _blip2("curate", "--config", "tiny", "--input", str(capfilt_out), "--output", str(curated), *common)
    search_json, search_html = workdir / "search.json", workdir / "search.html"
    _blip2("shards", "search", str(curated), "--text", SEARCH_QUERY, "-k", "5", "--html", str(search_html),
           "--json", str(search_json), *common)
    curated_report = workdir / "curated_report.html"
    _blip2("shards", "inspect", str(curated), "--html", str(curated_report), "--thumbnails", "16")
    curation = ShardSet(str(curated)).read_manifest()["summary"]
    search = json.loads(search_json.read_text())
    tick("curate", s)

    _banner("6/10 stage 1: ITC + ITM + ITG against the frozen image encoder (Ray Train)")
    s = time.time()
    # The shapes' captions say "left of"/"right of" (a flip makes them false): train on CapFilt's
    # best caption, unflipped, at a tiny model's learning rate. The paper presets keep flip and
    # a random one of the two kept captions.
    train_common = [f"train.input={capfilt_out}", f"train.output={train_out}", f"train.num_workers={workers}",
                    "ingest.caption_pick=first", "ingest.hflip=false", "train.lr=2e-3", "train.min_lr=1e-3"]
    _blip2("train", "--stage", "1", "--config", "tiny", f"train.steps={stage1_steps}", *train_common, *common)
    stage1 = train_out / "stage1" / "final"
    tick("train1", s)

    _banner("7/10 stage 2: soft prompts into the frozen OPT (Ray Train)")
    s = time.time()
    _blip2("train", "--stage", "2", "--config", "tiny", f"train.steps={stage2_steps}",
           f"model.stage1_checkpoint={stage1}", *train_common, *common)
    stage2 = train_out / "stage2" / "final"
    tick("train2", s)

    _banner("8/10 retrieval on held-out images (ITC shortlist re-ranked by ITM)")
    s = time.time()
    results = workdir / "eval_retrieval.json"
    _blip2("eval", "--config", "tiny", "--task", "retrieval", "--model", str(stage1),
           "--annotations", str(annotations), "--images", str(heldout_dir), "--out", str(results), *common)
    metrics = json.loads(results.read_text())["metrics"]
    tick("eval", s)

    _banner("9/10 shard report")
    s = time.time()
    report = workdir / "capfilt_report.html"
    _blip2("shards", "inspect", str(capfilt_out), "--html", str(report))
    tick("report", s)

    _banner("10/10 export to transformers; caption held-out images with it")
    s = time.time()
    hf_dir = workdir / "stage2-hf"
    _blip2("export-hf", str(stage2), str(hf_dir))
    samples = [heldout_dir / it.file for it in held[:CAPTIONED]]
    plain = caption_with_transformers(hf_dir, samples, cfg.eval.caption_prompt, cfg.eval.max_new_tokens)
    print("  Blip2ForConditionalGeneration.from_pretrained + generate (greedy):")
    for f, text, it in zip(samples, plain, held):
        print(f"    {f.name}: {text!r}  (true: {it.caption!r})")
    from orchestration.api import caption

    _blip2("caption", "--config", "tiny", "--model", str(hf_dir), *map(str, samples))
    beam = [r["pred_caption"] for r in caption([str(heldout_dir / it.file) for it in held], model=str(hf_dir),
                                                 settings=cfg.eval)]
    named = sum(names_the_image(text, it) for text, it in zip(beam, held))
    tick("export", s)
    ray.shutdown()  # before the summary, so nothing of Ray's prints after it

    total = round(time.time() - t0, 1)
    return {"workdir": str(workdir), "metrics": metrics, "timings_s": timings, "total_s": total,
            "report": str(report), "curated_report": str(curated_report), "search_page": str(search_html),
            "capfilt": truth,
            "curation": {"set": curation["set"], "thresholds": curation["thresholds"]},
            "search": {"query": SEARCH_QUERY, "hits": search["hits"][:3], "vectors": search["index"]["rows"]},
            "stage1": str(stage1), "stage2": str(stage2), "hf_export": str(hf_dir),
            "loss_curves": [str(train_out / "stage1" / "loss_curve.png"), str(train_out / "stage2" / "loss_curve.png")],
            "captions": [{"image": str(f), "true": it.caption, "transformers": p, "blip2_caption": b}
                         for f, it, p, b in zip(samples, held, plain, beam)],
            "captions_named": {"right": named, "of": len(held)},
            "heldout": heldout, "ray_logs": ray_logs}


def _recall_line(name: str, key: str, m: dict, chance: dict, heldout: int) -> str:
    itc = m.get("itc", {})
    cells = "   ".join(f"R@{k} {m.get(f'{key}_r{k}', 0):5.1f} /{itc.get(f'{key}_r{k}', 0):5.1f}" for k in (1, 5, 10))
    return f"  {name} {cells}   (chance R@1 {chance.get(f'{key}_r1', 100 / heldout):.1f})"


def format_summary(r: dict) -> str:
    m = r["metrics"]
    c = r["curation"]["set"]
    chance = m.get("chance", {})
    lines = [
        "",
        "=" * 74,
        f"blip2 demo finished in {r['total_s']:.0f}s  ({', '.join(f'{k} {v:.0f}s' for k, v in r['timings_s'].items())})",
        "",
        f"held-out retrieval ({r['heldout']} images, stage 1), R@k in %, ITM re-ranked / ITC only:",
        *(_recall_line(name, key, m, chance, r["heldout"]) for name, key in (("image->text", "txt"),
                                                                           ("text->image", "img"))),
        f"curate: {c['rows_in']} rows in = {c['kept']} kept + {c['removed']} removed ("
        + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in c["by_reason"].items() if v) + ")",
        f"search {r['search']['query']!r} over {r['search']['vectors']} curated images, top 3:",
        *(f"  {h['score']:.4f}  {h['key']}  {h['caption'][:50]!r}" for h in r["search"]["hits"]),
        f"CapFilt: captions naming the image's colours and shapes: web {r['capfilt']['web_right']}/"
        f"{r['capfilt']['rows']}, best kept {r['capfilt']['kept_right']}/{r['capfilt']['rows']} "
        f"(median CLIP cosine {r['capfilt']['median_kept_cosine']})",
        f"stage-2 captions of held-out images (exported model, `blip2 caption`), "
        f"{r['captions_named']['right']}/{r['captions_named']['of']} name the image's colours and shapes:",
        *(f"  {Path(c['image']).name}: {c['blip2_caption'][:44]!r}  (true: {c['true']!r})" for c in r["captions"]),
        "",
        f"everything is under {r['workdir']}:",
        "  shards        download/ capfilt/ curated/ (each with _manifest.json; curated/_removed/: the removed rows)",
        f"  HTML report   {r['report']}",
        f"                {r['curated_report']}  (curated: removals per reason)",
        f"  search page   {r['search_page']}",
        f"  loss curves   {r['loss_curves'][0]}",
        f"                {r['loss_curves'][1]}",
        f"  models        {r['stage1']}  (stage 1)",
        f"                {r['stage2']}  (stage 2)",
        f"                {r['hf_export']}  (stage 2 for transformers' Blip2ForConditionalGeneration)",
        f"  Ray logs      {r['ray_logs']}",
        "=" * 74,
    ]
    return "\n".join(lines)
