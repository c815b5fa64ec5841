"""The paper's models at their real architecture: configs written out (no hub here), and random
stand-ins built from them in the ``save_pretrained`` layout with tokenizers of the real vocabulary
sizes, so ``blip2 rehearse`` and the GPU benchmarks load them through the jobs' own code.

Values are those of each model's ``config.json`` on the Hub (repo ids as in
:data:`orchestration.staging.PAPER_MODELS`); the BLIP-2 EVA tower is ``Blip2VisionConfig``'s
default (width 1408, 39 layers) and BERT-base is ``BertConfig``'s.
"""
from __future__ import annotations

from pathlib import Path

import torch

# (vision, text) of the two CapFilt models
BLIP_LARGE_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                         image_size=384, patch_size=16)
BERT_BASE = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
CLIP_L14_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       image_size=224, patch_size=14)
CLIP_L14_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                     max_position_embeddings=77)
CLIP_L14_PROJECTION = 768
BERT_VOCAB = 30522
CLIP_VOCAB = 49408
OPT = {"facebook/opt-2.7b": dict(hidden_size=2560, ffn_dim=10240, num_hidden_layers=32, num_attention_heads=32),
       "facebook/opt-6.7b": dict(hidden_size=4096, ffn_dim=16384, num_hidden_layers=32, num_attention_heads=32)}
OPT_VOCAB = 50272          # the embedding rows; the GPT-2 tokenizer itself has 50265 entries
FLAN_T5 = {"google/flan-t5-xl": dict(d_model=2048, d_ff=5120, num_heads=32),
           "google/flan-t5-xxl": dict(d_model=4096, d_ff=10240, num_heads=64)}
T5_VOCAB = 32128           # rows; the sentencepiece vocabulary has 32100 (100 of them extra ids)


def eva_vit_g_config():
    from transformers import Blip2VisionConfig

    return Blip2VisionConfig()   # BLIP-2's EVA ViT-g/14: width 1408, 39 layers, 224 px, patch 14


def clip_vit_l14_config(vocab_size: int = CLIP_VOCAB, tokenizer=None):
    from transformers import CLIPConfig

    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id) if tokenizer else {}
    return CLIPConfig(text_config=dict(vocab_size=vocab_size, **CLIP_L14_TEXT, **ids), vision_config=CLIP_L14_VISION,
                      projection_dim=CLIP_L14_PROJECTION)


def blip_large_config(tokenizer):
    from transformers import BlipConfig

    text = dict(vocab_size=len(tokenizer), max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
                pad_token_id=tokenizer.pad_token_id, sep_token_id=tokenizer.sep_token_id,
                eos_token_id=tokenizer.sep_token_id, encoder_hidden_size=BLIP_LARGE_VISION["hidden_size"], **BERT_BASE)
    return BlipConfig(text_config=text, vision_config=BLIP_LARGE_VISION)


def opt_config(repo_id: str, tokenizer=None):
    from transformers import OPTConfig

    h = OPT[repo_id]
    ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id) if tokenizer else {}
    return OPTConfig(vocab_size=OPT_VOCAB, max_position_embeddings=2048, word_embed_proj_dim=h["hidden_size"],
                     **h, **ids)


def t5_config(repo_id: str):
    from transformers import T5Config

    return T5Config(vocab_size=T5_VOCAB, d_kv=64, num_layers=24, num_decoder_layers=24, feed_forward_proj="gated-gelu",
                    tie_word_embeddings=False, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
                    **FLAN_T5[repo_id])


# -- tokenizers of the real vocabulary sizes (filler entries w<i>: one token per word) ---------
def bert_tokenizer(vocab_size: int = BERT_VOCAB, dec_token: bool = False):
    from orchestration.tiny_models import bert_tokenizer_of

    return bert_tokenizer_of([f"w{i}" for i in range(vocab_size - 5)], dec_token)


