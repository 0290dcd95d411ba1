"""Image and text features of a stage-1 model, what LAVIS users reach for with ``extract_features``.

``Blip2.embed_images`` / ``embed_texts`` / ``match`` delegate here. Everything goes through the
``RepresentationBridge`` interface, so any bridge that trains with ITC/ITM works:

- image features: the query outputs projected into the ITC space and normalised [B, Q, D];
- text features: the [CLS] output projected and normalised [B, D];
- ITC similarity: max over queries of image-query-feature . text-feature (not divided by temp);
- ITM: the 2-way head over [queries ; text], averaged over queries; the probability of "match".

All of it runs without gradients and with the model in eval mode (dropout off), whatever mode
it is in; the mode is restored afterwards. Pixels move to the vision encoder's device; features
come back in fp32 on the model's device.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from blip2kit.core import validation
from blip2kit.core.interfaces import RepresentationBridge

if TYPE_CHECKING:
    from blip2kit.core.model import Blip2


@dataclass
class ImageEmbeddings:
    """What ``embed_images`` returns."""

    features: Tensor  # [B, Q, D] normalised ITC features, one per query
    query_output: Tensor  # [B, Q, H] the bridge's raw query output
    image_embeds: Tensor  # [B, N, W] the bridge's prepared encoder features (ITM reads these)


@dataclass
class TextEmbeddings:
    """What ``embed_texts`` returns."""

    features: Tensor  # [B, D] normalised ITC feature of each text
    token_output: Tensor  # [B, T, H] the bridge's text-only output, per token
    input_ids: Tensor  # [B, T] the tokens (ITM reads these)
    attention_mask: Tensor  # [B, T]


@dataclass
class MatchScores:
    """What ``match`` returns, one value per (image, text) pair."""

    itm_probability: Tensor  # [B] softmax of the ITM head, class "match"
    itm_logit: Tensor  # [B] the class-1 ITM logit (what retrieval re-ranks by)
    itc_similarity: Tensor  # [B] max over queries of the cosine similarity


def representation_bridge(model: Blip2) -> RepresentationBridge:
    """The model's bridge, if it can embed and match; otherwise an error that says what to use."""
    name = model.name or "this model"
    if model.language is not None:
        raise RuntimeError(
            f"{name} is a stage-2 model (vision+bridge+language): its bridge dropped the text "
            "branch and the ITC/ITM heads that embeddings and matching need. Use the stage-1 "
            "composition of the same bridge, e.g. build_model('vit_g+qformer') or a retrieval "
            "checkpoint such as blip2-itm-vit-g"
        )
    bridge = model.bridge
    if not isinstance(bridge, RepresentationBridge):
        raise TypeError(
            f"{name}'s bridge {type(bridge).__name__} is not a RepresentationBridge, so it has no "
            "text encoder or ITC/ITM heads; embeddings and matching need one (e.g. 'qformer')"
        )
    return bridge


@contextmanager
def _inference(module: torch.nn.Module) -> Iterator[None]:
    """No gradients and eval mode for the call; the previous mode comes back afterwards."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        module.train(was_training)


def bridge_autocast(model: Blip2, reference: Tensor) -> AbstractContextManager:
    """The model's precision-policy autocast for its trainable parts, where the model has one.

    Under a half policy the encoder features arrive in half precision while the bridge keeps fp32
    weights, so the bridge must run under the same autocast as in ``Blip2.forward``.
    """
    autocast = getattr(model, "_autocast", None)
    return autocast(reference) if autocast is not None else nullcontext()


def _pixels_on_vision_device(model: Blip2, pixels: Tensor) -> Tensor:
    """pixels, checked as every ``Blip2`` method checks them, on the vision encoder's device."""
    # The values (raw 0-255, NaN) are read once, by encode_image; here only what is free to check.
    validation.check_pixels(pixels, model.vision, values=False)
    weight = next(model.vision.parameters(), None)
    return pixels if weight is None else pixels.to(weight.device)


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    texts = list(texts)
    bad = [i for i, text in enumerate(texts) if not isinstance(text, str)]
    if bad:
        raise ValueError(f"texts must be strings; texts[{bad[0]}] is {type(texts[bad[0]]).__name__}")
    if not texts:
        raise ValueError("texts is empty; give at least one text")
    return texts


def embed_images(model: Blip2, pixels: Tensor) -> ImageEmbeddings:
    """pixels [B, 3, S, S] -> normalised ITC features [B, Q, D] and the raw query output [B, Q, H]."""
    bridge = representation_bridge(model)
    pixels = _pixels_on_vision_device(model, pixels)
    with _inference(model):
        image_features = model.encode_image(pixels)  # (B, N, W)
        with bridge_autocast(model, image_features):
            image_embeds = bridge.prepare_image(image_features)  # (B, N, W)
            query_output = bridge.encode_image(image_embeds).query_output  # (B, Q, H)
            features = bridge.image_features(query_output)  # (B, Q, D)
    return ImageEmbeddings(features.float(), query_output.float(), image_embeds)


def embed_texts(model: Blip2, texts: Sequence[str] | str, *, max_length: int | None = None) -> TextEmbeddings:
    """Texts -> normalised ITC features [B, D] and the token-level output [B, T, H].

    ``max_length`` pads/truncates the tokens (default: the bridge's own text length).
    """
    bridge = representation_bridge(model)
    texts = _check_texts(texts)
    with _inference(model):
        tokens = bridge.tokenize(texts, max_length=max_length)
        with bridge_autocast(model, tokens["input_ids"]):
            token_output = bridge.encode_text(tokens["input_ids"], tokens["attention_mask"])  # (B, T, H)
            features = bridge.text_features(token_output)  # (B, D)
    return TextEmbeddings(features.float(), token_output.float(), tokens["input_ids"], tokens["attention_mask"])


def match(model: Blip2, pixels: Tensor, texts: Sequence[str] | str, *, max_length: int | None = None) -> MatchScores:
    """Scores of each pair (pixels[i], texts[i]): ITM probability and logit, ITC similarity [B]."""
    bridge = representation_bridge(model)
    pixels = _pixels_on_vision_device(model, pixels)
    texts = _check_texts(texts)
    if len(texts) != pixels.shape[0]:
        raise ValueError(f"got {len(texts)} texts for {pixels.shape[0]} images; match scores pairs, one text per image")
    images = embed_images(model, pixels)
    text = embed_texts(model, texts, max_length=max_length)
    with _inference(model), bridge_autocast(model, images.image_embeds):
        itm_logits = bridge.match_logits(images.image_embeds, None, text.input_ids, text.attention_mask)  # (B, 2)
    itm_logits = itm_logits.float()
    itc = torch.einsum("bqd,bd->bq", images.features, text.features).max(dim=-1).values  # (B,)
    return MatchScores(itm_probability=itm_logits.softmax(dim=-1)[:, 1], itm_logit=itm_logits[:, 1], itc_similarity=itc)


__all__ = [
    "ImageEmbeddings",
    "MatchScores",
    "TextEmbeddings",
    "bridge_autocast",
    "embed_images",
    "embed_texts",
    "match",
    "representation_bridge",
]
