"""BLIP-2 stage-1 objectives: ITC, ITM with hard negatives, ITG; generic over RepresentationBridge.

Follows LAVIS ``Blip2Qformer.forward`` (BLIP2_REFERENCE.md section 2): four passes with their own
attention masks, features all-gathered across ranks (ITC without gradient, ITM image embeds with
gradient). Without torch.distributed initialised it runs as world size 1, rank 0 — where the
"gathered" side of each ITC similarity is still detached, exactly as LAVIS's gather behaves.

One saving over LAVIS, with the same losses and gradients: the cross-attention keys/values of an
image depend on the image alone, so when the bridge offers them (``QueryState.image_key_values``)
the 3B ITM pairs read the query pass's K/V instead of projecting their image again per pair.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from blip2kit.core.interfaces import ImageKeyValues, RepresentationBridge

if TYPE_CHECKING:
    from blip2kit.core.model import Blip2

LABEL_SMOOTHING = 0.1
TEMP_MIN, TEMP_MAX = 0.001, 0.5  # the ITC temperature range LAVIS clamps to
NEGATIVE_FILL = -10000.0  # what LAVIS writes over positive pairs before sampling hard negatives


# -- distributed helpers -------------------------------------------------------------------------


def world_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def gather_no_grad(tensor: Tensor) -> Tensor:
    """Concatenate ``tensor`` from every rank along dim 0; no gradient flows through it."""
    _, world = world_info()
    if world == 1:
        return tensor.detach()
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward hands each rank the summed gradient of its own slice."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:
        rank, world = world_info()
        ctx.rank, ctx.batch = rank, tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        # Every rank used the gathered tensor in its own loss: sum their gradients, keep our slice.
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.batch : (ctx.rank + 1) * ctx.batch]


def gather_with_grad(tensor: Tensor) -> Tensor:
    """Concatenate ``tensor`` from every rank; gradients flow back to the rank that owns each part."""
    _, world = world_info()
    if world == 1:
        return tensor
    return _GatherWithGrad.apply(tensor)


# -- the objectives ------------------------------------------------------------------------------


def stage1_losses(
    model: Blip2,
    pixels: Tensor | None,
    captions: Sequence[str],
    image_ids: Tensor | Sequence[int] | None = None,
    *,
    image_features: Tensor | None = None,
    max_length: int | None = None,
    generator: torch.Generator | None = None,
    reuse_image_key_values: bool = True,
) -> dict[str, Tensor]:
    """ITC + ITM + ITG of a stage-1 model ('vision+bridge') on images and their captions.

    :param image_ids: COCO image ids for retrieval fine-tuning: captions of the same image are all
        positives (soft ITC targets, never sampled as ITM negatives).
    :param image_features: the encoder's outputs [B, N, W] (a feature cache) instead of ``pixels``.
    :param generator: random generator for hard-negative sampling (reproducible tests).
    :param reuse_image_key_values: let ITM reuse the query pass's image K/V (same losses and
        gradients); False projects every pair's image again, as LAVIS does (for measuring).
    Returns {'loss', 'loss_itc', 'loss_itm', 'loss_itg'}; only 'loss' carries gradient.
    """
    bridge = model.bridge
    if not isinstance(bridge, RepresentationBridge):
        raise TypeError(
            f"stage-1 objectives need a RepresentationBridge, but {model.name or 'the model'}'s "
            f"bridge is {type(bridge).__name__}; use a bridge that implements encode_text/match_logits"
        )
    # Cached encoder outputs (image_features) stand in for pixels; encode_image checks exactly one.
    encoded = model.encode_image(pixels, image_features=image_features)  # (B, N, vision.width)
    if len(captions) != encoded.shape[0]:
        raise ValueError(f"got {len(captions)} captions for {encoded.shape[0]} images; give one per image")
    tokens = bridge.tokenize(list(captions), max_length=max_length)
    if image_ids is not None and not isinstance(image_ids, Tensor):
        image_ids = torch.as_tensor(list(image_ids), device=encoded.device)
    return representation_losses(
        bridge,
        encoded,
        tokens["input_ids"],
        tokens["attention_mask"],
        image_ids=image_ids,
        generator=generator,
        reuse_image_key_values=reuse_image_key_values,
    )


def representation_losses(
    bridge: RepresentationBridge,
    image_features: Tensor,
    input_ids: Tensor,
    attention_mask: Tensor,
    image_ids: Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
    reuse_image_key_values: bool = True,
) -> dict[str, Tensor]:
    """The stage-1 losses from encoder features [B, N, W] and tokenised captions [B, T].

    ``reuse_image_key_values``: see ``stage1_losses``; without K/V from the bridge it has no effect.
    """
    rank, world = world_info()
    batch = input_ids.shape[0]
    if batch * world < 2:
        raise ValueError(
            "ITM needs at least 2 image-text pairs across all ranks to sample a negative; "
            f"got batch {batch} x world size {world}"
        )
    image_embeds = bridge.prepare_image(image_features)  # (B, N, W)
    image_mask = torch.ones(image_embeds.shape[:2], dtype=torch.long, device=image_embeds.device)

    # Pass (a) queries alone (keep K/V for ITG) and pass (b) text alone.
    query_state = bridge.encode_image(image_embeds, image_mask)
    image_feats = bridge.image_features(query_state.query_output)  # (B, Q, D)
    text_output = bridge.encode_text(input_ids, attention_mask)  # (B, T, H)
    text_feat = bridge.text_features(text_output)  # (B, D)

    # ---- ITC ----
    with torch.no_grad():  # LAVIS keeps the learned temperature in [0.001, 0.5] at every step
        bridge.temp.clamp_(TEMP_MIN, TEMP_MAX)
    image_feats_all = gather_no_grad(image_feats)  # (B*w, Q, D)
    text_feat_all = gather_no_grad(text_feat)  # (B*w, D)
    sim_i2t = torch.einsum("bqd,nd->bnq", image_feats, text_feat_all).max(dim=-1).values  # (B, B*w)
    sim_i2t = sim_i2t / bridge.temp
    sim_t2i = torch.einsum("bd,nqd->bnq", text_feat, image_feats_all).max(dim=-1).values  # (B, B*w)
    sim_t2i = sim_t2i / bridge.temp

    if image_ids is not None:
        image_ids = image_ids.view(-1, 1).to(input_ids.device)  # (B, 1)
        image_ids_all = gather_no_grad(image_ids)  # (B*w, 1)
        positives = image_ids == image_ids_all.t()  # (B, B*w)
        loss_itc = (soft_itc_loss(sim_i2t, positives) + soft_itc_loss(sim_t2i, positives)) / 2
    else:
        positives = torch.zeros_like(sim_i2t, dtype=torch.bool)
        local = torch.arange(batch, device=sim_i2t.device)
        positives[local, rank * batch + local] = True
        targets = rank * batch + local  # (B,)
        loss_itc = (
            F.cross_entropy(sim_i2t, targets, label_smoothing=LABEL_SMOOTHING)
            + F.cross_entropy(sim_t2i, targets, label_smoothing=LABEL_SMOOTHING)
        ) / 2

    # ---- ITM with hard negatives sampled from the ITC similarities ----
    input_ids_all = gather_no_grad(input_ids)  # (B*w, T)
    attention_mask_all = gather_no_grad(attention_mask)  # (B*w, T)
    image_embeds_all = gather_with_grad(image_embeds)  # (B*w, N, W)
    negative_images, negative_texts = sample_hard_negatives(sim_t2i, sim_i2t, positives, generator)
    itm_ids = torch.cat([input_ids, input_ids, input_ids_all[negative_texts]], dim=0)  # (3B, T)
    itm_mask = torch.cat([attention_mask, attention_mask, attention_mask_all[negative_texts]], dim=0)
    itm_image_mask = torch.ones(3 * batch, image_embeds.shape[1], dtype=torch.long, device=image_embeds.device)
    if reuse_image_key_values and query_state.image_key_values is not None:
        own = rank * batch + torch.arange(batch, device=negative_images.device)  # gathered indices
        itm_image_index = torch.cat([own, negative_images, own])  # (3B,) into the gathered batch
        itm_key_values = pair_image_key_values(
            bridge, query_state.image_key_values, image_embeds_all, itm_image_index, rank
        )
        itm_logits = bridge.match_logits_from_key_values(itm_key_values, itm_image_mask, itm_ids, itm_mask)
    else:
        itm_images = torch.cat([image_embeds, image_embeds_all[negative_images], image_embeds], dim=0)
        itm_logits = bridge.match_logits(itm_images, itm_image_mask, itm_ids, itm_mask)  # (3B, 2)
    itm_labels = torch.cat(
        [torch.ones(batch, dtype=torch.long), torch.zeros(2 * batch, dtype=torch.long)]
    ).to(itm_logits.device)  # (3B,)
    loss_itm = F.cross_entropy(itm_logits, itm_labels)

    # ---- ITG: [DEC] replaces [CLS]; the text sees the image only through the cached query K/V ----
    decoder_ids = input_ids.clone()
    decoder_ids[:, 0] = bridge.bos_token_id
    labels = decoder_ids.masked_fill(decoder_ids == bridge.pad_token_id, -100)  # (B, T)
    logits = bridge.caption_logits(query_state, decoder_ids, attention_mask)  # (B, T, V)
    loss_itg = caption_loss(logits, labels)

    loss = loss_itc + loss_itm + loss_itg
    return {
        "loss": loss,
        "loss_itc": loss_itc.detach(),
        "loss_itm": loss_itm.detach(),
        "loss_itg": loss_itg.detach(),
    }


def pair_image_key_values(
    bridge: RepresentationBridge,
    own_key_values: ImageKeyValues,
    image_embeds_all: Tensor,
    image_index: Tensor,
    rank: int,
) -> ImageKeyValues:
    """The cross-attention K/V of each ITM pair's image, ``image_index`` [P] into the gathered batch.

    This rank's images read ``own_key_values`` (its query pass's, [B, ...]), so their gradient
    reaches the K/V projections and the image embeds through the one projection. Hard-negative
    images drawn from other ranks have no K/V here: they are projected from their gathered embeds
    (``gather_with_grad``, so their gradient still goes back to the rank that owns them), once
    per distinct image.
    """
    batch = own_key_values.batch_size
    start = rank * batch
    is_own = (image_index >= start) & (image_index < start + batch)  # (P,)
    if bool(is_own.all()):  # always so on one process
        return own_key_values.select(image_index - start)
    foreign = torch.unique(image_index[~is_own])  # sorted gathered indices of other ranks' images
    bank = ImageKeyValues.cat([own_key_values, bridge.image_key_values(image_embeds_all[foreign])])
    bank_row = torch.where(
        is_own, image_index - start, batch + torch.searchsorted(foreign, image_index)
    )  # (P,) row of each pair's image in [own ; foreign]
    return bank.select(bank_row)


def soft_itc_loss(similarity: Tensor, positives: Tensor) -> Tensor:
    """COCO fine-tuning ITC: targets 0.9 * positives / count + 0.1 / N, soft cross-entropy."""
    targets = positives.float() / positives.float().sum(dim=1, keepdim=True)  # (B, N)
    targets = LABEL_SMOOTHING / targets.shape[1] + (1 - LABEL_SMOOTHING) * targets
    return -(F.log_softmax(similarity, dim=1) * targets).sum(dim=1).mean()


@torch.no_grad()
def sample_hard_negatives(
    sim_t2i: Tensor, sim_i2t: Tensor, positives: Tensor, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """One negative image per text and one negative text per image, drawn with probability
    softmax(similarity) after positives are set to -10000 (so they are never drawn).

    sim_* and positives are [B, B*world] over the gathered batch; returns gathered indices [B], [B].
    """
    weights_t2i = F.softmax(sim_t2i.detach().float().masked_fill(positives, NEGATIVE_FILL), dim=1)
    weights_i2t = F.softmax(sim_i2t.detach().float().masked_fill(positives, NEGATIVE_FILL), dim=1)
    negative_images = torch.multinomial(weights_t2i, 1, generator=generator).squeeze(1)  # (B,)
    negative_texts = torch.multinomial(weights_i2t, 1, generator=generator).squeeze(1)  # (B,)
    return negative_images, negative_texts


def caption_loss(logits: Tensor, labels: Tensor, label_smoothing: float = LABEL_SMOOTHING) -> Tensor:
    """Next-token cross-entropy: logits [B, T, V] predict labels shifted by one (-100 ignored)."""
    shifted = logits[:, :-1].contiguous()  # (B, T-1, V)
    targets = labels[:, 1:].contiguous()  # (B, T-1)
    return F.cross_entropy(
        shifted.view(-1, shifted.shape[-1]), targets.view(-1), label_smoothing=label_smoothing
    )


__all__: list[Any] = [
    "caption_loss",
    "gather_no_grad",
    "gather_with_grad",
    "pair_image_key_values",
    "representation_losses",
    "sample_hard_negatives",
    "soft_itc_loss",
    "stage1_losses",
    "world_info",
]
