"""Teach the demo's tiny models the shapes world, so every step of the demo means something.

BLIP-large, CLIP ViT-L/14 and OPT arrive pre-trained; the tiny stand-ins built by
``tiny_models`` are random. Each teacher below loads one of them from its ``save_pretrained``
folder, trains it briefly on a shapes corpus of its own (never the demo's training or held-out
images) and saves it in the same layout, from where the demo loads it exactly as real weights:

* the captioner learns to caption (BLIP's LM loss after the ``capfilt.prompt``, prompt masked);
* the ranker learns CLIP's contrastive loss, so its image-caption cosines rank captions;
* the LLM learns to *read*: to write a caption after seeing that caption's words in its
  context, the in-context copying a pre-trained LLM brings. Stage 2 can then steer it with soft
  prompts; a random tiny OPT cannot be steered (std-0.02 embeddings bound its logits to about ±1).

The image towers of stage 1 and 2 stay random: BLIP-2 freezes them, and the Q-Former learns to read
them.
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from pipelines.synthetic import COLORS, RELATIONS, SHAPES, Item, make_corpus
from training.stage2 import IGNORE, causal_lm_batch

TAUGHT = ("captioner", "ranker", "opt")


@dataclass(frozen=True)
class Lesson:
    images: list[Image.Image]
    captions: list[str]
    items: list[Item]


def shapes_lesson(folder: Path, n: int, seed: int, size: int) -> Lesson:
    items = make_corpus(folder, n=n, seed=seed, size=size)
    images = [Image.open(folder / it.file).convert("RGB") for it in items]
    return Lesson(images, [it.caption for it in items], items)


def _batches(n: int, batch_size: int, steps: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield torch.randint(0, n, (batch_size,), generator=g)


def _fit(model, loss_of, n: int, steps: int, seed: int, lr: float, batch_size: int = 32) -> dict:
    """AdamW on random batches of the lesson; the first and the last batch's loss."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for idx in _batches(n, batch_size, steps, seed):
        loss = loss_of(idx)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return {"first_loss": round(losses[0], 3), "final_loss": round(losses[-1], 3)} if losses else {}


def teach_captioner(src: Path, out: Path, lesson: Lesson, prompt: str, steps: int, seed: int) -> dict:
    from transformers import BlipForConditionalGeneration, BlipProcessor

    processor = BlipProcessor.from_pretrained(src, trust_remote_code=False)
    model = BlipForConditionalGeneration.from_pretrained(src, trust_remote_code=False)
    pixels = processor.image_processor(lesson.images, return_tensors="pt").pixel_values
    text = processor.tokenizer([prompt + c for c in lesson.captions], padding="longest", return_tensors="pt")
    ids = text.input_ids.clone()
    ids[:, 0] = model.config.text_config.bos_token_id  # BLIP decodes from [DEC], not [CLS]
    prompt_len = len(processor.tokenizer(prompt).input_ids) - 1  # [CLS]/[DEC] + prompt words, no [SEP]
    labels = ids.masked_fill(text.attention_mask == 0, IGNORE)
    labels[:, :prompt_len] = IGNORE  # BLIP/LAVIS: the prompt is given, not learnt

    def loss_of(idx):
        return model(pixel_values=pixels[idx], input_ids=ids[idx], attention_mask=text.attention_mask[idx],
                     labels=labels[idx]).loss

    info = _fit(model, loss_of, len(ids), steps, seed, lr=2e-3)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return info


def near_miss(caption: str, rng: random.Random) -> str:
    """The caption with one colour, shape or relation changed: the wrong captions CapFilt's
    ranker must score below the right one (a random batch seldom holds one)."""
    relation = next((r for r in RELATIONS if f" {r} " in caption), None)
    words = caption.split()
    slots = [i for i, w in enumerate(words) if w in COLORS or w in SHAPES] + ([-1] if relation else [])
    i = rng.choice(slots)
    if i == -1:
        return caption.replace(f" {relation} ", f" {rng.choice([r for r in RELATIONS if r != relation])} ")
    pool = list(COLORS) if words[i] in COLORS else list(SHAPES)
    words[i] = rng.choice([w for w in pool if w != words[i]])
    return " ".join(words)


