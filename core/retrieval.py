"""Image-text retrieval scores of a RepresentationBridge: ITC similarity and ITM score.

As LAVIS ``compute_sim_matrix`` and HF ``Blip2ForImageTextRetrieval``: the ITC similarity is the
max over queries of the cosine similarity (not divided by temp); the ITM score is the class-1
logit of the 2-way ITM logits averaged over queries. Re-ranking (ITC top-k, then ITM + ITC) and
Recall@K live in the evaluation code, which builds on these.
"""

from __future__ import annotations

import torch
from torch import Tensor

from blip2kit.core.interfaces import RepresentationBridge


@torch.no_grad()
def image_embeddings(
    bridge: RepresentationBridge, image_features: Tensor, image_mask: Tensor | None = None
) -> Tensor:
    """Encoder features [B, N, W] -> normalised ITC image features [B, Q, D]."""
    query_state = bridge.encode_image(bridge.prepare_image(image_features), image_mask)
    return bridge.image_features(query_state.query_output)


@torch.no_grad()
def text_embeddings(bridge: RepresentationBridge, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Tokenised texts [B, T] -> normalised ITC text features [B, D]."""
    return bridge.text_features(bridge.encode_text(input_ids, attention_mask))


def itc_similarity(image_feats: Tensor, text_feats: Tensor) -> Tensor:
    """image_feats [I, Q, D], text_feats [T, D] -> [I, T]: max over queries of the cosine."""
    return torch.einsum("iqd,td->itq", image_feats, text_feats).max(dim=-1).values


@torch.no_grad()
def itm_logits(
    bridge: RepresentationBridge,
    image_features: Tensor,
    input_ids: Tensor,
    attention_mask: Tensor,
    image_mask: Tensor | None = None,
) -> Tensor:
    """Paired images [B, N, W] and texts [B, T] -> 2-way ITM logits averaged over queries [B, 2]."""
    return bridge.match_logits(bridge.prepare_image(image_features), image_mask, input_ids, attention_mask)


__all__ = ["image_embeddings", "itc_similarity", "itm_logits", "text_embeddings"]
