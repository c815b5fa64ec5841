"""Tiny random models built from configs, saved in the ``save_pretrained`` layout.

No model hub here: the demo and the tests build every model the pipeline loads (BERT for
the Q-Former init, CLIP ViT and EVA-style vision towers, the BLIP captioner, the CLIP
ranker, OPT and T5) at toy sizes with tokenizers made locally from the synthetic corpus'
words, then load them through the same code path as real weights.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from pipelines.synthetic import COLORS, RELATIONS, SHAPES

WORDS = sorted(
    {"a", "an", "the", "of", "is", "in", "on", "and", "what", "which", "color", "colour", "shape",
     "picture", "photo", "question", "answer", "short", "left", "right", "above", "below", "there",
     "image", "this", "it", "yes", "no", "how", "many"}
    | set(COLORS) | set(SHAPES) | {w for r in RELATIONS for w in r.split()}
)
PUNCT = list(".,:;?!'\"-()")
CHARS = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)] + PUNCT

IMAGE_SIZE = 64
PATCH = 8
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


# -- tokenizers ---------------------------------------------------------------------------
def bert_tokenizer_of(words: list[str], dec_token: bool):
    """An uncased WordPiece tokenizer: BERT's five special tokens, then ``words``; ``[DEC]``
    appended last as BOS, like BLIP/LAVIS do."""
    from transformers import BertTokenizer

    vocab = list(dict.fromkeys(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(words)))
    tok = BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True)
    if dec_token:
        tok.add_special_tokens({"bos_token": "[DEC]"})
    return tok


def bert_tokenizer(dec_token: bool = True):
    """WordPiece over the corpus words (see :func:`bert_tokenizer_of`)."""
    return bert_tokenizer_of(WORDS + CHARS + [f"##{c}" for c in CHARS], dec_token)


def _bpe(pre_tokenizer, alphabet: list[str], suffix: str | None = None) -> tuple[dict, list[tuple[str, str]]]:
    """Train a small BPE on the corpus sentences: vocab + merges in the GPT-2/CLIP file layout."""
    from tokenizers import Tokenizer, models, trainers

    extra = {"end_of_word_suffix": suffix} if suffix else {}
    tok = Tokenizer(models.BPE(**extra))
    tok.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(vocab_size=600, initial_alphabet=alphabet, show_progress=False, **extra)
    sentences = [" ".join(WORDS)] + [f"a {c} {s} {r} a {c2} {s2}" for c in COLORS for s in SHAPES
                                     for r in RELATIONS for c2 in COLORS for s2 in SHAPES]
    tok.train_from_iterator(sentences, trainer)
    model = json.loads(tok.to_str())["model"]
    return model["vocab"], [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]


def gpt2_tokenizer():
    from tokenizers import pre_tokenizers
    from transformers import GPT2Tokenizer

    vocab, merges = _bpe(pre_tokenizers.ByteLevel(add_prefix_space=False), pre_tokenizers.ByteLevel.alphabet())
    for special in ("<|endoftext|>", "<pad>"):
        vocab.setdefault(special, len(vocab))
    return GPT2Tokenizer(vocab=vocab, merges=merges, pad_token="<pad>")


def clip_tokenizer():
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab, merges = _bpe(pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                  pre_tokenizers.ByteLevel(add_prefix_space=False)]),
                         alphabet, suffix="</w>")
    for c in alphabet:  # CLIP's vocab holds every byte symbol with and without the word-end suffix
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges)


def t5_tokenizer():
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    chars = CHARS + [c.upper() for c in CHARS if c.isalpha()]
    pieces += [(f"▁{w}", -1.0) for w in WORDS] + [(c, -5.0) for c in chars] + [(f"▁{c}", -6.0) for c in chars]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


# -- models -------------------------------------------------------------------------------
def _qformer_width() -> dict:
    return dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128)


def build_bert(out: Path) -> Path:
    """A BERT in the ``bert-base-uncased`` layout (BertForMaskedLM), the Q-Former's init."""
    from transformers import BertConfig, BertForMaskedLM

    tok = bert_tokenizer(dec_token=False)
    # BERT's 0.02 at width 64 leaves every attention uniform (queries read the mean image, ITM sees
    # no pair-specific signal); a pretrained BERT's attention is not uniform. The Q-Former's fresh
    # cross-attention and queries take this range too (qformer_config copies it).
    cfg = BertConfig(vocab_size=len(tok), max_position_embeddings=64, initializer_range=0.1, **_qformer_width())
    BertForMaskedLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def build_clip_vision(out: Path) -> Path:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                           image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=32)
    CLIPVisionModel(cfg).save_pretrained(out)
    _clip_image_processor().save_pretrained(out)
    return out


