"""What the built-in ViT encoders share: CLIP preprocessing, position-embedding resampling,
checkpoint files, and loading that names every missing, unexpected or mis-shaped key.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blip2kit.core.checkpoints import CheckpointError, preview_keys, read_state, shape_mismatches
from blip2kit.core.interfaces import ConvertedState, VisionEncoder

# OpenAI CLIP statistics; EVA-CLIP and BLIP-2 (LAVIS and HF) normalise with the same numbers.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class VisionWeightsError(CheckpointError):
    """External weights that do not fit a vision encoder (missing, unexpected or mis-shaped keys)."""


# -- preprocessing -------------------------------------------------------------------------------


class _ToRGB:
    """PIL image -> RGB (grey or RGBA inputs would otherwise break Normalize). Picklable for workers."""

    def __call__(self, image: Any) -> Any:
        return image.convert("RGB") if hasattr(image, "convert") else image

    def __repr__(self) -> str:
        return "ToRGB()"


def build_transform(
    image_size: int,
    train: bool,
    mean: tuple[float, float, float] = CLIP_MEAN,
    std: tuple[float, float, float] = CLIP_STD,
) -> Any:
    """LAVIS ``blip_image_eval`` (train=False) or ``blip2_image_train`` (train=True): PIL -> tensor.

    Eval resizes straight to (S, S) without a crop, as LAVIS and HF's BlipImageProcessor do.
    """
    from torchvision import transforms
    from torchvision.transforms import InterpolationMode

    if train:
        geometry = [
            transforms.RandomResizedCrop(
                image_size, scale=(0.5, 1.0), interpolation=InterpolationMode.BICUBIC
            ),
            transforms.RandomHorizontalFlip(),
        ]
    else:
        geometry = [
            transforms.Resize((image_size, image_size), interpolation=InterpolationMode.BICUBIC)
        ]
    return transforms.Compose(
        [_ToRGB(), *geometry, transforms.ToTensor(), transforms.Normalize(mean, std)]
    )


# -- position embeddings -------------------------------------------------------------------------


def resample_pos_embed(
    pos_embed: Tensor, num_tokens: int, *, num_prefix_tokens: int = 1, align_corners: bool = False
) -> Tensor:
    """Bicubically resize a square grid of absolute position embeddings, prefix tokens kept.

    pos_embed [1, P + G*G, D] or [P + G*G, D] -> same rank with P + g*g = num_tokens rows.
    """
    squeeze = pos_embed.dim() == 2
    table = pos_embed.unsqueeze(0) if squeeze else pos_embed  # [1, P + G*G, D]
    if table.shape[1] == num_tokens:
        return pos_embed
    prefix, grid = table[:, :num_prefix_tokens], table[:, num_prefix_tokens:]
    old_side, new_side = math.isqrt(grid.shape[1]), math.isqrt(num_tokens - num_prefix_tokens)
    if old_side * old_side != grid.shape[1] or new_side * new_side != num_tokens - num_prefix_tokens:
        raise VisionWeightsError(
            f"cannot resample position embeddings of {table.shape[1]} tokens to {num_tokens}: "
            f"after {num_prefix_tokens} prefix token(s) both must be square grids"
        )
    dim = grid.shape[-1]
    grid = grid.reshape(1, old_side, old_side, dim).permute(0, 3, 1, 2)  # [1, D, G, G]
    # Interpolate in fp32: bicubic is not implemented for half on every backend.
    grid = F.interpolate(
        grid.float(), size=(new_side, new_side), mode="bicubic", align_corners=align_corners
    ).to(table.dtype)  # [1, D, g, g]
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_side * new_side, dim)  # [1, g*g, D]
    resized = torch.cat([prefix, grid], dim=1)  # [1, P + g*g, D]
    return resized[0] if squeeze else resized


# -- checkpoint files ----------------------------------------------------------------------------


def load_state_file(path: str | Path) -> dict[str, Tensor]:
    """A state dict from a .safetensors or .pth/.pt/.bin file (weights only; containers unwrapped)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"vision weights file {str(path)!r} does not exist")
    return read_state(path)


def state_problems(expected: Mapping[str, Tensor], state: Mapping[str, Tensor]) -> list[str]:
    """Missing, unexpected and mis-shaped keys of ``state`` against ``expected``, each by name."""
    missing = set(expected) - set(state)
    unexpected = set(state) - set(expected)
    mismatched = shape_mismatches(expected, state)
    problems = []
    if missing:
        problems.append(f"missing keys: {preview_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {preview_keys(unexpected)}")
    if mismatched:
        problems.append("shape mismatches: " + "; ".join(mismatched[:8]))
    return problems


