"""``from_pretrained`` and ``save_pretrained``: one entry point that routes every checkpoint kind.

Reads a ``blip2kit`` directory (or an HF/LAVIS save with ``blip2kit.json``), a training run
directory (its newest complete checkpoint), an HF ``Blip2*`` directory or hub id, a LAVIS ``.pth``,
or a registered model name; writes the three formats through their modules.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from blip2kit.core.build import build_model
from blip2kit.core.checkpoints.hf import model_from_hf_config, read_hf_config, save_hf
from blip2kit.core.checkpoints.lavis import LAVIS_FILE, composition_of_lavis_state, save_lavis
from blip2kit.core.checkpoints.loading import load_state
from blip2kit.core.checkpoints.native import (
    DESCRIPTION_FILE,
    load_blip2kit,
    read_description,
    rebuild,
    restore_dtypes,
    save_blip2kit,
)
from blip2kit.core.checkpoints.reading import CheckpointError, detect_format, local_path, read_state

from blip2kit.registry import get_registry

if TYPE_CHECKING:
    from blip2kit.core.model import Blip2

def from_pretrained(
    path_or_hub_id: str | Path,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    precision: str | None = None,
    strict: bool = True,
    check_finite: bool = True,
    **overrides: Mapping[str, Any],
) -> Blip2:
    """A BLIP-2 model with released weights: an HF directory or hub id, a LAVIS ``.pth``, or a
    registered model name (``blip2-opt-2.7b`` ...; fetched from its hub id).

    ``overrides`` (vision=..., bridge=..., language=...) are per-slot config overrides, e.g.
    ``language={"pretrained": "facebook/opt-2.7b"}`` for the LLM a LAVIS checkpoint leaves out.
    ``precision`` applies a precision policy after loading ("fp32", "bf16", "fp16", "half"; see
    ``blip2kit.core.precision``); ``dtype`` is the older setting that casts the frozen towers only.
    ``strict``: every tensor the model needs is in the file and every tensor in the file is used
    (a LAVIS file may leave whole frozen towers out; ``model.load_report`` says where they came
    from). ``check_finite``: refuse NaN/Inf weights, naming them.
    """
    model = _from_pretrained(path_or_hub_id, device=device, strict=strict, check_finite=check_finite,
                             **overrides)
    if precision is not None or dtype is not None:
        model.set_precision(precision, dtype=dtype)
    return model


def _from_pretrained(
    path_or_hub_id: str | Path,
    *,
    device: torch.device | str | None,
    strict: bool,
    check_finite: bool = True,
    card_overrides: Mapping[str, Mapping[str, Any]] | None = None,
    **overrides: Mapping[str, Any],
) -> Blip2:
    text = str(path_or_hub_id)
    registry = get_registry()
    if text in registry.names("model") and not Path(text).exists():
        card = registry.get("model", text)
        if card.weights is None:
            raise CheckpointError(f"model {card.name!r} names no weights; pass a checkpoint path")
        # config.json of the weights fixes the architecture; the card adds the settings the weights
        # were finetuned with (the COCO captioning prompt "a photo of").
        model = _from_pretrained(card.weights, device=device, strict=strict, check_finite=check_finite,
                                 card_overrides=card.overrides)
        model.name = card.name
        return model

    local = local_path(text)
    if local.is_dir() and not (local / DESCRIPTION_FILE).is_file() and (local / "checkpoints").is_dir():
        local = latest_checkpoint(local)  # a training run directory: its newest complete checkpoint
        text = str(local)
    if local.is_dir() and (local / DESCRIPTION_FILE).is_file():
        if overrides:
            raise ValueError(f"{text!r} records its composition in {DESCRIPTION_FILE}; overrides do not apply")
        return _from_described_directory(local, device=device, strict=strict, check_finite=check_finite)
    if local.is_dir():
        if overrides:
            raise ValueError("overrides apply to LAVIS checkpoints and model names; an HF config.json "
                             "fixes the composition")
        config = read_hf_config(local)
        model = model_from_hf_config(config, local, device=device, extra_overrides=card_overrides,
                                     where=str(local / "config.json"))
        model.load_report = load_state(model, read_state(local), "hf", strict=strict,
                                        check_finite=check_finite, where=text)
        return model

    if local.is_file() and (local.parent / DESCRIPTION_FILE).is_file() and not overrides:
        described = read_description(local.parent)
        if described["format"] == "lavis" and local.name == LAVIS_FILE:
            return _from_described_directory(local.parent, device=device, strict=strict,
                                             check_finite=check_finite)
    state = read_state(local)
    fmt = detect_format(state)
    if fmt != "lavis":
        raise CheckpointError(f"{text!r} holds HF keys without a config.json; give the directory")
    model = build_model(composition_of_lavis_state(state), device=device, **overrides)
    model.load_report = load_state(model, state, "lavis", strict=strict, check_finite=check_finite,
                                    where=text)
    return model


def _from_described_directory(directory: Path, *, device: torch.device | str | None, strict: bool,
                              check_finite: bool = True) -> Blip2:
    """A directory with ``blip2kit.json``: the blip2kit format, or an HF/LAVIS save made by blip2kit
    (the composition and settings come from blip2kit.json, the weights from the external files)."""
    description = read_description(directory)
    fmt = description["format"]
    if fmt == "blip2kit":
        return load_blip2kit(directory, device=device, strict=strict, check_finite=check_finite)
    if fmt not in ("hf", "lavis"):
        raise CheckpointError(f"{str(directory / DESCRIPTION_FILE)!r} names format {fmt!r}; "
                              "blip2kit reads 'blip2kit', 'hf' and 'lavis'")
    model = rebuild(description, device=device, where=str(directory / DESCRIPTION_FILE))
    source = directory if fmt == "hf" else directory / LAVIS_FILE
    model.load_report = load_state(model, read_state(source), fmt, strict=strict, check_finite=check_finite,
                                   where=str(directory))
    restore_dtypes(model, description)
    if description.get("tokenizer_saved") and model.language is not None:
        model.language.load_tokenizer(directory)
    return model


def latest_checkpoint(run_dir: str | Path) -> Path:
    """The ``model/`` directory of the newest complete checkpoint of a training run.

    A run writes ``checkpoints/step-XXXXXXXX/`` atomically (a half-written one is a hidden temporary
    directory), and its ``model/`` holds ``blip2kit.json``; the highest step wins.
    """
    root = Path(run_dir) / "checkpoints"
    found: list[tuple[int, Path]] = []
    for step_dir in root.glob("step-*"):
        step = step_dir.name.removeprefix("step-")
        if step.isdigit() and (step_dir / "model" / DESCRIPTION_FILE).is_file():
            found.append((int(step), step_dir / "model"))
    if not found:
        raise CheckpointError(
            f"run directory {str(run_dir)!r} has no complete checkpoint (looked for "
            f"checkpoints/step-*/model/{DESCRIPTION_FILE}); train longer or point at a checkpoint"
        )
    return max(found)[1]


def save_pretrained(model: Blip2, directory: str | Path, format: str = "hf", *,
                    trainable_only: bool = False) -> Path:
    """Write ``model`` as a checkpoint directory, atomically, with ``blip2kit.json`` beside it.

    format "blip2kit": model.safetensors under the model's own keys (``trainable_only`` keeps only
    the parts that train). format "hf": config.json + model.safetensors that transformers'
    ``Blip2ForConditionalGeneration`` (stage 2) or ``Blip2ForImageTextRetrieval`` (stage 1) loads.
    format "lavis": ``checkpoint.pth`` with ``{"model": trainable keys}``, as the LAVIS runner saves
    it. The directory appears complete or not at all; a previous save there survives any failure.
    """
    directory = Path(directory)
    if format == "blip2kit":
        return save_blip2kit(model, directory, trainable_only=trainable_only)
    if format == "lavis":
        return save_lavis(model, directory)
    if format == "hf":
        if trainable_only:
            raise ValueError("an HF checkpoint holds the whole model; use format='blip2kit' or "
                             "'lavis' to save only the trainable parts")
        return save_hf(model, directory)
    raise ValueError(f"unknown checkpoint format {format!r}; use 'blip2kit', 'hf' or 'lavis'")


__all__ = ["from_pretrained", "latest_checkpoint", "save_pretrained"]
