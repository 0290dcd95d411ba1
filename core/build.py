"""Compose a model by name: ``build_model("vit_g+qformer+flant5_xxl")``.

Each part's card names a factory, called as ``factory(config, device=device)``. Building on
``device="meta"`` makes full-size models without allocating their weights.
"""

from __future__ import annotations

from collections.abc import Mapping
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from blip2kit.core.configs import validate_component_config
from blip2kit.core.checkpoints.loading import load_weights
from blip2kit.core.interfaces import Bridge, LanguageModel, VisionEncoder
from blip2kit.core.model import Blip2
from blip2kit.core.errors import ComponentConfigError, DeviceError
from blip2kit.core.validation import check_device
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
    """Build one component from its card (config = the card's defaults updated by ``config``).

    The merged config is checked against the card's config class, and ``device`` against this
    machine, before the factory is imported or called.
    """
    merged = validate_component_config(card, _merge_config(card, config))
    check_device(device)
    factory = card.load_factory()
    expected = {"vision": VisionEncoder, "bridge": Bridge, "language": LanguageModel}[card.kind]
    with torch.device(device) if device is not None else nullcontext():
        component = factory(merged, device=device)
    if not isinstance(component, expected):
        raise TypeError(
            f"factory {card.factory_path!r} of {KIND_LABELS[card.kind]} {card.name!r} returned "
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
    # Settings that would fail after minutes of building fail first.
    check_device(device)
    dtype = as_dtype(dtype) if dtype is not None else None
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
        load_weights(model, weights)
    return model


def _build_slot(card: ComponentCard, config: Mapping[str, Any], *, device: torch.device | str | None,
                empty: bool) -> Any:
    """One component; with ``empty``, its parameters on the meta device (no memory, no values) and
    its buffers real, for a checkpoint to fill. A factory that cannot build that way (it computes
    with its weights, or loads them itself) is built as usual, with a warning."""
    if not empty or (config or {}).get("pretrained"):
        # A component that loads its own `pretrained` weights is built as usual: they are its values.
        return build_component(card, config, device=device)
    try:
        with empty_parameters():
            return build_component(card, config, device=device)
    except (ConfigOverrideError, ComponentConfigError, DeviceError):
        raise  # the settings are wrong either way: say so once
    except Exception as error:
        warnings.warn(
            f"{KIND_LABELS[card.kind]} {card.name!r} cannot be built with empty (meta) parameters "
            f"({type(error).__name__}: {error}); it is built with random weights first, which costs "
            "its full size in memory before the checkpoint is loaded", stacklevel=3,
        )
        return build_component(card, config, device=device)


def build_from_composition(
    composition: Composition,
    *,
    device: torch.device | str | None = None,
    overrides: Mapping[str, Mapping[str, Any] | None] | None = None,
    freeze_vision: bool = True,
    freeze_language: bool = True,
    frozen_llm_dropout: str = "as_released",
    empty: frozenset[str] = frozenset(),
) -> Blip2:
    """The composed model, random weights; ``empty`` names the parts ("vision", "bridge",
    "projection", "language") whose parameters stay on the meta device for a checkpoint to fill
    (``blip2kit.core.checkpoints.materialise``)."""
    overrides = overrides or {}
    vision_config = _merge_config(
        composition.vision, composition.overrides.get("vision"), overrides.get("vision")
    )
    vision_module = _build_slot(composition.vision, vision_config, device=device, empty="vision" in empty)

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
    bridge_module = _build_slot(composition.bridge, bridge_config, device=device, empty="bridge" in empty)
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
        language_module = _build_slot(composition.language, language_config, device=device,
                                      empty="language" in empty)
        bridge_module.drop_text_branch()
    elif overrides.get("language"):
        raise ConfigOverrideError(
            f"{composition.name!r} has no language model (it is a stage-1 'vision+bridge' model), "
            "so language overrides do not apply"
        )

    with torch.device(device) if device is not None else nullcontext(), _empty_if("projection" in empty):
        return Blip2(
            vision_module,
            bridge_module,
            language_module,
            name=composition.name,
            freeze_vision=freeze_vision,
            freeze_language=freeze_language,
            frozen_llm_dropout=frozen_llm_dropout,
        )


@contextmanager
def empty_parameters() -> Iterator[None]:
    """Every parameter registered inside is moved to the meta device (no memory, no values);
    buffers stay real, so position ids and other computed buffers keep their values.

    A parameter already on meta is registered as it is: a module that ties a weight to another
    (OPT's LM head to its embeddings) then shares the same meta parameter, and the tie survives
    loading (accelerate's ``init_empty_weights`` wraps it anew, which unties it).
    """
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, parameter: nn.Parameter | None) -> None:
        register(module, name, parameter)
        if parameter is not None and not parameter.is_meta:
            on_meta = nn.Parameter(parameter.to("meta"), requires_grad=parameter.requires_grad)
            on_meta.__class__ = type(parameter)  # a Parameter subclass stays one, with its attributes
            on_meta.__dict__.update(parameter.__dict__)
            module._parameters[name] = on_meta

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def _empty_if(empty: bool) -> Any:
    """Parameters created inside go to the meta device when ``empty`` (buffers stay real)."""
    return empty_parameters() if empty else nullcontext()


def cast_frozen_towers(model: Blip2, dtype: torch.dtype) -> None:
    """Older spelling of ``model.set_precision(dtype=dtype)``: frozen towers cast, bridge fp32."""
    model.set_precision(dtype=dtype)