def teach_ranker(src: Path, out: Path, lesson: Lesson, steps: int, seed: int) -> dict:
    """CLIP's contrastive loss, each image's near-miss caption added to the texts it must rank."""
    import torch.nn.functional as F
    from transformers import CLIPModel, CLIPProcessor

    processor = CLIPProcessor.from_pretrained(src, trust_remote_code=False)
    model = CLIPModel.from_pretrained(src, trust_remote_code=False)
    pixels = processor.image_processor(lesson.images, return_tensors="pt").pixel_values
    rng = random.Random(seed)
    texts = lesson.captions + [near_miss(c, rng) for c in lesson.captions]
    text = processor.tokenizer(texts, padding="longest", return_tensors="pt")
    n = len(lesson.captions)

    def loss_of(idx):
        rows = torch.cat([idx, idx + n])  # the batch's captions, then their near misses
        out = model(input_ids=text.input_ids[rows], attention_mask=text.attention_mask[rows], pixel_values=pixels[idx])
        target = torch.arange(len(idx))
        return (F.cross_entropy(out.logits_per_image, target) + F.cross_entropy(out.logits_per_text[:len(idx)], target)) / 2

    info = _fit(model, loss_of, n, steps, seed, lr=1e-3, batch_size=64)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return info


def teach_reading_llm(src: Path, out: Path, lesson: Lesson, steps: int, seed: int) -> dict:
    """Continue ``[caption words] [BOS]`` with ``caption`` + EOS (text only, all weights)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm = AutoModelForCausalLM.from_pretrained(src, trust_remote_code=False)
    tok = AutoTokenizer.from_pretrained(src, trust_remote_code=False)
    captions = lesson.captions

    def loss_of(idx):
        batch = causal_lm_batch(tok, [captions[i] for i in idx], 32)
        context, context_mask = batch["input_ids"][:, 1:], batch["attention_mask"][:, 1:]
        return lm(input_ids=torch.cat([context, batch["input_ids"]], 1),
                  attention_mask=torch.cat([context_mask, batch["attention_mask"]], 1),
                  labels=torch.cat([torch.full_like(context, IGNORE), batch["labels"]], 1)).loss

    info = _fit(lm, loss_of, len(captions), steps, seed, lr=3e-3)
    lm.save_pretrained(out)
    tok.save_pretrained(out)
    return info


def names_the_image(caption: str, item: Item) -> bool:
    """The caption's colour and shape words are the image's (order and relation not checked)."""
    words = caption.lower().replace(".", " ").split()
    return ({w for w in words if w in COLORS} == set(item.colors)
            and {w for w in words if w in SHAPES} == set(item.shapes))


def teach_tiny_models(models: dict[str, Path], out_dir: Path, *, prompt: str, seed: int = 0,
                      steps: dict[str, int] | None = None, images: int = 2048, size: int = 64) -> dict[str, Path]:
    """Taught copies of the captioner, ranker and OPT under ``out_dir/<name>`` (each reused once
    complete, so a second demo run skips it); the other models are passed through unchanged.
    The lessons are as long as CapFilt's kept captions need to beat the demo's noisy web captions
    clearly (shorter ones made them worse than the web's; README, "What the demo does")."""
    steps = {"captioner": 1200, "ranker": 2000, "opt": 200, **(steps or {})}
    out_dir = Path(out_dir)
    todo = [n for n in TAUGHT if not (out_dir / n / ".complete").exists()]
    lesson = shapes_lesson(out_dir / "corpus", n=images, seed=seed + 7919, size=size) if todo else None
    taught = dict(models)
    for name in TAUGHT:
        path = out_dir / name
        taught[name] = path
        if name not in todo:
            continue
        start = time.time()
        torch.manual_seed(seed)
        if name == "captioner":
            info = teach_captioner(models[name], path, lesson, prompt, steps[name], seed)
        elif name == "ranker":
            info = teach_ranker(models[name], path, lesson, steps[name], seed)
        else:
            info = teach_reading_llm(models[name], path, lesson, steps[name], seed)
        info.update(steps=steps[name], images=images, seconds=round(time.time() - start, 1), seed=seed)
        (path / ".complete").write_text(json.dumps(info))
    return taught
