"""Retrieval Recall@K in both directions with LAVIS's names (``lavis/tasks/retrieval.py``).

Image -> text: a query image's rank is the best rank among all of its true captions (COCO has
five per image). Text -> image: the rank of the caption's one image. Recall@K is the percentage
of queries whose rank is within the first K. NumPy only: no torch, no model code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

RECALL_KS = (1, 5, 10)


def recall_at_k(
    scores_i2t: Any,
    scores_t2i: Any,
    img2txt: Sequence[Sequence[int]],
    txt2img: Sequence[int],
) -> dict[str, Any]:
    """Recall@1/5/10 both ways from score matrices (higher = better).

    :param scores_i2t: [num_images, num_texts] scores of every text for each image.
    :param scores_t2i: [num_texts, num_images] scores of every image for each text.
    :param img2txt: for each image, the indices of its true texts.
    :param txt2img: for each text, the index of its image.
    Returns percentages ``txt_r1``, ``txt_r5``, ``txt_r10``, ``txt_r_mean`` (image -> text),
    ``img_r1``, ``img_r5``, ``img_r10``, ``img_r_mean`` (text -> image), ``r_mean`` (the mean of
    the two means), ``agg_metrics`` (= ``txt_r_mean``, what LAVIS selects checkpoints by), and
    ``image_to_text_ranks`` / ``text_to_image_ranks``: the 1-based rank of the true match for
    every query. Ties are broken as a descending stable sort does: among equal scores, the higher
    index ranks first (LAVIS's ``np.argsort`` leaves tie order to the sort algorithm).
    """
    scores_i2t = _as_matrix(scores_i2t, "scores_i2t")
    scores_t2i = _as_matrix(scores_t2i, "scores_t2i")
    num_images, num_texts = scores_i2t.shape
    if scores_t2i.shape != (num_texts, num_images):
        raise ValueError(
            f"scores_t2i has shape {scores_t2i.shape} but scores_i2t is {scores_i2t.shape}; "
            f"scores_t2i must be [num_texts, num_images] = ({num_texts}, {num_images})"
        )
    _check_pairs(img2txt, txt2img, num_images, num_texts)

    image_ranks = np.empty(num_images, dtype=np.int64)
    for image, texts in enumerate(img2txt):
        image_ranks[image] = min(_rank(scores_i2t[image], text) for text in texts)
    text_ranks = np.array(
        [_rank(scores_t2i[text], image) for text, image in enumerate(txt2img)], dtype=np.int64
    )

    report: dict[str, Any] = {}
    for prefix, ranks in (("txt", image_ranks), ("img", text_ranks)):
        recalls = [100.0 * float(np.mean(ranks <= k)) for k in RECALL_KS]
        for k, recall in zip(RECALL_KS, recalls, strict=True):
            report[f"{prefix}_r{k}"] = recall
        report[f"{prefix}_r_mean"] = sum(recalls) / len(recalls)
    report["r_mean"] = (report["txt_r_mean"] + report["img_r_mean"]) / 2
    report["agg_metrics"] = report["txt_r_mean"]
    report["image_to_text_ranks"] = image_ranks.tolist()
    report["text_to_image_ranks"] = text_ranks.tolist()
    return report


def _rank(scores: np.ndarray, target: int) -> int:
    """1-based position of ``target`` when ``scores`` are sorted high to low (ties: higher index first)."""
    score = scores[target]
    ahead = np.count_nonzero(scores > score)
    tied_ahead = np.count_nonzero(scores[target + 1 :] == score)
    return int(ahead + tied_ahead + 1)


def _as_matrix(scores: Any, name: str) -> np.ndarray:
    if hasattr(scores, "detach"):  # a torch tensor, possibly on an accelerator
        scores = scores.detach().float().cpu().numpy()
    matrix = np.asarray(scores, dtype=np.float64)
    if matrix.ndim != 2 or 0 in matrix.shape:
        raise ValueError(f"{name} must be a non-empty 2-d score matrix, got shape {matrix.shape}")
    if np.isnan(matrix).any():
        raise ValueError(f"{name} holds NaN scores; ranks would be meaningless (check the model's precision)")
    return matrix


def _check_pairs(
    img2txt: Sequence[Sequence[int]], txt2img: Sequence[int], num_images: int, num_texts: int
) -> None:
    if len(img2txt) != num_images:
        raise ValueError(f"img2txt lists {len(img2txt)} images but the scores have {num_images}")
    if len(txt2img) != num_texts:
        raise ValueError(f"txt2img lists {len(txt2img)} texts but the scores have {num_texts}")
    for text, image in enumerate(txt2img):
        if not 0 <= image < num_images:
            raise ValueError(f"txt2img[{text}] = {image} is not an image index (0..{num_images - 1})")
    for image, texts in enumerate(img2txt):
        if not texts:
            raise ValueError(f"img2txt[{image}] is empty: every image needs at least one true text")
        for text in texts:
            if not 0 <= text < num_texts:
                raise ValueError(f"img2txt[{image}] holds {text}, not a text index (0..{num_texts - 1})")
            if txt2img[text] != image:
                raise ValueError(
                    f"img2txt[{image}] lists text {text}, but txt2img[{text}] = {txt2img[text]}; "
                    "the two maps must describe the same pairs"
                )


__all__ = ["RECALL_KS", "recall_at_k"]
