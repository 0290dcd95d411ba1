"""Retrieval: Recall@K and ranks on constructed cases, ITC top-k + ITM re-ranking against a hand
computation, and the feature API against transformers' Blip2ForImageTextRetrieval."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from blip2kit.core.evaluation import recall_at_k
from blip2kit.core.evaluation.retrieval_scoring import rerank_top_k


def test_recall_and_ranks_on_a_constructed_case() -> None:
    # 3 images, 2 true texts each: texts 0,1 -> image 0; 2,3 -> image 1; 4,5 -> image 2.
    txt2img = [0, 0, 1, 1, 2, 2]
    img2txt = [[0, 1], [2, 3], [4, 5]]
    scores_i2t = np.array(
        [
            [0.1, 0.9, 0.0, 0.0, 0.0, 0.0],  # a true text first: rank 1
            [0.9, 0.8, 0.1, 0.7, 0.0, 0.0],  # best true text (3) third: rank 3
            [0.5, 0.6, 0.7, 0.8, 0.2, 0.1],  # best true text (4) fifth: rank 5
        ]
    )
    scores_t2i = np.array(
        [
            [0.9, 0.1, 0.0],  # image 0 first: 1
            [0.1, 0.9, 0.0],  # 2
            [0.1, 0.9, 0.0],  # 1
            [0.8, 0.0, 0.9],  # 3
            [0.5, 0.5, 0.5],  # all tied: the higher index ranks first, so image 2 is first: 1
            [0.5, 0.5, 0.5],  # 1
        ]
    )
    report = recall_at_k(scores_i2t, scores_t2i, img2txt, txt2img)
    assert report["image_to_text_ranks"] == [1, 3, 5]
    assert report["text_to_image_ranks"] == [1, 2, 1, 3, 1, 1]
    assert report["txt_r1"] == pytest.approx(100 / 3)
    assert report["txt_r5"] == report["txt_r10"] == 100.0
    assert report["img_r1"] == pytest.approx(400 / 6)
    assert report["img_r5"] == 100.0
    assert report["txt_r_mean"] == pytest.approx((100 / 3 + 200) / 3)
    assert report["r_mean"] == pytest.approx((report["txt_r_mean"] + report["img_r_mean"]) / 2)
    assert report["agg_metrics"] == report["txt_r_mean"]
    tensors = recall_at_k(torch.tensor(scores_i2t), torch.tensor(scores_t2i), img2txt, txt2img)
    assert tensors["image_to_text_ranks"] == [1, 3, 5]


def test_recall_refuses_inconsistent_inputs() -> None:
    scores = np.zeros((2, 2))
    with pytest.raises(ValueError, match=r"txt2img\[1\] = 0"):
        recall_at_k(scores, scores, [[0], [1]], [0, 0])
    with pytest.raises(ValueError, match="scores_t2i must be"):
        recall_at_k(np.zeros((2, 3)), np.zeros((2, 3)), [[0], [1, 2]], [0, 1, 1])
    with pytest.raises(ValueError, match="NaN"):
        recall_at_k(np.full((2, 2), np.nan), scores, [[0], [1]], [0, 1])


def test_itm_rerank_changes_the_itc_order_as_computed_by_hand() -> None:
    itc = torch.tensor(
        [
            [0.9, 0.8, 0.1, 0.0],  # image 0: ITC ranks text 0 first
            [0.2, 0.3, 0.7, 0.6],  # image 1: ITC ranks text 2 first
        ]
    )
    itm_table = torch.tensor(
        [
            [0.0, 2.0, 5.0, 5.0],  # ITM prefers text 1 for image 0 (text 2 is no candidate)
            [0.0, 0.0, -1.0, 1.0],  # ... and text 3 for image 1
        ]
    )
    calls = []

    def itm(rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        calls.append(len(rows))
        return itm_table[rows, columns]

    scores = rerank_top_k(itc, itm, k_test=2, batch_size=3, show_progress=False)
    expected = torch.tensor(
        [
            [0.9 + 0.0, 0.8 + 2.0, -100.0, -100.0],
            [-100.0, -100.0, 0.7 - 1.0, 0.6 + 1.0],
        ]
    )
    assert torch.allclose(scores, expected)
    assert calls == [3, 1]  # 2 rows x top-2 pairs, in batches of 3
    # Text 1 is image 0's true caption: ITC alone ranks it 2nd, the re-ranked scores 1st.
    itc_only = recall_at_k(itc, itc.t(), [[1], [3]], [0, 0, 1, 1])
    reranked = recall_at_k(scores, scores.t(), [[1], [3]], [0, 0, 1, 1])
    assert itc_only["image_to_text_ranks"] == [2, 2]
    assert reranked["image_to_text_ranks"] == [1, 1]
    with pytest.raises(ValueError, match="k_test"):
        rerank_top_k(itc, itm, k_test=0)
