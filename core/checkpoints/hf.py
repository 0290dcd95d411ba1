"""The Hugging Face ``Blip2*`` directory format: composing a model from config.json, and saving one
that transformers' ``Blip2ForConditionalGeneration`` / ``Blip2ForImageTextRetrieval`` loads."""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from blip2kit.core.build import build_from_composition
from blip2kit.core.checkpoints.atomic import atomic_directory
from blip2kit.core.checkpoints.loading import export_state
from blip2kit.core.checkpoints.native import describe, parts_of, unique_tensors, write_description
from blip2kit.core.checkpoints.reading import CheckpointError

from blip2kit.registry import ComponentCard, get_registry

if TYPE_CHECKING:
    from blip2kit.core.model import Blip2

_HF_ARCHITECTURES = ("Blip2ForConditionalGeneration", "Blip2ForImageTextRetrieval")


# Each slot's sub-config in a Blip2Config, and the model_type transformers assumes when it has none.
_SUB_CONFIGS = {
    "vision": ("vision_config", "blip_2_vision_model"),
    "bridge": ("qformer_config", "blip_2_qformer"),
    "language": ("text_config", "opt"),
}


def reader_card(kind: str, model_type: str) -> ComponentCard:
    """The first registered card of ``kind`` that declares it reads HF sub-configs of ``model_type``."""
    cards = [card for card in get_registry().cards(kind) if isinstance(card, ComponentCard)]
    for card in cards:
        if model_type in card.formats.hf_model_types and card.formats.hf_config_reader:
            return card
    readable = sorted({t for card in cards for t in card.formats.hf_model_types})
    key = _SUB_CONFIGS[kind][0]
    raise CheckpointError(
        f"config.json's {key} has model_type {model_type!r}, and no registered {kind} component "
        f"reads it (readable: {readable}). Install a plugin whose card declares "
        f"formats=CheckpointFormats(hf_model_types=({model_type!r},), hf_config_reader=...)"
    )


def read_sub_config(kind: str, config: Mapping[str, Any], where: str) -> tuple[str, dict[str, Any]]:
    """(card name, settings) for one slot of an HF Blip2Config, from the component that reads it."""
    key, default_type = _SUB_CONFIGS[kind]
    sub_config = config.get(key) or {}
    if not isinstance(sub_config, Mapping):
        raise CheckpointError(f"{where}: {key} must be a JSON object, not {type(sub_config).__name__}")
    card = reader_card(kind, sub_config.get("model_type", default_type))
    try:
        name, overrides = card.formats.load_reader()(sub_config, config)
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"{where}: {error}") from None
    chosen = get_registry().get(kind, name)
    if not isinstance(chosen, ComponentCard):
        raise CheckpointError(f"the {key} reader of {card.name!r} chose {name!r}, which is not a {kind} card")
    return name, dict(overrides)


def read_hf_config(directory: Path) -> dict[str, Any]:
    """config.json of an HF checkpoint directory; an empty, invalid or missing one is named."""
    path = directory / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{str(directory)!r} has no config.json (nor blip2kit.json); is it a "
                                "Hugging Face Blip2 checkpoint or a blip2kit save?")
    text = path.read_text()
    if not text.strip():
        raise CheckpointError(f"{str(path)!r} is empty; the checkpoint was not saved or downloaded "
                              "completely: save or download it again")
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{str(path)!r} is not valid JSON ({error.msg} at line {error.lineno}, "
                              f"column {error.colno}); fix or re-download it") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{str(path)!r} holds a JSON {type(config).__name__}, not a Blip2Config object")
    return config


