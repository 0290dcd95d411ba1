"""Typed configs of the built-in vision encoders (the cards' ``config_class``). No torch here.

``build_component`` validates a card's merged config against these before anything is built, so a
head count that does not divide the width or an image size that does not fit the patch is
reported with the field and the allowed values.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import Field, model_validator

from blip2kit.core.configs import ComponentConfig, divisors

_PRETRAINED = "local file, URL or 'timm:<name>' of the weights; None keeps the random init"


def _check_image_fits_patch(image_size: int, patch_size: int, field: str = "image_size") -> None:
    if image_size % patch_size:
        below, above = image_size // patch_size * patch_size, (image_size // patch_size + 1) * patch_size
        nearest = f"{below} or {above}" if below else str(above)
        raise ValueError(
            f"{field} {image_size} is not a multiple of patch_size {patch_size}; the patches must "
            f"tile the image: use a multiple of {patch_size}, e.g. {nearest}"
        )


class EvaViTConfig(ComponentConfig):
    """EVA ViT (``vit_g``, ``vit_tiny``): the tower LAVIS builds for BLIP-2."""

    image_size: int = Field(224, gt=0, description="square input side in pixels, a multiple of patch_size")
    patch_size: int = Field(14, gt=0, description="patch side in pixels, a positive integer")
    width: int = Field(1408, gt=0, description="feature width, a positive multiple of num_heads")
    depth: int = Field(39, gt=0, description="number of transformer blocks, a positive integer")
    num_heads: int = Field(16, gt=0, description="attention heads, a positive divisor of width")
    mlp_dim: int = Field(6144, gt=0, description="hidden width of each MLP, a positive integer")
    layer_norm_eps: float = Field(1e-6, gt=0, description="LayerNorm epsilon, a number > 0")
    hidden_act: str = Field("gelu", description="the MLP activation, an HF ACT2FN name the EVA tower implements")
    pretrained: str | None = Field(None, description=_PRETRAINED)
    grad_checkpointing: bool = Field(False, description="True or False")

    @model_validator(mode="after")
    def _shapes_fit(self) -> EvaViTConfig:
        if self.width % self.num_heads:
            raise ValueError(
                f"num_heads {self.num_heads} does not divide width {self.width}; use one of "
                f"{divisors(self.width)}"
            )
        _check_image_fits_patch(self.image_size, self.patch_size)
        return self


# open_clip's model names end in the patch size: "ViT-L-14", "ViT-L-14-quickgelu", "ViT-B-16".
_PATCH_IN_NAME = re.compile(r"^ViT-[A-Za-z]+-(\d+)(?:-|$)")


class ClipViTConfig(ComponentConfig):
    """CLIP ViT through open_clip (``vit_l``, ``vit_l_tiny``)."""

    open_clip_model: str = Field(
        "ViT-L-14-quickgelu", min_length=1, description="an open_clip model name, e.g. 'ViT-L-14-quickgelu'"
    )
    image_size: int = Field(224, gt=0, description="square input side in pixels, a multiple of the patch size")
    pretrained: str | None = Field(
        None, description="open_clip tag ('openai'), open_clip/OpenAI file or LAVIS file; None: random"
    )
    vision_cfg: dict[str, Any] | None = Field(
        None, description="an open_clip vision_cfg dict that replaces the architecture (tiny variants)"
    )
    grad_checkpointing: bool = Field(False, description="True or False")

    @model_validator(mode="after")
    def _shapes_fit(self) -> ClipViTConfig:
        cfg = self.vision_cfg or {}
        for key in ("image_size", "layers", "width", "head_width", "patch_size"):
            value = cfg.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"vision_cfg.{key} must be a positive integer, got {value!r}")
        if cfg.get("width") and cfg.get("head_width") and cfg["width"] % cfg["head_width"]:
            raise ValueError(
                f"vision_cfg.head_width {cfg['head_width']} does not divide vision_cfg.width "
                f"{cfg['width']}; use one of {divisors(cfg['width'])}"
            )
        patch_size = cfg.get("patch_size")
        if patch_size is None:
            match = _PATCH_IN_NAME.match(self.open_clip_model)
            patch_size = int(match.group(1)) if match else None
        if patch_size:
            _check_image_fits_patch(self.image_size, patch_size)
        return self


__all__ = ["ClipViTConfig", "EvaViTConfig"]