def build_eva_vision(out: Path) -> Path:
    from transformers import Blip2VisionConfig, Blip2VisionModel

    cfg = Blip2VisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                            image_size=IMAGE_SIZE, patch_size=PATCH, qkv_bias=True,
                            initializer_range=0.02)  # HF default 1e-10 would pass no image signal
    model = Blip2VisionModel(cfg)
    # A trained tower's q/v biases and final LayerNorm (LAVIS' ln_vision) are not HF's zeros and
    # ones; random values here let a wrong mapping of them show in every comparison.
    with torch.no_grad():
        h = cfg.hidden_size
        for layer in model.encoder.layers:  # EVA has q and v biases only: the k third stays 0
            layer.self_attn.qkv.bias[:h].normal_(0.0, 0.02)
            layer.self_attn.qkv.bias[2 * h:].normal_(0.0, 0.02)
        model.post_layernorm.weight.uniform_(0.5, 1.5)
        model.post_layernorm.bias.normal_(0.0, 0.1)
    model.save_pretrained(out)
    _clip_image_processor().save_pretrained(out)
    return out


def _clip_image_processor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                              image_mean=CLIP_MEAN, image_std=CLIP_STD)


def build_captioner(out: Path) -> Path:
    """BLIP captioner (BlipForConditionalGeneration) + BlipProcessor, like BLIP-large's layout."""
    from transformers import (BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                              BlipProcessor)

    tok = bert_tokenizer(dec_token=True)
    text = dict(vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=64, bos_token_id=tok.bos_token_id,
                pad_token_id=tok.pad_token_id, sep_token_id=tok.sep_token_id, eos_token_id=tok.sep_token_id,
                encoder_hidden_size=48)
    vision = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  image_size=IMAGE_SIZE, patch_size=PATCH)
    cfg = BlipConfig(text_config=text, vision_config=vision)
    BlipForConditionalGeneration(cfg).save_pretrained(out)
    proc = BlipProcessor(BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                            image_mean=CLIP_MEAN, image_std=CLIP_STD), tok)
    proc.save_pretrained(out)
    return out


def build_ranker(out: Path) -> Path:
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor

    tok = clip_tokenizer()
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=32,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=IMAGE_SIZE, patch_size=PATCH)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)).save_pretrained(out)
    CLIPProcessor(_clip_image_processor(), tok).save_pretrained(out)
    return out


def build_opt(out: Path) -> Path:
    from transformers import OPTConfig, OPTForCausalLM

    tok = gpt2_tokenizer()
    cfg = OPTConfig(vocab_size=len(tok), hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=128, word_embed_proj_dim=64, pad_token_id=tok.pad_token_id,
                    bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    OPTForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def build_t5(out: Path) -> Path:
    from transformers import T5Config, T5ForConditionalGeneration

    tok = t5_tokenizer()
    cfg = T5Config(vocab_size=len(tok), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
                   num_heads=4, feed_forward_proj="gated-gelu", pad_token_id=tok.pad_token_id,
                   eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id,
                   tie_word_embeddings=False)
    T5ForConditionalGeneration(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def build_aesthetic_head(out: Path) -> Path:
    """LAION's aesthetic MLP over the tiny ranker's 32-d image embedding (random weights)."""
    from capfilt.heads import build_head, save_head

    save_head(build_head("aesthetic_mlp", 32), "aesthetic_mlp", out)
    return out


BUILDERS = {
    "bert": build_bert,
    "vision": build_clip_vision,
    "vision_eva": build_eva_vision,
    "captioner": build_captioner,
    "ranker": build_ranker,
    "opt": build_opt,
    "t5": build_t5,
    "aesthetic": build_aesthetic_head,
}


def build_tiny_models(out_dir: str | Path, seed: int = 0, only: list[str] | None = None) -> dict[str, Path]:
    """Build (or reuse, if already complete) every tiny model under ``out_dir/<name>``."""
    out_dir = Path(out_dir)
    paths = {}
    for name, builder in BUILDERS.items():
        if only and name not in only:
            continue
        path = out_dir / name
        done = path / ".complete"
        if not done.exists():
            torch.manual_seed(seed)
            path.mkdir(parents=True, exist_ok=True)
            builder(path)
            done.write_text(json.dumps({"seed": seed}))
        paths[name] = path
    return paths