def model_from_hf_config(config: Mapping[str, Any], directory: Path | None = None, *,
                         device: torch.device | str | None = None, where: str = "config.json",
                         extra_overrides: Mapping[str, Mapping[str, Any]] | None = None,
                         empty: frozenset[str] = frozenset()) -> Blip2:
    """Compose the Blip2 that a transformers ``Blip2Config`` describes (random weights).

    Each sub-config goes to the registered component that declares its ``model_type``; that
    component's reader fills transformers' defaults for omitted fields and refuses settings it
    cannot honour. A tokenizer in ``directory`` is the language model's. ``extra_overrides`` (a
    model card's) add settings that config.json cannot hold, such as the LLM prompt. ``empty``:
    the parts left on the meta device for the checkpoint to fill (``build_from_composition``).
    """
    architectures = config.get("architectures") or ["Blip2ForConditionalGeneration"]
    if architectures[0] not in _HF_ARCHITECTURES:
        raise CheckpointError(
            f"{where} names architecture {architectures[0]!r}; blip2kit reads {_HF_ARCHITECTURES}"
        )
    slots = ["vision", "bridge"]
    if architectures[0] != "Blip2ForImageTextRetrieval":
        slots.append("language")
    names, overrides = [], {}
    for slot in slots:
        name, overrides[slot] = read_sub_config(slot, config, where)
        overrides[slot].update((extra_overrides or {}).get(slot) or {})
        names.append(name)
    composition = get_registry().resolve("+".join(names))
    model = build_from_composition(composition, device=device, overrides=overrides, empty=empty)
    language = model.language
    if directory is not None and language is not None and any(
            (directory / name).is_file() for name in language.tokenizer_files):
        language.load_tokenizer(directory)
    model.hf_image_token_index = config.get("image_token_index")
    return model


def hf_config_of(model: Blip2) -> dict[str, Any]:
    """The transformers ``Blip2Config`` of ``model`` as a dict (config.json contents)."""
    from transformers import Blip2Config

    bridge = model.bridge.hf_config()
    fields: dict[str, Any] = {"vision_config": model.vision.hf_config(), **bridge}
    if model.language is not None:
        fields["text_config"] = model.language.hf_config()
        fields["image_token_index"] = image_token_index(model)
    config = Blip2Config(**fields)
    config.architectures = [_HF_ARCHITECTURES[0] if model.language is not None else _HF_ARCHITECTURES[1]]
    return config.to_dict()


def image_token_index(model: Blip2) -> int:
    """Where HF's processor puts the query tokens: the imported id, else the last embedding row.

    transformers scatters the projected queries into positions holding this id; the last row is
    padding in the released vocabularies (OPT 50272 rows for 50265 tokens, T5 32128 for 32100).
    """
    imported = getattr(model, "hf_image_token_index", None)
    if imported is not None:
        return int(imported)
    return int(model.language.vocab_size - 1)


def save_hf(model: Blip2, directory: Path) -> Path:
    """config.json + model.safetensors (+ tokenizer files, blip2kit.json), atomically."""
    if any(p.is_meta for p in model.parameters()):
        raise ValueError("a meta-device model has no weights to save; build it on a real device")
    eps = getattr(getattr(model.bridge, "config", None), "ln_vision_eps", None)
    vision_eps = model.vision.hf_config().get("layer_norm_eps")
    if eps is not None and vision_eps is not None and abs(eps - vision_eps) > 1e-12:
        warnings.warn(
            f"ln_vision eps {eps} differs from the vision tower's {vision_eps}; HF applies the tower's "
            "eps to vision_model.post_layernorm, so outputs differ slightly", stacklevel=2)
    from safetensors.torch import save_file

    tensors, _ = unique_tensors(export_state(model, "hf"))
    config = hf_config_of(model)  # before anything is written: a failure here leaves no trace
    with atomic_directory(directory) as staging:
        save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        tokenizer_saved = model.language is not None and model.language.save_tokenizer(staging)
        write_description(staging, describe(
            model, format="hf", saved_parts=list(parts_of(model)),
            files=["config.json", "model.safetensors"], tokenizer_saved=tokenizer_saved))
    return directory


__all__ = ["hf_config_of", "image_token_index", "model_from_hf_config", "read_hf_config",
           "read_sub_config", "reader_card", "save_hf"]
