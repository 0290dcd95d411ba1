"""blip2kit's own checkpoint format, and the ``blip2kit.json`` written beside every save.

A ``blip2kit`` directory holds ``blip2kit.json`` (the composition: each slot's card name and full
settings, which parts' weights the file holds, blip2kit's version) and ``model.safetensors`` under
the model's own ``state_dict`` keys. ``from_pretrained`` rebuilds exactly that model from it. HF
and LAVIS saves carry the same ``blip2kit.json``, so their reload restores settings the external
formats cannot hold (the LLM prompt, the text length, the cards of third-party components).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from blip2kit.core.build import build_from_composition
from blip2kit.core.checkpoints.atomic import atomic_directory
from blip2kit.core.checkpoints.loading import (
    LoadReport,
    assign_state,
    check_finite_values,
    check_state,
    parts_of,
    read_used,
    towers_from_settings,
)
from blip2kit.core.checkpoints.reading import CheckpointError, LazyState, open_state
from blip2kit.core.interfaces import ConvertedState
from blip2kit.registry import get_registry
from blip2kit.registry.errors import UnknownNameError

DESCRIPTION_FILE = "blip2kit.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1
SLOTS = ("vision", "bridge", "language")


def blip2kit_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("blip2kit")
    except PackageNotFoundError:
        return "unknown"


# -- describing a model ---------------------------------------------------------------------------


def _json_ready(value: Any, where: str) -> Any:
    """``value`` as JSON data (tuples become lists); anything else is refused, naming the setting."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_json_ready(item, f"{where}[{index}]") for index, item in enumerate(value)]
    if isinstance(value, Mapping):
        return {str(key): _json_ready(item, f"{where}.{key}") for key, item in value.items()}
    raise TypeError(
        f"setting {where} holds a {type(value).__name__}, which blip2kit.json cannot record; "
        "component settings must be JSON data (numbers, strings, lists, dicts)"
    )


def trainable_parts(model: nn.Module) -> list[str]:
    """Parts with at least one parameter that trains (bridge and projection, unless unfrozen towers)."""
    return [name for name, part in parts_of(model).items()
            if any(parameter.requires_grad for parameter in part.parameters())]


def describe(model: nn.Module, *, format: str, saved_parts: list[str], files: list[str],
             aliases: Mapping[str, str] | None = None, tokenizer_saved: bool = False) -> dict[str, Any]:
    """The contents of ``blip2kit.json`` for ``model`` saved in ``format``."""
    slots: dict[str, Any] = {}
    for slot in SLOTS:
        component = getattr(model, slot, None)
        if component is None:
            continue
        if not component.card_name:
            raise ValueError(
                f"the {slot} component ({type(component).__name__}) was not built from a registered "
                "card, so blip2kit.json cannot say how to rebuild it; build models with "
                "build_model / from_pretrained"
            )
        slots[slot] = {
            "card": component.card_name,
            "settings": _json_ready(component.settings(), f"{slot}.{component.card_name}"),
            "frozen": bool(getattr(component, "frozen", False)),
            "dtype": str(_floating_dtype(component)).removeprefix("torch."),
        }
    image_token = getattr(model, "hf_image_token_index", None)
    return {
        "blip2kit_format_version": FORMAT_VERSION,
        "blip2kit_version": blip2kit_version(),
        "format": format,
        "name": getattr(model, "name", "") or "",
        "composition": slots,
        "saved_parts": saved_parts,  # parts whose weights the files hold; others come from settings
        "files": files,
        "tied_aliases": dict(aliases or {}),  # state_dict key -> the key whose tensor it shares
        "tokenizer_saved": tokenizer_saved,
        "hf_image_token_index": image_token,
    }


def _floating_dtype(module: nn.Module) -> torch.dtype:
    for parameter in module.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return torch.float32


def write_description(directory: Path, description: Mapping[str, Any]) -> None:
    """Inside a staging directory (``atomic_directory``), so a plain write is atomic already."""
    (directory / DESCRIPTION_FILE).write_text(json.dumps(description, indent=2, sort_keys=True) + "\n")


