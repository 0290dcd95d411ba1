"""The LAVIS format: a runner's ``checkpoint.pth`` (``{"model": trainable keys}``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from blip2kit.core.checkpoints.atomic import atomic_directory
from blip2kit.core.checkpoints.native import describe, trainable_parts, write_description
from blip2kit.core.checkpoints.reading import CheckpointError
from blip2kit.registry import get_registry

if TYPE_CHECKING:
    from blip2kit.core.model import Blip2

LAVIS_FILE = "checkpoint.pth"

def lavis_state(model: Blip2) -> tuple[dict[str, Tensor], list[str]]:
    """What a LAVIS runner saves: the parts that train (bridge, projection, any unfrozen tower),
    under LAVIS key names; and the names of those parts."""
    kept: dict[str, Tensor] = {}
    saved_parts = trainable_parts(model)
    for name in ("vision", "bridge", "language"):
        if name in saved_parts:
            kept.update(getattr(model, name).export_external_state("lavis"))
    if "projection" in saved_parts:
        prefix = model.language.lavis_projection_prefix
        kept.update({prefix + k: v for k, v in model.projection.state_dict().items()})
    return kept, saved_parts


def composition_of_lavis_state(state: Mapping[str, Tensor]) -> str:
    """The composed name a LAVIS state dict was trained as, read from its tensor shapes.

    The vision card is the first registered one as wide as ``ln_vision``; the bridge is the one that
    reads BLIP-2 Q-Former checkpoints; the language card is the first whose LAVIS projection prefix
    the file holds and whose width is the projection's output width.
    """
    if "ln_vision.weight" not in state:
        raise CheckpointError("a LAVIS BLIP-2 checkpoint has ln_vision.weight; this one does not")
    registry = get_registry()
    vision_width = state["ln_vision.weight"].shape[0]
    vision = [card.name for card in registry.cards("vision") if card.width == vision_width]
    if not vision:
        raise CheckpointError(f"ln_vision width {vision_width} matches no registered vision encoder "
                              "(see `blip2kit list`)")
    bridge = [card.name for card in registry.cards("bridge") if "blip_2_qformer" in card.formats.hf_model_types]
    if not bridge:
        raise CheckpointError("no registered bridge reads BLIP-2 Q-Former checkpoints")
    names = [vision[0], bridge[0]]
    prefixes = {card.formats.lavis_projection_prefix for card in registry.cards("language")} - {None}
    held = sorted(prefix for prefix in prefixes if f"{prefix}weight" in state)
    if held:
        width = state[f"{held[0]}weight"].shape[0]
        language = [card.name for card in registry.cards("language")
                    if card.formats.lavis_projection_prefix == held[0] and card.width == width]
        if not language:
            raise CheckpointError(f"the {held[0]!r} projection of this LAVIS checkpoint is {width} wide, "
                                  "which matches no registered language model")
        names.append(language[0])
    return "+".join(names)


def save_lavis(model: Blip2, directory: Path) -> Path:
    """``checkpoint.pth`` with the trainable keys (+ tokenizer files, blip2kit.json), atomically."""
    kept, saved_parts = lavis_state(model)
    with atomic_directory(directory) as staging:
        torch.save({"model": kept}, staging / LAVIS_FILE)
        tokenizer_saved = model.language is not None and model.language.save_tokenizer(staging)
        write_description(staging, describe(model, format="lavis", saved_parts=saved_parts,
                                            files=[LAVIS_FILE], tokenizer_saved=tokenizer_saved))
    return directory


__all__ = ["LAVIS_FILE", "composition_of_lavis_state", "lavis_state", "save_lavis"]
