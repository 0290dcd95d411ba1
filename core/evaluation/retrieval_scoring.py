"""BLIP-2's retrieval scores (LAVIS ``compute_sim_matrix``): ITC for every pair, ITM for the top k.

1. Every image's normalised query features [Q, D] and every text's feature [D].
2. ITC similarity of each pair: max over queries of the dot product (not divided by temp).
3. Image -> text: each image's top-k texts by ITC are re-scored with the ITM class-1 logit; the
   final score is ITM logit + ITC similarity, and every text outside the top k gets -100. Text ->
   image the same way against each text's top-k images.

Uses torch (imported lazily by ``blip2kit.core.evaluation``); the model is reached only through
its feature API (``embed_images`` / ``embed_texts``) and its bridge's ``match_logits``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm.auto import tqdm

from blip2kit.core.features import bridge_autocast, representation_bridge
from blip2kit.core.objectives import world_info
from blip2kit.core.retrieval import itc_similarity

if TYPE_CHECKING:
    from blip2kit.core.model import Blip2

NON_CANDIDATE_SCORE = -100.0
LAVIS_TEXT_LENGTH = 35  # compute_sim_matrix tokenises captions to 35 tokens


def itc_similarity_matrix(image_features: Tensor, text_features: Tensor, *, chunk: int = 256) -> Tensor:
    """image_features [I, Q, D], text_features [T, D] -> [I, T]: max over queries of the dot product."""
    rows = []
    for start in range(0, image_features.shape[0], chunk):
        block = image_features[start : start + chunk]  # (c, Q, D)
        rows.append(itc_similarity(block, text_features))  # (c, T); chunks bound the [c, T, Q] buffer
    return torch.cat(rows, dim=0)


def rerank_top_k(
    itc: Tensor,
    itm_logit: Callable[[Tensor, Tensor], Tensor],
    *,
    k_test: int = 128,
    batch_size: int = 128,
    rows: range | None = None,
    description: str = "ITM re-ranking",
    show_progress: bool = True,
) -> Tensor:
    """Re-score each row's top-k columns of ``itc`` [R, C] with ITM; the rest get -100.

    ``itm_logit(rows, columns)`` takes two index tensors of equal length and returns the ITM
    class-1 logit of each (row, column) pair. Returns the final scores of ``rows`` (default: all)
    [len(rows), C]: ITM + ITC for the candidates, -100 elsewhere. Rows are queries; call with
    ``itc.t()`` for the other direction.
    """
    if k_test < 1:
        raise ValueError(f"k_test must be at least 1, got {k_test}")
    rows = range(itc.shape[0]) if rows is None else rows
    num_columns = itc.shape[1]
    k = min(k_test, num_columns)
    scores = torch.full((len(rows), num_columns), NON_CANDIDATE_SCORE, dtype=torch.float32, device=itc.device)
    top_similarity, top_columns = itc[rows.start : rows.stop].topk(k, dim=1)  # (r, k) each
    local_rows = torch.arange(len(rows), device=itc.device)[:, None].expand(-1, k)  # (r, k)
    flat_local, flat_columns = local_rows.reshape(-1), top_columns.reshape(-1)  # (r*k,)
    flat_similarity = top_similarity.reshape(-1).float()
    for start in tqdm(range(0, flat_local.shape[0], batch_size), desc=description, disable=not show_progress):
        pair_local = flat_local[start : start + batch_size]
        pair_columns = flat_columns[start : start + batch_size]
        logits = itm_logit(pair_local + rows.start, pair_columns).float().to(itc.device)  # (b,)
        scores[pair_local, pair_columns] = logits + flat_similarity[start : start + batch_size]
    return scores


def rows_of_rank(num_rows: int, rank: int, world: int) -> range:
    """The contiguous block of query rows that ``rank`` re-ranks (as LAVIS splits them)."""
    step = -(-num_rows // world)  # ceil
    return range(min(rank * step, num_rows), min((rank + 1) * step, num_rows))


def _sum_across_ranks(tensor: Tensor) -> Tensor:
    """all_reduce(SUM) when torch.distributed runs; each rank wrote only its own rows."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def _gather_rows(local: Tensor, rows: range, num_rows: int) -> Tensor:
    full = torch.zeros((num_rows, local.shape[1]), dtype=local.dtype, device=local.device)
    full[rows.start : rows.stop] = local
    return _sum_across_ranks(full)