def check_and_load(module: nn.Module, state: Mapping[str, Tensor], *, where: str) -> None:
    """Load ``state`` into ``module`` strictly; the error names every missing, unexpected and
    mis-shaped key (with both shapes), and says where the weights came from."""
    own = module.state_dict()
    problems = state_problems(own, state)
    if problems:
        raise VisionWeightsError(
            f"weights from {where} do not fit {type(module).__name__}: " + " | ".join(problems)
            + ". Check that the checkpoint matches the encoder's config (width, depth, patch size)."
        )
    # A meta-device module has no storage to copy into: take the checkpoint's tensors instead.
    module.load_state_dict(state, assign=any(t.is_meta for t in own.values()))


class ViTEncoder(VisionEncoder):
    """Shared behaviour of the built-in ViT encoders; subclasses set up ``self.vit`` and the key maps.

    Subclasses implement ``_from_external(state, source) -> (own_state, consumed)`` returning their
    own keys (before the position-embedding grid is fitted) and ``_pos_embed_key``.
    """

    _pos_embed_key: str = ""  # own state key of the absolute position embedding
    _pos_embed_align_corners: bool = False
    grad_checkpointing: bool = False

    def transform(self, train: bool = False) -> Any:
        return build_transform(self.image_size, train, self.mean, self.std)

    def _fit_pos_embed(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """Weights trained at another resolution (224 -> 364): resample their grid to this one."""
        if self._pos_embed_key in state:
            state[self._pos_embed_key] = resample_pos_embed(
                state[self._pos_embed_key],
                self.num_tokens,
                align_corners=self._pos_embed_align_corners,
            )
        return state

    def _from_external(
        self, state: Mapping[str, Tensor], source: str
    ) -> tuple[dict[str, Tensor], set[str]]:
        raise NotImplementedError

    def _pick_keys(
        self,
        state: Mapping[str, Tensor],
        prefix: str,
        pick: Callable[[str, Tensor], dict[str, Tensor] | None],
        source: str,
    ) -> tuple[dict[str, Tensor], set[str]]:
        """The keys of ``state`` under ``prefix``, each mapped by ``pick(name, value)`` to own keys.

        ``pick`` returns a dict of own keys (empty for a part BLIP-2 does not use, such as the last
        block), or None for a key this encoder does not know, which is an error naming it.
        Returns (own state, consumed external keys).
        """
        own: dict[str, Tensor] = {}
        consumed: set[str] = set()
        unknown: list[str] = []
        for key, value in state.items():
            if not key.startswith(prefix):
                continue
            picked = pick(key[len(prefix):], value)
            if picked is None:
                unknown.append(key)
                continue
            own.update(picked)
            consumed.add(key)
        if unknown:
            raise VisionWeightsError(
                f"{source} vision keys that {type(self).__name__} does not know: {preview_keys(unknown)}; "
                "they suggest a different architecture (layer scale, relative position bias, rope)"
            )
        return own, consumed

    def convert_external_state(self, state: Mapping[str, Tensor], source: str) -> ConvertedState:
        """This encoder's keys of a whole LAVIS or HF checkpoint, renamed and grid-fitted.

        Returns an empty state when the checkpoint holds no vision weights at all (released LAVIS
        checkpoints drop the frozen ViT); a partial set raises, naming what is missing.
        """
        own, consumed = self._from_external(state, source)
        if not own:
            return ConvertedState({}, consumed)
        own = self._fit_pos_embed(own)
        problems = state_problems(self.state_dict(), own)
        if problems:
            raise VisionWeightsError(
                f"the vision weights of the {source!r} checkpoint do not fit "
                f"{type(self).__name__} ({self.extra_repr()}): " + " | ".join(problems)
                + " (keys as renamed to this encoder's own names)"
            )
        return ConvertedState(own, consumed)

    def load_external_state(self, state: Mapping[str, Tensor], source: str) -> set[str]:
        """Convert and load; raises when the checkpoint has no vision weights. Returns consumed keys."""
        converted = self.convert_external_state(state, source)
        if not converted.state:
            raise VisionWeightsError(
                f"the {source!r} checkpoint holds no weights for {type(self).__name__} "
                f"(looked for {self._external_prefix(source)!r} keys); released LAVIS BLIP-2 "
                "checkpoints leave the frozen ViT out, load it from its own file"
            )
        check_and_load(self, converted.state, where=f"a {source!r} checkpoint")
        return converted.consumed

    def _external_prefix(self, source: str) -> str:
        return {"lavis": "visual_encoder.", "hf": "vision_model."}.get(source, "")

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in backward; only matters when the tower is unfrozen."""
        self.grad_checkpointing = enable
        self.vit.set_grad_checkpointing(enable)

    def extra_repr(self) -> str:
        return (
            f"width={self.width}, depth={self.depth}, image_size={self.image_size}, "
            f"patch_size={self.patch_size}, num_tokens={self.num_tokens}"
        )