# -- saving ---------------------------------------------------------------------------------------


def unique_tensors(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Each storage once (safetensors refuses shared tensors): (tensors to write, alias -> kept key).

    Tied weights (OPT's head and embeddings, T5's three tables) are the same tensor under several
    names; the first name keeps it and the others are recorded as aliases of it.
    """
    kept: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, tuple[int, ...], tuple[int, ...]], str] = {}
    for key, value in state.items():
        if value.is_meta:
            raise ValueError(f"tensor {key} is on the meta device (no values to save); build or "
                             "load the model on a real device first")
        identity = (value.data_ptr(), tuple(value.shape), tuple(value.stride()))
        if value.numel() and identity in seen:
            aliases[key] = seen[identity]
            continue
        seen[identity] = key
        kept[key] = value.detach().contiguous()
    return kept, aliases


def save_blip2kit(model: nn.Module, directory: str | Path, *, trainable_only: bool = False) -> Path:
    """Write ``model`` as a blip2kit checkpoint directory, atomically.

    ``trainable_only``: keep only the parts that train (the bridge and projection of a frozen-tower
    model); a reload builds the frozen towers from their ``pretrained`` settings.
    """
    from safetensors.torch import save_file

    saved_parts = trainable_parts(model) if trainable_only else list(parts_of(model))
    state = {key: value for key, value in model.state_dict().items()
             if key.split(".", 1)[0] in saved_parts}
    tensors, aliases = unique_tensors(state)
    directory = Path(directory)
    with atomic_directory(directory) as staging:
        save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        language = getattr(model, "language", None)
        tokenizer_saved = bool(language is not None and language.save_tokenizer(staging))
        write_description(staging, describe(
            model, format="blip2kit", saved_parts=saved_parts, files=[WEIGHTS_FILE],
            aliases=aliases, tokenizer_saved=tokenizer_saved))
    return directory


# -- loading --------------------------------------------------------------------------------------


def read_description(directory: Path) -> dict[str, Any]:
    """``blip2kit.json`` of ``directory``, checked for the fields a reload needs."""
    path = directory / DESCRIPTION_FILE
    text = path.read_text()
    try:
        description = json.loads(text)
    except json.JSONDecodeError as error:
        raise CheckpointError(
            f"{str(path)!r} is not valid JSON ({error.msg} at line {error.lineno}); it may be "
            "truncated: save the checkpoint again"
        ) from None
    if not isinstance(description, dict):
        raise CheckpointError(f"{str(path)!r} holds a {type(description).__name__}, not a JSON object")
    missing = [key for key in ("format", "composition", "saved_parts") if key not in description]
    if missing:
        raise CheckpointError(f"{str(path)!r} lacks the field(s) {missing}; it was not written by blip2kit")
    version = description.get("blip2kit_format_version", FORMAT_VERSION)
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{str(path)!r} has format version {version}, newer than this blip2kit reads "
            f"({FORMAT_VERSION}); upgrade blip2kit (it was saved by {description.get('blip2kit_version')})"
        )
    slots = description["composition"]
    if not isinstance(slots, dict) or not {"vision", "bridge"} <= set(slots):
        raise CheckpointError(f"{str(path)!r}: 'composition' must name at least the vision and bridge cards")
    return description


def rebuild(description: Mapping[str, Any], *, device: torch.device | str | None = None,
            where: str = "blip2kit.json", empty: frozenset[str] = frozenset()) -> nn.Module:
    """The model a description records: the same cards, settings and freezing, random weights.

    Parts whose weights the checkpoint holds are built without their ``pretrained`` source (their
    weights come from the file); the others load from it, as their settings say.
    """

    slots = description["composition"]
    names = [slots[slot]["card"] for slot in SLOTS if slot in slots]
    try:
        composition = get_registry().resolve("+".join(names))
    except UnknownNameError as error:
        raise CheckpointError(
            f"{where} was saved with the components {names}, and one is not registered here: {error}. "
            "Install the plugin package that provides it."
        ) from None
    overrides: dict[str, dict[str, Any]] = {}
    for slot in slots:
        settings = dict(slots[slot]["settings"])
        if slot in description["saved_parts"] and settings.get("pretrained") is not None:
            settings["pretrained"] = None  # the file holds these weights
        overrides[slot] = settings
    model = build_from_composition(
        composition, device=device, overrides=overrides,
        freeze_vision=slots["vision"].get("frozen", True),
        freeze_language=slots.get("language", {}).get("frozen", True),
        empty=empty,
    )
    model.name = description.get("name") or composition.name
    if description.get("hf_image_token_index") is not None:
        model.hf_image_token_index = int(description["hf_image_token_index"])
    return model


def restore_dtypes(model: nn.Module, description: Mapping[str, Any]) -> None:
    """Frozen towers saved in half precision come back in it (their own casting rules apply)."""
    for slot in ("vision", "language"):
        component = getattr(model, slot, None)
        recorded = description["composition"].get(slot, {}).get("dtype", "float32")
        if component is not None and component.frozen and recorded != "float32":
            component.cast_frozen(getattr(torch, recorded))


def open_blip2kit_state(directory: Path, description: Mapping[str, Any]) -> LazyState:
    """The weights file of a ``blip2kit`` directory, tied names (saved once) included."""
    state = open_state(directory / WEIGHTS_FILE)
    for alias, kept in description.get("tied_aliases", {}).items():
        if kept not in state:
            raise CheckpointError(f"{str(directory)!r}: tied tensor {alias} names {kept}, which the "
                                  "weights file does not hold")
        state.alias(alias, kept)
    return state


def load_blip2kit_state(
    model: nn.Module,
    state: Mapping[str, Tensor],
    description: Mapping[str, Any],
    *,
    where: str,
    strict: bool = True,
    check_finite: bool = True,
    device_of: Callable[[str], torch.device] | None = None,
) -> LoadReport:
    """Load a ``blip2kit`` weights file (own keys) into the model ``rebuild`` made from its description.

    A ``LazyState`` is checked on its meta tensors, then each tensor is read in the dtype of the
    model tensor it fills (see ``load_state``).
    """
    saved_parts = list(description["saved_parts"])
    own = model.state_dict(keep_vars=True)
    expected = {key: value for key, value in own.items() if key.split(".", 1)[0] in saved_parts}
    check_state(expected, state, where=where, model_name=model.name, strict=strict, check_finite=False)
    used = ConvertedState({key: state[key] for key in state if key in expected})
    used.consumed = set(used.state)
    values = read_used(state, used, own, device_of) if isinstance(state, LazyState) else dict(used.state)
    values = {key: values[key] for key in used.state}
    if check_finite:
        check_finite_values(values, where)
    assign_state(model, values, device_of=device_of)
    report = LoadReport(source=where, format="blip2kit")
    report.loaded = sorted(values)
    report.unexpected = sorted(set(state) - set(expected))
    report.missing = sorted(set(own) - set(values))
    report.notes = towers_from_settings(model, saved_parts)
    random_parts = [note for note in report.notes if "random" in note]
    if random_parts:
        warnings.warn(f"{where} holds only the trainable parts; " + "; ".join(random_parts), stacklevel=3)
    return report


def reload_settings(directory: Path) -> dict[str, Any] | None:
    """The ``blip2kit.json`` beside an HF or LAVIS save, or None when there is none."""
    if (directory / DESCRIPTION_FILE).is_file():
        return read_description(directory)
    return None


__all__ = [
    "DESCRIPTION_FILE",
    "WEIGHTS_FILE",
    "describe",
    "load_blip2kit_state",
    "open_blip2kit_state",
    "read_description",
    "rebuild",
    "save_blip2kit",
    "trainable_parts",
    "unique_tensors",
    "write_description",
]
