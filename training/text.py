"""The one caption clean-up of training (both stages) and evaluation: LAVIS' ``pre_caption``.

Same regular expressions and order as ``BlipCaptionProcessor.pre_caption`` (lavis/processors/
blip_processors.py), so the texts a model sees here are the texts LAVIS would feed it:
only ``. ! " ( ) * # : ; ~`` become spaces (commas, apostrophes, hyphens stay), runs of two or
more whitespace characters become one space (a single tab or newline stays), then a trailing
newline and surrounding spaces go, and at most ``max_words`` space-separated words are kept.
"""
from __future__ import annotations

import re

_PUNCT = re.compile(r"([.!\"()*#:;~])")
_SPACES = re.compile(r"\s{2,}")


def pre_caption(caption: str, max_words: int = 50) -> str:
    caption = _SPACES.sub(" ", _PUNCT.sub(" ", caption.lower()))
    caption = caption.rstrip("\n").strip(" ")
    words = caption.split(" ")
    if len(words) > max_words:
        caption = " ".join(words[:max_words])
    return caption
