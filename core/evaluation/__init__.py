"""Evaluation: VQA accuracy, captioning metrics, retrieval Recall@K, and the task runners.

Importing this package imports neither torch nor model code: names load on first use (PEP 562),
so the metrics work in a plain Python process and ``retrieval_scores`` pulls in torch only when
it is asked for.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "normalize_answer": "blip2kit.core.evaluation.vqa",
    "vqa_accuracy": "blip2kit.core.evaluation.vqa",
    "evaluate_vqa": "blip2kit.core.evaluation.vqa",
    "evaluate_okvqa": "blip2kit.core.evaluation.vqa",
    "evaluate_gqa": "blip2kit.core.evaluation.vqa",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from blip2kit.core.evaluation.vqa import (
        evaluate_gqa,
        evaluate_okvqa,
        evaluate_vqa,
        normalize_answer,
        vqa_accuracy,
    )


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'blip2kit.core.evaluation' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
