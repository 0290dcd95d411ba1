"""Factories of ``shapes_vit`` and ``shapes_opt``: the built-in EVA and OPT classes with the world's
weights. ``pretrained: "packaged"`` resolves to the files under ``assets/``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from blip2kit.plugins.language.opt import OPTLanguageModel, build_opt
from blip2kit.plugins.shapes import PACKAGED
from blip2kit.plugins.vision.common import build_transform
from blip2kit.plugins.vision.eva_vit import EvaVisionEncoder, build_eva_vit

ASSETS = Path(__file__).resolve().parent / "assets"
VIT_WEIGHTS = "shapes_vit.safetensors"  # file under the recipe's output (and assets/)
OPT_DIRECTORY = "shapes_opt"  # config.json, model.safetensors and the tokenizer files


def _resolve(value: Any, packaged: Path) -> Any:
    if value != PACKAGED:
        return value
    if not packaged.exists():
        raise FileNotFoundError(
            f"the packaged shapes tower {packaged} is missing; remake it with "
            f"`blip2kit demo towers --out {ASSETS}` or pass pretrained=<path>"
        )
    return str(packaged)


class ShapesVisionEncoder(EvaVisionEncoder):
    """EVA tower whose training transform never flips or crops: in this world left and right are
    answers, and a crop can cut a shape out of the picture."""

    def transform(self, train: bool = False) -> Any:
        return build_transform(self.image_size, False, self.mean, self.std)


def build_shapes_vit(config: Mapping[str, Any], device: torch.device | str | None = None) -> ShapesVisionEncoder:
    """Factory of ``shapes_vit``: an EVA tower with the packaged (or given) CLIP-pretrained weights."""
    config = dict(config)
    on_meta = device is not None and torch.device(device).type == "meta"
    # On meta (parameter counts, planning) there is nothing to load weights into.
    config["pretrained"] = None if on_meta else _resolve(config.get("pretrained"), ASSETS / VIT_WEIGHTS)
    return build_eva_vit(config, device=device, encoder_class=ShapesVisionEncoder)


def build_shapes_opt(config: Mapping[str, Any], device: torch.device | str | None = None) -> OPTLanguageModel:
    """Factory of ``shapes_opt``: OPT with the packaged (or given) text-only weights and tokenizer."""
    config = dict(config)
    if device is None or torch.device(device).type != "meta":
        config["pretrained"] = _resolve(config.get("pretrained"), ASSETS / OPT_DIRECTORY)
        config["tokenizer"] = _resolve(config.get("tokenizer"), ASSETS / OPT_DIRECTORY)
    return build_opt(config, device=device)