@torch.no_grad()
def retrieval_scores(
    model: Blip2,
    image_batches: Iterable[Tensor],
    texts: Sequence[str],
    *,
    k_test: int = 128,
    batch_size: int = 128,
    text_max_length: int | None = LAVIS_TEXT_LENGTH,
    show_progress: bool = True,
    split_across_ranks: bool = False,
) -> tuple[Tensor, Tensor]:
    """BLIP-2 retrieval scores of a stage-1 model: (scores_i2t [I, T], scores_t2i [T, I]), on CPU.

    :param image_batches: pixel batches [b, 3, S, S] in image order (e.g. a DataLoader).
    :param texts: all captions, in text order.
    :param k_test: candidates re-ranked by ITM per query (LAVIS: 128 for COCO and Flickr30k).
    :param batch_size: texts embedded, and ITM pairs scored, per forward pass.
    :param text_max_length: tokens per caption (LAVIS pads and truncates to 35); None = the bridge's.
    :param split_across_ranks: under torch.distributed, each rank re-ranks its own block of the
        queries and every rank gets the full matrices: then every rank must call this with the
        same images and texts (a collective). Off by default, so one rank may call it alone.
    Images' prepared encoder features stay on the model's device for ITM, as in LAVIS.
    """
    bridge = representation_bridge(model)
    texts = list(texts)
    if not texts:
        raise ValueError("no texts to retrieve")
    rank, world = world_info() if split_across_ranks else (0, 1)
    show_progress = show_progress and rank == 0

    image_features, image_embeds = [], []
    total = len(image_batches) if hasattr(image_batches, "__len__") else None
    for pixels in tqdm(image_batches, total=total, desc="embedding images", disable=not show_progress):
        embedded = model.embed_images(pixels)
        image_features.append(embedded.features)  # (b, Q, D)
        image_embeds.append(embedded.image_embeds)  # (b, N, W)
    if not image_features:
        raise ValueError("no images to retrieve from: image_batches was empty")
    image_features_all = torch.cat(image_features)  # (I, Q, D)
    image_embeds_all = torch.cat(image_embeds)  # (I, N, W)

    text_features, input_ids, attention_mask = [], [], []
    for start in tqdm(range(0, len(texts), batch_size), desc="embedding texts", disable=not show_progress):
        embedded = model.embed_texts(texts[start : start + batch_size], max_length=text_max_length)
        text_features.append(embedded.features)  # (b, D)
        input_ids.append(embedded.input_ids)  # (b, L)
        attention_mask.append(embedded.attention_mask)
    text_features_all = torch.cat(text_features).to(image_features_all.device)  # (T, D)
    input_ids_all = torch.cat(input_ids).to(image_embeds_all.device)  # (T, L)
    attention_mask_all = torch.cat(attention_mask).to(image_embeds_all.device)

    itc = itc_similarity_matrix(image_features_all, text_features_all)  # (I, T)

    was_training = model.training
    model.eval()
    try:

        def itm_of(image_index: Tensor, text_index: Tensor) -> Tensor:
            image_index = image_index.to(image_embeds_all.device)
            text_index = text_index.to(image_embeds_all.device)
            pair_images = image_embeds_all[image_index]  # (b, N, W)
            with bridge_autocast(model, pair_images):
                logits = bridge.match_logits(
                    pair_images, None, input_ids_all[text_index], attention_mask_all[text_index]
                )  # (b, 2)
            return logits[:, 1]

        # Under torch.distributed every rank embeds everything (cheap) and re-ranks its own block
        # of queries (the ITM passes are the cost); the blocks are then summed into place.
        num_images, num_texts = itc.shape
        image_rows = rows_of_rank(num_images, rank, world)
        text_rows = rows_of_rank(num_texts, rank, world)
        scores_i2t = rerank_top_k(
            itc, itm_of, k_test=k_test, batch_size=batch_size, rows=image_rows,
            description="re-ranking texts per image", show_progress=show_progress,
        )
        scores_t2i = rerank_top_k(
            itc.t(), lambda text, image: itm_of(image, text), k_test=k_test, batch_size=batch_size,
            rows=text_rows, description="re-ranking images per text", show_progress=show_progress,
        )
    finally:
        model.train(was_training)
    if world > 1:
        scores_i2t = _gather_rows(scores_i2t, image_rows, num_images)
        scores_t2i = _gather_rows(scores_t2i, text_rows, num_texts)
    return scores_i2t.cpu(), scores_t2i.cpu()


__all__ = [
    "LAVIS_TEXT_LENGTH",
    "NON_CANDIDATE_SCORE",
    "itc_similarity_matrix",
    "rerank_top_k",
    "retrieval_scores",
    "rows_of_rank",
]
