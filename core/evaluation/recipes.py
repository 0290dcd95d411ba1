"""LAVIS' evaluation recipes per task (prompt, beams, lengths, k_test) and their translation into
the model's decoding options. Imports no torch.

LAVIS' ``min_len`` is a total ``min_length``: it counts what the decoder holds before the first new
token (BOS and prompt for OPT, the start token for T5). The language component says how many
tokens that is (``LanguageModel.tokens_before_generation``), so no model family is named here.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

VQA_PROMPT = "Question: {} Short answer:"
CAPTION_PROMPT = "a photo of"


@dataclass(frozen=True)
class Recipe:
    """One task's evaluation settings, as LAVIS' ``lavis/projects/blip2/eval/*.yaml`` set them."""

    task: str
    kind: str  # "vqa", "caption" or "retrieval"
    prompt: str = ""  # VQA: a format string with {} for the question
    num_beams: int = 5
    max_len: int = 30  # new tokens at most
    min_len: int = 1  # LAVIS' total min_length (see module docstring)
    length_penalty: float | None = None  # None: the language model's default for the kind
    k_test: int = 128  # retrieval: candidates re-ranked by ITM
    split: str = "test"  # Karpathy split read for captions and retrieval
    # Beam scoring: "transformers" (transformers 5) or "lavis" (transformers 4.26, which produced
    # the published numbers through LAVIS); see GenerationOptions.beam_convention.
    beam_convention: str = "transformers"

    def settings(self) -> dict[str, Any]:
        return asdict(self)


_VQA = dict(kind="vqa", prompt=VQA_PROMPT, num_beams=5, max_len=10, min_len=1)
RECIPES: dict[str, Recipe] = {
    "vqav2": Recipe("vqav2", **_VQA),
    "okvqa": Recipe("okvqa", **_VQA),
    "gqa": Recipe("gqa", **_VQA),
    # caption_coco_opt*_eval.yaml: beams 5, max_len 30, min_len 8, prompt "a photo of".
    "coco_caption": Recipe("coco_caption", "caption", CAPTION_PROMPT, 5, 30, 8),
    # caption_nocaps_out_domain_flant5*_eval.yaml: beams 5, max_len 80, min_len 10, penalty 1.
    "nocaps": Recipe("nocaps", "caption", CAPTION_PROMPT, 5, 80, 10, 1.0, split="val"),
    "coco_retrieval": Recipe("coco_retrieval", "retrieval", k_test=128),
    "flickr_retrieval": Recipe("flickr_retrieval", "retrieval", k_test=128),
}


def recipe(task: str, **overrides: Any) -> Recipe:
    """The reference recipe of ``task`` with ``overrides`` (None values keep the default)."""
    if task not in RECIPES:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(RECIPES)}")
    return replace(RECIPES[task], **{key: value for key, value in overrides.items() if value is not None})


def process_question(question: str, max_words: int = 50) -> str:
    """A question as LAVIS' ``blip_question`` processor feeds it: lower-case, without . ! " ( ) * # : ; ~,
    right-stripped, at most ``max_words`` words ("?" stays)."""
    question = re.sub(r"([.!\"()*#:;~])", "", question.lower()).rstrip(" ")
    words = question.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else question


def generation_options(language: Any, recipe: Recipe, prompts: Sequence[str]) -> dict[str, Any]:
    """GenerationOptions fields that decode ``prompts`` as LAVIS does for ``recipe``.

    ``min_new_tokens`` is LAVIS' ``min_len`` less what the decoder already holds; a batch of
    prompts is padded to its longest, which is what LAVIS counts.
    """
    options = dict(language.generation_defaults(recipe.kind))
    options["num_beams"] = recipe.num_beams
    options["max_new_tokens"] = recipe.max_len
    if recipe.length_penalty is not None:
        options["length_penalty"] = recipe.length_penalty
    options["beam_convention"] = recipe.beam_convention
    counted = max((language.tokens_before_generation(prompt) for prompt in prompts), default=0)
    # Never above the maximum (transformers would only warn and stop at the maximum anyway).
    options["min_new_tokens"] = min(max(0, recipe.min_len - counted), recipe.max_len)
    return options


__all__ = ["CAPTION_PROMPT", "RECIPES", "Recipe", "VQA_PROMPT", "generation_options", "process_question", "recipe"]
