"""``from_pretrained`` and ``save_pretrained``: one entry point that routes every checkpoint kind.

Reads a ``blip2kit`` directory (or an HF/LAVIS save with ``blip2kit.json``), a training run
directory (its newest complete checkpoint), an HF ``Blip2*`` directory or hub id, a LAVIS ``.pth``,
or a registered model name; writes the three formats through their modules.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from blip2kit.core.build import build_from_composition
from blip2kit.core.checkpoints.hf import model_from_hf_config, read_hf_config, save_hf
from blip2kit.core.checkpoints.lavis import LAVIS_FILE, composition_of_lavis_state, save_lavis
from blip2kit.core.checkpoints.loading import PARTS, convert_state, load_state, meta_tensors
from blip2kit.core.checkpoints.native import (
    DESCRIPTION_FILE,
    load_blip2kit_state,
    open_blip2kit_state,
    read_description,
    rebuild,
    restore_dtypes,
    save_blip2kit,
)
from blip2kit.core.checkpoints.reading import (
    CheckpointError,
    LazyState,
    detect_format,
    local_path,
    open_state,
    preview_keys,
)
from blip2kit.core.device_map import DeviceMap, device_for, dispatch, main_device, resolve_device_map
from blip2kit.core.precision import resolve_precision
from blip2kit.core.validation import check_device

from blip2kit.registry import get_registry

if TYPE_CHECKING:
    from blip2kit.core.model import Blip2

def from_pretrained(
    path_or_hub_id: str | Path,
    *,
    device: torch.device | str | None = None,
    device_map: DeviceMap | None = None,
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
    ``precision`` is the precision policy ("fp32", "bf16", "fp16", "half"; see
    ``blip2kit.core.precision``); ``dtype`` is the older setting that casts the frozen towers only.
    ``device_map`` ("auto", "cpu", "cuda:1", or {"vision": 0, "language": "cpu", ...}) spreads
    the model over devices for inference, through accelerate (``blip2kit.core.device_map``);
    give it or ``device``, not both.
    ``strict``: every tensor the model needs is in the file and every tensor in the file is used
    (a LAVIS file may leave whole frozen towers out; ``model.load_report`` says where they came
    from). ``check_finite``: refuse NaN/Inf weights, naming them.

    The model is built with empty (meta) parameters and each tensor is read from the file straight
    into its final dtype and device, so loading takes about the memory of the loaded model; parts
    the file does not hold (a LAVIS file's frozen towers) are built as their settings say.
    """
    if device is not None and device_map is not None:
        raise ValueError("give device (one device for the whole model) or device_map, not both")
    check_device(device)
    target = main_device(device_map, device)
    resolve_precision(precision, dtype=dtype, device=target)  # a bad policy fails before any work
    loader = _Loader(device=device, device_map=device_map, precision=precision, dtype=dtype,
                     target=target, strict=strict, check_finite=check_finite)
    model = loader.load(path_or_hub_id, **overrides)
    if device_map is not None:
        model = dispatch(model, loader.placement)
    return model


