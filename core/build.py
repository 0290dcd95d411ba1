"""Compose a model by name: ``build_model("vit_g+qformer+flant5_xxl")``.

Each part's card names a factory, called as ``factory(config, device=device)``. Building on
``device="meta"`` makes full-size models without allocating their weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from blip2kit.core.interfaces import Bridge, LanguageModel, VisionEncoder
from blip2kit.core.model import Blip2
from blip2kit.core.precision import as_dtype
from blip2kit.registry import ComponentCard, Composition, get_registry
from blip2kit.registry.cards import KIND_LABELS


class WidthMismatchError(ValueError):
    """Two components whose widths do not fit together."""


class ConfigOverrideError(ValueError):
    """An override that names a slot or key the component does not have."""


def _merge_config(card: ComponentCard, *override_layers: Mapping[str, Any] | None) -> dict[str, Any]:
    config = dict(card.config)
    for layer in override_layers:
        if not layer:
            continue
        unknown = set(layer) - set(config)
        if unknown:
            raise ConfigOverrideError(
                f"{KIND_LABELS[card.kind]} {card.name!r} has no config key(s) {sorted(unknown)}; "
                f"its keys are {sorted(config)}"
            )
        config.update(layer)
    return config


def build_component(
    card: ComponentCard,
    config: Mapping[str, Any] | None = None,
    *,
    device: torch.device | str | None = None,
) -> Any:
    """Build one component from its card (config = the card's defaults updated by ``config``)."""
    factory = card.load_factory()
    merged = _merge_config(card, config)
    expected = {"vision": VisionEncoder, "bridge": Bridge, "language": LanguageModel}[card.kind]
    with torch.device(device) if device is not None else nullcontext():
        component = factory(merged, device=device)
    if not isinstance(component, expected):
        raise TypeError(
            f"factory {card.factory!r} of {KIND_LABELS[card.kind]} {card.name!r} returned "
            f"{type(component).__name__}, which is not a blip2kit {expected.__name__}"
        )
    # What blip2kit.json records, so a saved model is rebuilt from the same card and settings.
    component.card_name = card.name
    component.build_config = merged
    return component


def build_model(
    name: str,
    weights: str | Path | None = None,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    *,
    vision: Mapping[str, Any] | None = None,
    bridge: Mapping[str, Any] | None = None,
    language: Mapping[str, Any] | None = None,
    freeze_vision: bool = True,
    freeze_language: bool = True,
    precision: str | None = None,
    frozen_llm_dropout: str = "as_released",
) -> Blip2:
    """Build the model ``name`` ('vision+bridge', 'vision+bridge+language' or a named model).

    :param weights: a checkpoint to load (a local path or hub id); random init when None.
    :param dtype: older setting: dtype of the frozen towers (vision and language), with the
        bridge and projection computing in fp32. Prefer ``precision``.
    :param device: where to build; "meta" builds full sizes without memory.
    :param vision, bridge, language: config overrides per slot, e.g. vision={"image_size": 364}.
    :param precision: the precision policy (``blip2kit.core.precision``): "fp32" (default when
        neither this nor dtype is given), "bf16", "fp16" or "half": frozen towers in half
        precision, bridge and projection with fp32 weights computed under autocast.
    :param frozen_llm_dropout: "as_released" (LAVIS: the frozen LLM's dropout acts in training
        mode) or "off" (the frozen LLM stays in eval mode); its weights are frozen either way.
    """
    composition = get_registry().resolve(name)
    model = build_from_composition(
        composition,
        device=device,
        overrides={"vision": vision, "bridge": bridge, "language": language},
        freeze_vision=freeze_vision,
        freeze_language=freeze_language,
        frozen_llm_dropout=frozen_llm_dropout,
    )
    if precision is not None or dtype is not None:
        model.set_precision(precision, dtype=dtype)
    if weights is not None:
        from blip2kit.core.checkpoints import load_weights

        load_weights(model, weights)
    return model


def build_from_composition(
    composition: Composition,
    *,
    device: torch.device | str | None = None,
    overrides: Mapping[str, Mapping[str, Any] | None] | None = None,
    freeze_vision: bool = True,
    freeze_language: bool = True,
    frozen_llm_dropout: str = "as_released",
) -> Blip2:
    overrides = overrides or {}
    vision_config = _merge_config(
        composition.vision, composition.overrides.get("vision"), overrides.get("vision")
    )
    vision_module = build_component(composition.vision, vision_config, device=device)

    # A bridge that declares encoder_width is sized to the encoder it is composed with, unless the
    # user fixed it; the check below then catches a fixed width that does not fit.
    bridge_defaults: dict[str, Any] = {}
    if "encoder_width" in composition.bridge.config:
        bridge_defaults["encoder_width"] = vision_module.width
    bridge_config = _merge_config(
        composition.bridge,
        bridge_defaults,
        composition.overrides.get("bridge"),
        overrides.get("bridge"),
    )
    bridge_module = build_component(composition.bridge, bridge_config, device=device)
    if bridge_module.input_width != vision_module.width:
        raise WidthMismatchError(
            f"in {composition.name!r}: vision encoder {composition.vision.name!r} outputs width "
            f"{vision_module.width} but bridge {composition.bridge.name!r} expects input width "
            f"{bridge_module.input_width}. Drop the bridge's encoder_width override (it follows the "
            "encoder by default) or pick an encoder of that width."
        )

    language_module = None
    if composition.language is not None:
        language_config = _merge_config(
            composition.language, composition.overrides.get("language"), overrides.get("language")
        )
        language_module = build_component(composition.language, language_config, device=device)
        bridge_module.drop_text_branch()
    elif overrides.get("language"):
        raise ConfigOverrideError(
            f"{composition.name!r} has no language model (it is a stage-1 'vision+bridge' model), "
            "so language overrides do not apply"
        )

    with torch.device(device) if device is not None else nullcontext():
        return Blip2(
            vision_module,
            bridge_module,
            language_module,
            name=composition.name,
            freeze_vision=freeze_vision,
            freeze_language=freeze_language,
            frozen_llm_dropout=frozen_llm_dropout,
        )


def cast_frozen_towers(model: Blip2, dtype: torch.dtype) -> None:
    """Older spelling of ``model.set_precision(dtype=dtype)``: frozen towers cast, bridge fp32."""
    model.set_precision(dtype=dtype)