def _byte_vocab(size: int, specials: list[str], suffix: str = "") -> dict:
    from tokenizers import pre_tokenizers

    vocab = {}
    for c in pre_tokenizers.ByteLevel.alphabet():
        vocab.setdefault(c, len(vocab))
        if suffix:
            vocab.setdefault(c + suffix, len(vocab))
    while len(vocab) < size - len(specials):
        vocab[f"w{len(vocab)}{suffix}"] = len(vocab)
    for s in specials:
        vocab[s] = len(vocab)
    return vocab


def gpt2_tokenizer():
    """GPT-2 byte-level BPE with OPT's 50265 entries (no merges: a caption is one token per byte)."""
    from transformers import GPT2Tokenizer

    return GPT2Tokenizer(vocab=_byte_vocab(50265, ["<|endoftext|>", "<pad>"]), merges=[], pad_token="<pad>",
                         bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def clip_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=_byte_vocab(CLIP_VOCAB, ["<|startoftext|>", "<|endoftext|>"], suffix="</w>"), merges=[])


def t5_tokenizer():
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(f"▁w{i}", -1.0) for i in range(32000 - len(pieces))]
    return T5Tokenizer(vocab=pieces, extra_ids=100)


def random_texts(n: int, words: int, vocab: int, seed: int) -> list[str]:
    """Captions of filler words ``w<i>`` (one BERT / T5 token each)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, vocab - 200, (n, words), generator=g)
    return [" ".join(f"w{i}" for i in row.tolist()) for row in ids]


# -- random stand-ins in the save_pretrained layout ------------------------------------------
def _save(model_cls, config, out: Path, dtype: torch.dtype, device: str, *extras) -> Path:
    torch.manual_seed(0)
    with torch.device(device):
        model = model_cls._from_config(config, dtype=dtype)  # initialised in dtype: no fp32 copy of 2.7B
    model.save_pretrained(out)
    del model
    for extra in extras:
        extra.save_pretrained(out)
    return out


def build_random(repo_id: str, out: Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Path:
    """Random weights at ``repo_id``'s real architecture in ``out`` (+ tokenizer / image processor)."""
    from transformers import (BertForMaskedLM, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor,
                              Blip2VisionModel, CLIPImageProcessor, CLIPModel, CLIPProcessor, OPTForCausalLM,
                              T5ForConditionalGeneration)

    from orchestration.tiny_models import CLIP_MEAN, CLIP_STD

    clip_image = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
                                    image_mean=CLIP_MEAN, image_std=CLIP_STD)
    if repo_id == "Salesforce/blip2-opt-2.7b":   # its vision tower, as stage-models stages it
        return _save(Blip2VisionModel, eva_vit_g_config(), out, dtype, device,
                     BlipImageProcessor(size={"height": 224, "width": 224}, image_mean=CLIP_MEAN, image_std=CLIP_STD))
    if repo_id == "openai/clip-vit-large-patch14":
        tok = clip_tokenizer()
        return _save(CLIPModel, clip_vit_l14_config(tokenizer=tok), out, dtype, device, CLIPProcessor(clip_image, tok))
    if repo_id == "Salesforce/blip-image-captioning-large":
        tok = bert_tokenizer(dec_token=True)
        image = BlipImageProcessor(size={"height": 384, "width": 384}, image_mean=CLIP_MEAN, image_std=CLIP_STD)
        return _save(BlipForConditionalGeneration, blip_large_config(tok), out, dtype, device, BlipProcessor(image, tok))
    if repo_id == "bert-base-uncased":
        from transformers import BertConfig

        return _save(BertForMaskedLM, BertConfig(vocab_size=BERT_VOCAB), out, dtype, device, bert_tokenizer())
    if repo_id in OPT:
        tok = gpt2_tokenizer()
        return _save(OPTForCausalLM, opt_config(repo_id, tok), out, dtype, device, tok)
    if repo_id in FLAN_T5:
        return _save(T5ForConditionalGeneration, t5_config(repo_id), out, dtype, device, t5_tokenizer())
    raise ValueError(f"no real-size config for {repo_id!r}")
