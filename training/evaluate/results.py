"""Results files and the printed comparison with the published BLIP-2 numbers.

Reference numbers: the BLIP-2 model page (``../shared/seeds/001_…txt``): zero-shot COCO
captioning and VQAv2 with ``blip2-opt2.7b``, COCO image→text retrieval R@1 with the
retrieval-finetuned ``blip2`` (ViT-g).
"""
from __future__ import annotations

import json
import time

import fsspec

# task -> metric -> (published value, what it was measured with)
REFERENCE = {
    "retrieval": {"txt_r1": (85.4, "blip2 ViT-g, COCO-finetuned, 5k test")},
    "caption": {"bleu4": (32.9, "blip2-opt2.7b zero-shot, COCO Karpathy test"),
                "cider": (111.1, "blip2-opt2.7b zero-shot, COCO Karpathy test")},
    "vqa": {"accuracy": (53.5, "blip2-opt2.7b zero-shot, VQAv2 val")},
}
# metric -> label shown in the table (the metrics printed, in order)
LABELS = {
    "retrieval": {"txt_r1": "image→text R@1", "txt_r5": "image→text R@5", "txt_r10": "image→text R@10",
                  "img_r1": "text→image R@1", "img_r5": "text→image R@5", "img_r10": "text→image R@10",
                  "r_mean": "mean recall"},
    "caption": {"bleu4": "BLEU-4", "cider": "CIDEr", "meteor": "METEOR", "spice": "SPICE"},
    "vqa": {"accuracy": "VQA accuracy"},
}


def results_table(task: str, metrics: dict) -> str:
    """Our numbers next to the model page's, one metric a line; retrieval also shows ITC alone
    (before the ITM re-rank) and chance, so what the re-rank adds is read off each line."""
    extra = [n for n in ("itc", "chance") if task == "retrieval" and n in metrics]
    heads = {"itc": "ITC only", "chance": "chance"}
    first = "re-ranked" if extra else "this run"
    lines = [f"{'metric':<18}{first:>10}" + "".join(f"{heads[n]:>10}" for n in extra)
             + f"{'model page':>12}{'Δ':>9}"]
    for key, label in LABELS[task].items():
        if key not in metrics:
            continue
        ours = metrics[key]
        ref = REFERENCE[task].get(key)
        side = "".join(f"{metrics[n][key]:>10.2f}" if key in metrics[n] else f"{'':>10}" for n in extra)
        lines.append(f"{label:<18}{ours:>10.2f}{side}"
                     + (f"{ref[0]:>12.1f}{ours - ref[0]:>+9.1f}" if ref else f"{'':>12}{'':>9}"))
    if extra:
        lines.append(f"re-ranked: the ITC top {metrics.get('k_test', '?')} re-scored by ITM match logit + ITC similarity")
    refs = "; ".join(f"{LABELS[task][k]}: {v[1]}" for k, v in REFERENCE[task].items())
    lines.append(f"model page: {refs}")
    for name, why in (metrics.get("skipped") or {}).items():
        lines.append(f"{name.upper()} skipped: {why}")
    if metrics.get("tokenizer") == "simple":
        lines.append("tokenizer: simple fallback (no Java): BLEU/CIDEr may differ slightly from PTB-tokenised ones")
    return "\n".join(lines)


def write_results(uri: str, task: str, metrics: dict, meta: dict) -> dict:
    """Write ``{task, created_at, metrics, reference, ...meta}`` as JSON to a local path or s3://."""
    payload = {"task": task, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **meta,
               "metrics": metrics,
               "reference": {k: {"value": v[0], "source": v[1]} for k, v in REFERENCE[task].items()}}
    with fsspec.open(uri, "w") as f:
        json.dump(payload, f, indent=1, default=str)
    return payload
