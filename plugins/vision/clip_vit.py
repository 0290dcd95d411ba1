"""OpenAI CLIP ViT-L/14 image encoder (BLIP-2's ``vit_l``), built through open_clip.

open_clip builds the CLIP model (and loads its weights, e.g. the "openai" tag); blip2kit keeps the
vision tower only and cuts it the way LAVIS ``create_clip_vit_L`` does: the last residual block,
``ln_post`` and ``proj`` are removed, so the features are the penultimate block's output
(23 of 24 blocks for ViT-L/14, 1024 wide, 257 tokens at 224 px). The OpenAI weights were trained
with QuickGELU, so the model is built with it.

Weights: an open_clip tag or local open_clip checkpoint (config ``pretrained``), LAVIS
``visual_encoder.*`` keys (open_clip's own visual names: LAVIS's CLIP ViT mirrors OpenAI's), or a
full open_clip state dict (``visual.*`` keys, source "open_clip").
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from blip2kit.plugins.vision.common import CLIP_MEAN, CLIP_STD, ViTEncoder, resample_pos_embed

# The text tower open_clip builds alongside the vision tower is thrown away; for custom (tiny)
# vision configs it is kept this small so building stays cheap.
_THROWAWAY_TEXT_CFG = {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}
_BLOCK_KEY = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)$")
_UNUSED_TOP_LEVEL = ("ln_post.", "proj", "attn_pool")
_STEM_KEYS = ("conv1.weight", "class_embedding", "positional_embedding")


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")


@contextmanager
def _quiet_random_init() -> Iterator[None]:
    """open_clip warns on every random build; blip2kit builds random towers on purpose (meta sizes,
    tests), so that one message is dropped while create_model runs."""
    quiet = _DropRandomInitWarning()
    root = logging.getLogger()
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)


class ClipVisionEncoder(ViTEncoder):
    """open_clip VisionTransformer without its last block: pixels -> [B, (S/p)^2 + 1, width]."""

    _pos_embed_key = "vit.positional_embedding"
    # LAVIS clip_vit resamples CLIP position embeddings with align_corners=True.
    _pos_embed_align_corners = True

    def __init__(
        self,
        *,
        open_clip_model: str,
        image_size: int,
        vision_cfg: Mapping[str, Any] | None = None,
        pretrained: str | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        import open_clip

        overrides: dict[str, Any] = {}
        if vision_cfg:
            overrides = {
                "vision_cfg": dict(vision_cfg),
                "text_cfg": dict(_THROWAWAY_TEXT_CFG),
                "embed_dim": 32,
            }
        # Pretrained weights load at the resolution they were trained at; the grid is resampled
        # to image_size below. Random weights are built at image_size directly.
        force_image_size = None if pretrained else image_size
        with torch.device(device) if device is not None else nullcontext(), _quiet_random_init():
            clip = open_clip.create_model(
                open_clip_model,
                pretrained=pretrained,
                device=device if device is not None else "cpu",
                force_quick_gelu=True,
                force_image_size=force_image_size,
                **overrides,
            )
        tower = clip.visual
        del clip  # the text tower is not needed
        if len(tower.transformer.resblocks) < 2:
            raise ValueError(f"{open_clip_model!r} has fewer than 2 blocks; BLIP-2 drops the last one")
        # Features of the penultimate block: drop the last block, the final norm and projection so
        # they cost neither memory nor compute.
        tower.transformer.resblocks = tower.transformer.resblocks[:-1]
        tower.ln_post = nn.Identity()
        tower.proj = None
        tower.attn_pool = None
        self.vit = tower

        self.width = int(tower.conv1.out_channels)
        self.depth = len(tower.transformer.resblocks)
        self.num_heads = int(tower.transformer.resblocks[0].attn.num_heads)
        self.patch_size = int(tower.conv1.kernel_size[0])
        self.image_size = image_size
        self.mean, self.std = CLIP_MEAN, CLIP_STD
        if image_size % self.patch_size:
            raise ValueError(
                f"CLIP image_size {image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if tower.positional_embedding.shape[0] != self.num_tokens:
            with torch.no_grad():
                resized = resample_pos_embed(
                    tower.positional_embedding.data, self.num_tokens, align_corners=True
                )  # [num_tokens, width]
            tower.positional_embedding = nn.Parameter(resized)

    def forward(self, pixels: Tensor) -> Tensor:
        if pixels.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"CLIP encoder built for {self.image_size}px images got {tuple(pixels.shape)}; use "
                "its transform() or build it with image_size matching the images"
            )
        vit = self.vit
        x = vit.conv1(pixels.to(vit.conv1.weight.dtype))  # [B, W, g, g]
        x = x.flatten(2).transpose(1, 2)  # [B, g*g, W]
        cls = vit.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # [B, 1, W]
        x = torch.cat([cls, x], dim=1) + vit.positional_embedding.to(x.dtype)  # [B, N, W]
        x = vit.ln_pre(x)
        return vit.transformer(x)  # [B, N, W] (open_clip's Transformer is batch-first)

    # -- checkpoints ----------------------------------------------------------------------------

    def _external_prefix(self, source: str) -> str:
        return {"lavis": "visual_encoder.", "open_clip": "visual."}.get(source, "")

    def _from_external(
        self, state: Mapping[str, Tensor], source: str
    ) -> tuple[dict[str, Tensor], set[str]]:
        if source == "hf":
            raise NotImplementedError(
                "HF Blip2 checkpoints hold only EVA-layout vision towers (no ln_pre, no QuickGELU); "
                "a CLIP ViT-L tower has no HF Blip2 form. Use 'lavis' or 'open_clip' weights"
            )
        if source not in ("lavis", "open_clip"):
            raise ValueError(f"CLIP encoder reads 'lavis' or 'open_clip' checkpoints, not {source!r}")

        def pick(name: str, value: Tensor) -> dict[str, Tensor] | None:
            block = _BLOCK_KEY.match(name)
            if block and int(block.group(1)) >= self.depth:
                return {}  # the last CLIP block: BLIP-2 stops one block earlier
            if name.startswith(_UNUSED_TOP_LEVEL):
                return {}
            if block or name in _STEM_KEYS or name.startswith("ln_pre."):
                return {f"vit.{name}": value}
            return None

        return self._pick_keys(state, self._external_prefix(source), pick, source)

    def export_external_state(self, target: str) -> dict[str, Tensor]:
        prefix = self._external_prefix(target)
        if target == "hf" or not prefix:
            raise NotImplementedError(
                f"a CLIP ViT-L tower cannot be written as {target!r}: HF Blip2 has only the EVA "
                "vision layout. Use 'lavis' or 'open_clip'"
            )
        return {f"{prefix}{key[len('vit.'):]}": value for key, value in self.state_dict().items()}

    def hf_config(self) -> dict[str, Any]:
        raise NotImplementedError(
            "Blip2VisionConfig describes EVA towers only; the CLIP ViT-L tower (ln_pre, QuickGELU, "
            "q/k/v biases) has no HF Blip2 config"
        )


def build_clip_vit(config: Mapping[str, Any], device: torch.device | str | None = None) -> ClipVisionEncoder:
    """Factory of the ``vit_l`` / ``vit_l_tiny`` cards.

    ``pretrained``: an open_clip tag ("openai"), an open_clip/OpenAI checkpoint file (loaded by
    open_clip), or a LAVIS-layout file (``visual_encoder.*`` keys, or LAVIS ``clip_vit_L.pth``
    with the same names unprefixed), which blip2kit loads itself.
    """
    pretrained = config.get("pretrained")
    lavis_state = _lavis_state_or_none(pretrained) if pretrained else None
    encoder = ClipVisionEncoder(
        open_clip_model=str(config["open_clip_model"]),
        image_size=int(config["image_size"]),
        vision_cfg=config.get("vision_cfg"),
        pretrained=None if lavis_state is not None else pretrained,
        device=device,
    )
    if lavis_state is not None:
        encoder.load_external_state(lavis_state, "lavis")
    if config.get("grad_checkpointing"):
        encoder.set_grad_checkpointing(True)
    return encoder


def _lavis_state_or_none(pretrained: str) -> dict[str, Tensor] | None:
    """The weights of a LAVIS-layout file under ``visual_encoder.*`` names; None for anything
    open_clip should load (tags, open_clip checkpoints, OpenAI TorchScript archives)."""
    from pathlib import Path

    from blip2kit.plugins.vision.common import load_state_file

    if not Path(pretrained).is_file():
        return None
    try:
        state = load_state_file(pretrained)
    except Exception:  # e.g. an OpenAI TorchScript archive: open_clip knows how to read it
        return None
    if any(key.startswith("visual_encoder.") for key in state):
        return state
    if "conv1.weight" in state:  # LAVIS clip_vit_L.pth: the tower's own names, no prefix
        return {f"visual_encoder.{key}": value for key, value in state.items()}
    return None
