"""The check every official metric makes first: one string prediction per graded item, no more.

The official tools (``vqa.loadRes``, ``COCO.loadRes``) refuse predictions whose ids do not match
the annotated ones. Ids of another type (``"42"`` against ``42``) are the usual cause, so the
message says so. Pure Python: no torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def check_prediction_ids(
    predictions: Mapping[Any, Any],
    expected: Mapping[Any, Any],
    *,
    id_name: str,
    what: str,
    unpredicted: str,
    unexpected: str,
    fix: str,
) -> None:
    """Every id of ``expected`` has a prediction, every prediction an expected id, and each is a string.

    :param id_name: the id's field name ("question_id"), named in the error.
    :param what: what a prediction is ("answer"), named in the error.
    :param unpredicted: how to say that expected ids have no prediction ("questions have no prediction").
    :param unexpected: how to say that predictions have no expected id ("predictions have no annotation").
    :param fix: what to do about a mismatch, appended to its message.
    """
    missing = [key for key in expected if key not in predictions]
    unknown = [key for key in predictions if key not in expected]
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"{len(missing)} {unpredicted} (e.g. {missing[:3]})")
        if unknown:
            parts.append(f"{len(unknown)} {unexpected} (e.g. {unknown[:3]})")
        raise ValueError("; ".join(parts) + f". {fix}, with {id_name}s of the same type (int vs str) on both sides")
    for key, prediction in predictions.items():
        if not isinstance(prediction, str):
            raise ValueError(
                f"prediction for {id_name} {key!r} is {type(prediction).__name__}, not a string {what}"
            )


__all__ = ["check_prediction_ids"]
