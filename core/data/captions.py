"""LAVIS's caption pre-processing (``BlipCaptionProcessor.pre_caption``), reproduced exactly.

Its quirks are kept on purpose, so captions tokenise as they did for the released models: only the
characters ``.!"()*#:;~`` become spaces, only runs of two or more whitespace characters collapse
(a lone tab or newline stays), and only spaces (and a trailing newline) are stripped.
"""

from __future__ import annotations

import re

__all__ = ["MAX_WORDS", "normalize_caption"]

MAX_WORDS = 50  # LAVIS blip_caption default and the paper's setting
_PUNCTUATION = re.compile(r"([.!\"()*#:;~])")
_WHITESPACE_RUN = re.compile(r"\s{2,}")


def normalize_caption(text: str, max_words: int = MAX_WORDS) -> str:
    """Lower case, LAVIS's punctuation replaced by spaces, whitespace runs collapsed, at most
    ``max_words`` space-separated words. An empty result means the caption is unusable."""
    if not isinstance(text, str):
        raise TypeError(f"a caption must be a string, got {type(text).__name__}: {text!r}")
    caption = _PUNCTUATION.sub(" ", text.lower())
    caption = _WHITESPACE_RUN.sub(" ", caption)
    caption = caption.rstrip("\n").strip(" ")
    words = caption.split(" ")
    if len(words) > max_words:
        caption = " ".join(words[:max_words])
    return caption
