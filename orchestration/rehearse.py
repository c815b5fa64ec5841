"""`blip2 rehearse`: a preset's models at their real architecture, a few steps of its job, and
what the whole run will need — before anyone pays for the cluster.

Models come from the preset's paths when they are staged there (or in the HF cache), else they
are random stand-ins built from :mod:`orchestration.model_sizes` into the work folder. The steps
run the job's own code: ``model_class(stage).from_config`` (what every Ray Train worker builds),
``build_optimizer``, ``grad_scaler`` and ``autocast`` as in ``train_loop_per_worker``; CapFilt's
``Captioner`` and ``Ranker``. On the ``meta`` device the models are built without weights:
parameters, weight/optimizer memory and FLOPs are counted, nothing runs.

What is measured and what is computed is labelled in the report: FLOPs per sample are counted by
``torch.utils.flop_counter`` over a real step; peak memory per device is measured on a GPU and
computed elsewhere (weights + fp32 master/grad/AdamW state + the step's saved activations per
sample, measured, times the preset's micro-batch); the projected wall time is measured throughput
× the cluster on a GPU, and on a CPU FLOPs / (GPUs × datasheet peak × an assumed MFU).
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

import torch

from orchestration.staging import BY_NAME

DENSE_BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # vendor datasheets, dense (no sparsity)
PAPER = "paper (§3.4): ViT-g + FlanT5-XXL < 6 days stage 1, < 3 days stage 2 on 16 × A100 40 GB"
VISION_REPO = {"eva_vit_g": "Salesforce/blip2-opt-2.7b", "clip_vit_l": "openai/clip-vit-large-patch14"}
DEFAULT_LLM = {"opt": "facebook/opt-2.7b", "t5": "google/flan-t5-xl"}
CAPFILT_IMAGES = 129_000_000   # the paper's corpus (web images: CapFilt runs on nearly all of them)
CAPFILT_GPUS = 16             # CapFilt's projection: the paper's 16 GPUs
CAPTION_WORDS = 40             # random captions longer than max_text_len: every step at the longest text


def repo_for(path: str, default: str) -> str:
    """The Hub repo a preset path stands for: a models-root folder name, a Hub id, else ``default``."""
    name = path.rstrip("/").rsplit("/", 1)[-1]
    if name in BY_NAME:
        return BY_NAME[name].repo_id
    return path if path.count("/") == 1 and "://" not in path else default


def is_available(path: str) -> bool:
    """A model folder with a config.json at ``path`` (local, s3://) or in the HF cache (a Hub id)."""
    if not path:
        return False
    from pipelines.storage import is_hub_id

    try:
        if is_hub_id(path):
            from huggingface_hub import try_to_load_from_cache

            return isinstance(try_to_load_from_cache(path, "config.json"), str)
        import fsspec

        fs, root = fsspec.core.url_to_fs(path)
        return fs.exists(f"{root.rstrip('/')}/config.json")
    except Exception:  # no credentials, no bucket: not staged here
        return False


def resolve_models(paths: dict[str, tuple[str, str]], work: Path, device: str, log) -> dict[str, str]:
    """key -> path to load: the preset's when available, else a random stand-in built once in ``work``."""
    from orchestration.model_sizes import build_random

    out = {}
    for key, (path, repo) in paths.items():
        if is_available(path):
            log(f"{key}: {path} (its weights)")
            out[key] = path
            continue
        folder = work / repo.replace("/", "--")
        if not (folder / ".complete").exists():
            t = time.perf_counter()
            build_random(repo, folder, torch.float16, device)  # stored as the frozen models are run (half)
            (folder / ".complete").write_text(repo)
            log(f"{key}: random {repo} at its real size in {folder} ({time.perf_counter() - t:.0f} s)")
        else:
            log(f"{key}: random {repo} at its real size in {folder} (built before)")
        out[key] = str(folder)
    return out


def job_of(cfg, job: str | None) -> str:
    return job or ("capfilt" if not cfg.model.vision_path else f"stage{cfg.train.stage}")


def model_paths(cfg, job: str) -> dict[str, tuple[str, str]]:
    m = cfg.model
    if job == "capfilt":
        return {"capfilt.captioner": (cfg.capfilt.captioner, repo_for(cfg.capfilt.captioner,
                                                                      "Salesforce/blip-image-captioning-large")),
                "capfilt.ranker": (cfg.capfilt.ranker, repo_for(cfg.capfilt.ranker, "openai/clip-vit-large-patch14"))}
    paths = {"model.vision_path": (m.vision_path, repo_for(m.vision_path, VISION_REPO[m.vision])),
             "model.qformer_init": (m.qformer_init, repo_for(m.qformer_init, "bert-base-uncased"))}
    if job == "stage2":
        paths["model.llm_path"] = (m.llm_path, repo_for(m.llm_path, DEFAULT_LLM[m.llm_family]))
    return paths


def cpu_dtypes(cfg) -> list[str]:
    """CPUs have no fast fp16 matmul (bf16 has the same bytes): fp16 parts run in bf16 there."""
    changed = []
    for obj, key in ((cfg.model, "frozen_dtype"), (cfg.model, "llm_dtype")):
        if getattr(obj, key) == "float16":
            setattr(obj, key, "bfloat16")
            changed.append(f"model.{key}=bfloat16")
    if cfg.train.precision == "fp16":
        cfg.train.precision = "bf16"
        changed.append("train.precision=bf16")
    return changed


# -- counting -----------------------------------------------------------------------------------
def param_counts(model: torch.nn.Module) -> dict:
    trainable = {id(p): p for p in model.parameters() if p.requires_grad}
    frozen = {id(p): p for p in model.parameters() if not p.requires_grad}
    return {"trainable_params": sum(p.numel() for p in trainable.values()),
            "frozen_params": sum(p.numel() for p in frozen.values()),
            "weight_bytes": sum(p.numel() * p.element_size() for p in {**trainable, **frozen}.values()),
            "trainable_state_bytes": sum(p.numel() for p in trainable.values()) * (4 + 4 + 8)}  # grad, AdamW m, v


class SavedActivations:
    """Bytes of the tensors autograd saves for the backward (each storage once), the model's own
    parameters left out (they are counted as weights): the activation memory of a step, measured
    on any device."""

    def __init__(self, model: torch.nn.Module):
        self.bytes = 0
        self._seen = {(p.untyped_storage().data_ptr(), p.device) for p in model.parameters()}

    def _pack(self, t: torch.Tensor):
        if t.device.type != "meta":
            key = (t.untyped_storage().data_ptr(), t.device)
            if key not in self._seen:
                self._seen.add(key)
                self.bytes += t.untyped_storage().nbytes()
        return t

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


# -- training stages --------------------------------------------------------------------------
def rehearse_training(cfg, stage: int, batch: int, steps: int, device: torch.device, log) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from training.loop import model_class
    from training.optim import autocast, build_optimizer, grad_scaler, optimizer_step

    torch.manual_seed(0)
    t = time.perf_counter()
    model = model_class(stage).from_config(cfg.model).to(device)   # what every Ray Train worker builds
    log(f"built {type(model).__name__} in {time.perf_counter() - t:.0f} s")
    optimizer, scheduler = build_optimizer(model, cfg.train)
    scaler = grad_scaler(cfg.train.precision, device)
    size = cfg.model.image_size
    words = sorted(w for w in model.tokenizer.get_vocab() if w.isalnum())  # plain words of its own vocabulary

    def inputs(seed: int, n: int = batch):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, len(words), (n, CAPTION_WORDS), generator=g).tolist()
        return (torch.randn(n, 3, size, size, generator=g).to(device), [" ".join(words[i] for i in r) for r in ids])

    def step(pixels, texts, activations=None):   # train_loop_per_worker's step, one micro-batch
        with autocast(cfg.train.precision, device):
            if activations is None:
                loss = model(pixels, texts)["loss"]
            else:
                with activations:
                    loss = model(pixels, texts)["loss"]
        scaler.scale(loss.float()).backward()
        optimizer_step(optimizer, scheduler, scaler)
        return float(loss.detach())

    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    activations = SavedActivations(model)
    with FlopCounterMode(display=False) as counter:
        loss = step(*inputs(0), activations=activations)   # warm-up, counted
    # saved bytes again at twice the batch (a forward only, its graph dropped): what does not grow with
    # the batch (autocast's weight copies, weights saved for their grads) is told apart from what does.
    # Not batch 1: with no other row there are no ITM negatives.
    double = SavedActivations(model)
    with autocast(cfg.train.precision, device), double:
        model(*inputs(10_000, 2 * batch))["loss"]
    per_sample = (double.bytes - activations.bytes) / batch
    fixed = max(activations.bytes - per_sample * batch, 0.0)
    times = []
    for i in range(steps):
        px, tx = inputs(i + 1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        loss = step(px, tx)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        log(f"step {i + 1}/{steps}: loss {loss:.3f}, {times[-1]:.1f} s")
    out = {**param_counts(model), "batch": batch, "loss": loss, "finite": loss == loss,
           "flops_per_sample": counter.get_total_flops() / batch,
           "activation_bytes_per_sample": per_sample, "activation_bytes_fixed": fixed,
           "s_per_step": sorted(times)[len(times) // 2] if times else float("nan")}
    out["samples_per_s"] = batch / out["s_per_step"]
    if device.type == "cuda":
        out["peak_mem_bytes_measured"] = torch.cuda.max_memory_allocated(device)
    return out


# -- CapFilt ------------------------------------------------------------------------------------
def rehearse_capfilt(cfg, paths: dict[str, str], batch: int, log) -> dict:
    """One CapFilt batch (the models pick their device as the CapFilt actors do: capfilt.dtype)."""
    from torch.utils.flop_counter import FlopCounterMode

    from capfilt.captioner import Captioner
    from capfilt.ranker import Ranker
    from pipelines.storage import local_dir

    c = cfg.capfilt
    captioner = Captioner(local_dir(paths["capfilt.captioner"]), prompt=c.prompt, num_captions=c.num_captions,
                          top_p=c.top_p, top_k=c.top_k, repetition_penalty=c.repetition_penalty,
                          min_length=c.max_length, max_length=c.max_length, seed=0, dtype=c.dtype)  # longest captions
    ranker = Ranker(local_dir(paths["capfilt.ranker"]), dtype=c.dtype)
    cap_px = captioner.processor.image_processor.size["height"]
    rank_px = ranker.model.config.vision_config.image_size
    keys = [f"rehearse/{i}" for i in range(batch)]
    times = {}
    with FlopCounterMode(display=False) as counter:
        t = time.perf_counter()
        captions = captioner(torch.randn(batch, 3, cap_px, cap_px), keys)
        times["caption_s"] = time.perf_counter() - t
        t = time.perf_counter()
        scores, _, _ = ranker.score(torch.randn(batch, 3, rank_px, rank_px),
                                    [["an original web caption", *caps] for caps in captions])
        times["rank_s"] = time.perf_counter() - t
    assert scores.shape == (batch, c.num_captions + 1)
    params = sum(p.numel() for p in captioner.model.parameters()) + sum(p.numel() for p in ranker.model.parameters())
    weights = sum(p.numel() * p.element_size() for m in (captioner.model, ranker.model) for p in m.parameters())
    seconds = times["caption_s"] + times["rank_s"]
    return {"trainable_params": 0, "frozen_params": params, "weight_bytes": weights, "trainable_state_bytes": 0,
            "batch": batch, "flops_per_sample": counter.get_total_flops() / batch, "samples_per_s": batch / seconds,
            "caption_tokens": c.max_length, "num_captions": c.num_captions, "image_px": (cap_px, rank_px), **times}


# -- the meta device: sizes without weights ------------------------------------------------------
def meta_model(cfg, job: str) -> dict:
    """Parameters and weight/optimizer bytes of the preset's models built on the meta device."""
    from transformers import (BertConfig, Blip2QFormerModel, Blip2VisionModel, CLIPVisionModel, OPTForCausalLM,
                              T5ForConditionalGeneration)

    from orchestration import model_sizes as ms
    from training.encoders import DTYPES, FrozenImageEncoder, cast_tower
    from training.qformer import qformer_config
    from training.stage1 import Blip2Stage1

    m = cfg.model
    with torch.device("meta"):
        if m.vision == "eva_vit_g":
            tower = Blip2VisionModel(ms.eva_vit_g_config())
        else:
            vc = ms.clip_vit_l14_config().vision_config
            vc.num_hidden_layers -= 1        # the second-to-last layer's features (encoders.py)
            tower = CLIPVisionModel(vc)
        vision = FrozenImageEncoder(m.vision, cast_tower(tower, DTYPES[m.frozen_dtype], m.frozen_weights), None)
        bert = BertConfig(vocab_size=ms.BERT_VOCAB)
        qcfg = qformer_config(bert, ms.BERT_VOCAB + 1, vision.width, m.cross_attention_frequency)
        if job == "stage1":
            model = Blip2Stage1(dataclasses.replace(m, ln_vision_init="fresh"), vision, None, qcfg)
        else:
            qcfg.use_qformer_text_input = False
            repo = repo_for(m.llm_path, DEFAULT_LLM[m.llm_family])
            llm = OPTForCausalLM(ms.opt_config(repo)) if m.llm_family == "opt" else \
                T5ForConditionalGeneration(ms.t5_config(repo))
            llm.to(DTYPES[m.llm_dtype] if m.llm_dtype != "auto" else torch.float16).requires_grad_(False)
            model = torch.nn.ModuleDict({"vision": vision, "ln_vision": torch.nn.LayerNorm(vision.width),
                                         "qformer": Blip2QFormerModel(qcfg),
                                         "language_projection": torch.nn.Linear(qcfg.hidden_size, llm.config.hidden_size
                                                                                if m.llm_family == "opt"
                                                                                else llm.config.d_model),
                                         "language_model": llm})
            query = m.num_query_tokens * qcfg.hidden_size
    counts = param_counts(model)
    if job == "stage2":
        counts["trainable_params"] += query
        counts["trainable_state_bytes"] += query * 16
    return counts


# -- report -------------------------------------------------------------------------------------
def gpu_kind(preset: str, gpu: str | None) -> str:
    return gpu or ("H100" if preset.endswith("_h100") else "A100")


def project(cfg, job: str, row: dict, device: torch.device, gpu: str, mfu: float) -> dict:
    """Peak memory per device and the whole run's wall time on the preset's cluster."""
    t = cfg.train
    micro = cfg.capfilt.batch_size if job == "capfilt" else t.batch_size
    workers = CAPFILT_GPUS if job == "capfilt" else t.worker_range()[1]
    act = row.get("activation_bytes_per_sample")
    out = {"micro_batch": micro, "workers": workers, "gpu": gpu, "assumed_mfu": mfu}
    if act is not None:
        out["peak_mem_bytes_computed"] = (row["weight_bytes"] + row["trainable_state_bytes"]
                                          + row.get("activation_bytes_fixed", 0) + act * micro)
    samples = CAPFILT_IMAGES if job == "capfilt" else t.steps * t.resolved_global_batch()
    out["samples"] = samples
    if device.type == "cuda":
        out["projected_s"] = samples / (row["samples_per_s"] / row["batch"] * micro * workers)
        out["projected_from"] = "measured samples/s on this GPU at the rehearsal batch, scaled to the micro-batch"
    elif row.get("flops_per_sample") and job != "capfilt":  # generation is launch-bound: no FLOP-rate guess
        out["projected_s"] = samples * row["flops_per_sample"] / (workers * DENSE_BF16_PEAK[gpu] * mfu)
        out["projected_from"] = (f"counted FLOPs / ({workers} × {gpu} {DENSE_BF16_PEAK[gpu] / 1e12:.0f} TFLOP/s "
                                 f"datasheet × assumed MFU {mfu:.0%}) — an assumption, not a measurement")
    return out


def _millions(n: float) -> str:
    return f"{n / 1e6:,.1f} M" if n >= 1e6 else f"{n / 1e6:.4g} M"


def cfg_captions(row: dict) -> str:
    return f"{row['num_captions']} captions each, {row['caption_tokens']} decoder ids incl. the prompt"


def format_report(preset: str, job: str, device: str, row: dict, proj: dict, notes: list[str]) -> str:
    gb = 1e9
    lines = [f"blip2 rehearse --config {preset}: {job} on {device}"]
    lines += [f"  note: {n}" for n in notes]
    lines.append(f"  parameters       trainable {_millions(row['trainable_params'])}, frozen "
                 f"{_millions(row['frozen_params'])}; weights {row['weight_bytes'] / gb:.3g} GB, fp32 grads + AdamW "
                 f"state {row['trainable_state_bytes'] / gb:.3g} GB")
    if "flops_per_sample" in row:
        lines.append(f"  model FLOPs      {row['flops_per_sample'] / 1e9:,.4g} GFLOP per sample (counted, "
                     f"torch.utils.flop_counter, batch {row['batch']}{', forward + backward + step' if job != 'capfilt' else ''})")
    if "samples_per_s" in row:
        lines.append(f"  measured         {row['samples_per_s']:.3f} samples/s at batch {row['batch']} on {device}"
                     + (f", loss {row['loss']:.3f}" if "loss" in row else ""))
    if "caption_s" in row:
        lines.append(f"  CapFilt batch    {row['batch']} images at {row['image_px'][0]} / {row['image_px'][1]} px: "
                     f"{row['caption_s']:.1f} s captioning ({cfg_captions(row)}), {row['rank_s']:.1f} s ranking")
    if "activation_bytes_per_sample" in row:
        lines.append(f"  activations      {row['activation_bytes_per_sample'] / 1e6:,.1f} MB per sample + "
                     f"{row['activation_bytes_fixed'] / 1e6:,.0f} MB fixed, saved for the backward (measured: "
                     f"batch {row['batch']} vs {2 * row['batch']})")
    if "peak_mem_bytes_measured" in row:
        lines.append(f"  peak memory      {row['peak_mem_bytes_measured'] / gb:.1f} GB at batch {row['batch']} (measured)")
    if device == "meta":
        lines.append(f"  memory           ≥ {(row['weight_bytes'] + row['trainable_state_bytes']) / gb:.3g} GB per device "
                     "(weights + state, computed; activations come on top and are not counted on meta)")
    if "peak_mem_bytes_computed" in proj:
        lines.append(f"  peak memory      {proj['peak_mem_bytes_computed'] / gb:.3g} GB per device at the preset's "
                     f"micro-batch {proj['micro_batch']} (computed: weights + state + fixed + activations × micro-batch)")
    if "projected_s" in proj:
        s = proj["projected_s"]
        lines.append(f"  projected        {s / 3600:,.3g} h = {s / 86400:.3g} days for {proj['samples']:,} samples on "
                     f"{proj['workers']} × {proj['gpu']} ({proj['projected_from']})")
    lines.append(f"  {PAPER}")
    return "\n".join(lines)


def run_rehearsal(cfg, preset: str, *, job: str | None = None, device: str = "auto", batch: int = 0, steps: int = 2,
                  work: str = "runs/rehearse", gpu: str | None = None, mfu: float = 0.33,
                  log: Callable[[str], None] = print) -> dict:
    job = job_of(cfg, job)
    if job not in ("capfilt", "stage1", "stage2"):
        raise ValueError(f"job must be capfilt, stage1 or stage2, got {job!r}")
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    notes, gpu = [], gpu_kind(preset, gpu)
    if dev.type == "meta":
        if job == "capfilt":
            raise ValueError("the meta device counts training presets; rehearse CapFilt on a CPU or GPU")
        row = meta_model(cfg, job)
        notes.append("meta device: parameters and weight/optimizer bytes counted, nothing ran (no FLOPs, "
                     "activations or throughput)")
        return {"preset": preset, "job": job, "device": "meta", "row": row, "projection": {}, "notes": notes,
                "report": format_report(preset, job, "meta", row, {}, notes)}
    if dev.type == "cpu" and job != "capfilt":  # CapFilt's capfilt.dtype=auto is fp32 on a CPU already
        notes += [f"CPU: {c} (fp16 has no fast CPU matmul; same bytes)" for c in cpu_dtypes(cfg)]
    if job == "stage2" and cfg.model.stage1_checkpoint and not is_available_checkpoint(cfg.model.stage1_checkpoint):
        notes.append(f"no stage-1 run at {cfg.model.stage1_checkpoint}: the Q-Former starts from model.qformer_init")
        cfg.model.stage1_checkpoint = ""
    paths = resolve_models(model_paths(cfg, job), Path(work) / "models", "cpu", log)
    for key, path in paths.items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, path)
    if job == "capfilt":
        row = rehearse_capfilt(cfg, paths, batch or 2, log)
    else:
        row = rehearse_training(cfg, int(job[-1]), batch or 2, steps, dev, log)
    proj = project(cfg, job, row, dev, gpu, mfu)
    return {"preset": preset, "job": job, "device": str(dev), "row": row, "projection": proj, "notes": notes,
            "report": format_report(preset, job, str(dev), row, proj, notes)}


def is_available_checkpoint(path: str) -> bool:
    try:
        import fsspec

        fs, root = fsspec.core.url_to_fs(path)
        return fs.exists(f"{root.rstrip('/')}/blip2_config.json")
    except Exception:
        return False
