"""The caption clean-up: LAVIS' ``BlipCaptionProcessor.pre_caption``, for training and eval."""
from __future__ import annotations

import re

import pytest

from training.text import pre_caption


def lavis_pre_caption(caption: str, max_words: int = 50) -> str:
    """LAVIS' regexes and steps, restated literally (lavis/processors/blip_processors.py)."""
    caption = re.sub(r"([.!\"()*#:;~])", " ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption)
    caption = caption.rstrip("\n")
    caption = caption.strip(" ")
    caption_words = caption.split(" ")
    if len(caption_words) > max_words:
        caption = " ".join(caption_words[:max_words])
    return caption


CASES = [
    # (text, max_words, expected)
    ("A man's dog, running on the beach!", 50, "a man's dog, running on the beach"),
    ("A man (left)  riding a horse!\n", 50, "a man left riding a horse"),
    ("it's 3,5 ok.", 50, "it's 3,5 ok"),
    ('"Quoted" *stars* #tag: a;b~c', 50, "quoted stars tag a b c"),
    ("well-known / slash? yes & no", 50, "well-known / slash? yes & no"),  # only LAVIS' ten characters go
    ("  two\t\tspaces \n\n and a tab\there ", 50, "two spaces and a tab\there"),  # one tab alone stays
    ("trailing newline\n", 50, "trailing newline"),
    ("Ünïcödé CAFÉ — Straße!", 50, "ünïcödé café — straße"),
    ("一只狗在海滩上奔跑。", 50, "一只狗在海滩上奔跑。"),
    ("one two three four", 2, "one two"),
    ("one two", 2, "one two"),
    ("...", 50, ""),
    ("", 50, ""),
]


@pytest.mark.parametrize("text, max_words, expected", CASES)
def test_pre_caption_literal_strings(text, max_words, expected):
    assert pre_caption(text, max_words) == expected


@pytest.mark.parametrize("text, max_words, expected", CASES)
def test_pre_caption_is_lavis(text, max_words, expected):
    assert pre_caption(text, max_words) == lavis_pre_caption(text, max_words)


def test_max_words_counts_words_after_the_clean_up():
    text = " ".join(f"W{i}." for i in range(80))
    assert pre_caption(text, 50).split(" ") == [f"w{i}" for i in range(50)]
    assert pre_caption(text) == pre_caption(text, 50)  # LAVIS' default
    assert pre_caption(text, 50) == lavis_pre_caption(text, 50)