@dataclass
class _Loader:
    """One ``from_pretrained`` call: builds with empty parts, then loads every tensor into place."""

    device: torch.device | str | None
    device_map: DeviceMap | None
    precision: str | None
    dtype: torch.dtype | str | None
    target: torch.device
    strict: bool
    check_finite: bool
    placement: dict[str, str] = field(default_factory=dict)  # the resolved device map

    def load(self, path_or_hub_id: str | Path, card_overrides: Mapping[str, Mapping[str, Any]] | None = None,
             **overrides: Mapping[str, Any]) -> Blip2:
        text = str(path_or_hub_id)
        registry = get_registry()
        if text in registry.names("model") and not Path(text).exists():
            card = registry.get("model", text)
            if card.weights is None:
                raise CheckpointError(f"model {card.name!r} names no weights; pass a checkpoint path")
            # config.json of the weights fixes the architecture; the card adds the settings the
            # weights were finetuned with (the COCO captioning prompt "a photo of").
            model = self.load(card.weights, card_overrides=card.overrides)
            model.name = card.name
            return model

        local = local_path(text)
        if local.is_dir() and not (local / DESCRIPTION_FILE).is_file() and (local / "checkpoints").is_dir():
            local = latest_checkpoint(local)  # a training run directory: its newest complete checkpoint
            text = str(local)
        if local.is_dir() and (local / DESCRIPTION_FILE).is_file():
            if overrides:
                raise ValueError(f"{text!r} records its composition in {DESCRIPTION_FILE}; overrides do not apply")
            return self._described(local)
        if local.is_dir():
            if overrides:
                raise ValueError("overrides apply to LAVIS checkpoints and model names; an HF config.json "
                                 "fixes the composition")
            config = read_hf_config(local)
            return self._build_and_load(
                lambda empty: model_from_hf_config(config, local, device=self.device, empty=empty,
                                                   extra_overrides=card_overrides,
                                                   where=str(local / "config.json")),
                lambda: open_state(local), "hf", where=text)

        if local.is_file() and (local.parent / DESCRIPTION_FILE).is_file() and not overrides:
            described = read_description(local.parent)
            if described["format"] == "lavis" and local.name == LAVIS_FILE:
                return self._described(local.parent)
        state = open_state(local)
        if detect_format(state) != "lavis":
            raise CheckpointError(f"{text!r} holds HF keys without a config.json; give the directory")
        composition = get_registry().resolve(composition_of_lavis_state(state))
        return self._build_and_load(
            lambda empty: build_from_composition(composition, device=self.device, overrides=overrides,
                                                 empty=empty),
            state, "lavis", where=text)

    def _described(self, directory: Path) -> Blip2:
        """A directory with ``blip2kit.json``: the blip2kit format, or an HF/LAVIS save made by
        blip2kit (the composition and settings come from blip2kit.json, the weights from the
        external files)."""
        description = read_description(directory)
        fmt = description["format"]
        if fmt not in ("blip2kit", "hf", "lavis"):
            raise CheckpointError(f"{str(directory / DESCRIPTION_FILE)!r} names format {fmt!r}; "
                                  "blip2kit reads 'blip2kit', 'hf' and 'lavis'")
        if fmt == "blip2kit":
            state = lambda: open_blip2kit_state(directory, description)  # noqa: E731
        else:
            state = lambda: open_state(directory if fmt == "hf" else directory / LAVIS_FILE)  # noqa: E731
        model = self._build_and_load(
            lambda empty: rebuild(description, device=self.device, empty=empty,
                                  where=str(directory / DESCRIPTION_FILE)),
            state, fmt, where=str(directory), description=description)
        if description.get("tokenizer_saved") and model.language is not None:
            model.language.load_tokenizer(directory)
        return model

    def _build_and_load(self, compose: Callable[[frozenset[str]], Blip2],
                        state: Mapping[str, Tensor] | Callable[[], Mapping[str, Tensor]],
                        fmt: str, *, where: str, description: Mapping[str, Any] | None = None) -> Blip2:
        """Build with every part empty, in its final dtypes; load the file into it.

        ``state`` (or a callable that opens it, so that a bad config is reported before the
        weights file is looked at) is routed on its meta tensors before anything is read.

        A part the file does not fill completely (a LAVIS file's frozen towers, a stage-1 head HF
        files have no name for) is built as usual instead: from its ``pretrained`` setting, or
        randomly initialised by its own code, exactly as without empty parts. A component whose
        checkpoint conversion needs values (it cannot route meta tensors) makes the whole file be
        read first, as stored.
        """
        empty = set(PARTS)
        while True:
            model = compose(frozenset(empty))
            if description is not None:
                restore_dtypes(model, description)  # towers saved in half come back in it
            if self.precision is not None or self.dtype is not None:
                model.set_precision(self.precision, dtype=self.dtype, device=self.target)
            if callable(state):
                state = state()
            try:
                filled = _filled_keys(model, state, fmt, description)
            except CheckpointError:
                raise
            except Exception as error:
                if not isinstance(state, LazyState):
                    raise
                warnings.warn(f"the checkpoint conversion of a component cannot run before the tensors "
                              f"are read ({type(error).__name__}: {error}); reading {where} whole first",
                              stacklevel=4)
                state = state.read_all()
                continue
            own = model.state_dict(keep_vars=True)
            short = {part for part in empty
                     if any(key.startswith(part + ".") and tensor.is_meta and key not in filled
                            for key, tensor in own.items())}
            if not short:
                break
            empty -= short
        device_of = self._placement(model)
        if fmt == "blip2kit":
            model.load_report = load_blip2kit_state(model, state, description, where=where, strict=self.strict,
                                                    check_finite=self.check_finite, device_of=device_of)
        else:
            model.load_report = load_state(model, state, fmt, strict=self.strict, where=where,
                                           check_finite=self.check_finite, device_of=device_of)
        unfilled = meta_tensors(model)
        if unfilled:
            raise CheckpointError(f"{where} left {preview_keys(unfilled)} without values (a component "
                                  "built with empty parameters that the file does not fill); pass "
                                  "strict=True to see what is missing")
        return model

    def _placement(self, model: Blip2) -> Callable[[str], torch.device]:
        """Where each loaded tensor goes: the device map's device for it, or ``device``."""
        if self.device_map is None:
            device = torch.device(self.device) if self.device is not None else torch.device("cpu")
            return lambda key: device
        self.placement = resolve_device_map(model, self.device_map)
        placement = self.placement
        return lambda key: torch.device(device_for(placement, key) or "cpu")


def _filled_keys(model: Blip2, state: Mapping[str, Tensor], fmt: str,
                 description: Mapping[str, Any] | None) -> set[str]:
    """The model's own keys that ``state`` fills (routing only; nothing is read)."""
    if fmt == "blip2kit":
        saved = set(description["saved_parts"]) if description is not None else set(PARTS)
        return {key for key in state if key.split(".", 1)[0] in saved}
    return set(convert_state(model, state, fmt).state)


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
