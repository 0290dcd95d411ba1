"""Routing an external checkpoint's keys to the model's parts, and the one strict check.

Each part picks its own keys (``convert_external_state``) and names them back for export
(``export_external_state``); the projection is routed here. ``check_state`` is the single place that
compares a state dict with the model's keys and shapes; every problem is a ``CheckpointError``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import Tensor, nn

from blip2kit.core.checkpoints.reading import (
    CheckpointError,
    LazyState,
    detect_format,
    local_path,
    non_finite_keys,
    preview_keys,
    read_state,
    shape_mismatches,
)
from blip2kit.core.interfaces import CheckpointFormat, ConvertedState

if TYPE_CHECKING:
    from blip2kit.core.model import Blip2

# Buffers transformers writes that blip2kit recomputes (position ids), ignored by name.
HF_IGNORED_KEYS = frozenset({"qformer.embeddings.position_ids", "embeddings.position_ids"})




PARTS = ("vision", "bridge", "projection", "language")  # top-level modules of Blip2


def parts_of(model: Any) -> dict[str, Any]:
    """The model's present top-level parts by name (a stage-1 model has no projection/language)."""
    return {name: getattr(model, name) for name in PARTS if getattr(model, name, None) is not None}


def towers_from_settings(model: Any, saved_parts: list[str]) -> list[str]:
    """For each part the file does not hold: where its weights came from, for the load report."""
    notes = []
    for name, part in parts_of(model).items():
        if name in saved_parts:
            continue
        source = (getattr(part, "build_config", None) or {}).get("pretrained")
        if source:
            notes.append(f"{name}: from its pretrained setting {source!r}")
        else:
            notes.append(f"{name}: random initialisation (no pretrained setting)")
    return notes


def projection_prefix(model: Blip2, fmt: CheckpointFormat) -> str:
    """Key prefix of the projection: HF's ``language_projection.``; in LAVIS, the LLM's own."""
    return "language_projection." if fmt == "hf" else model.language.lavis_projection_prefix


@dataclass
class LoadReport:
    """What a load did: the keys filled, those left as they were, and those nobody used."""

    source: str
    format: str
    loaded: list[str] = field(default_factory=list)  # own keys filled
    missing: list[str] = field(default_factory=list)  # own keys the checkpoint did not have
    unexpected: list[str] = field(default_factory=list)  # external keys no part claimed
    ignored: list[str] = field(default_factory=list)  # external keys skipped on purpose
    dropped: list[str] = field(default_factory=list)  # stage-1-only keys a stage-2 model has no place for
    notes: list[str] = field(default_factory=list)  # where parts the file does not hold came from

    def __str__(self) -> str:
        parts = [f"{len(self.loaded)} tensors loaded from {self.source} ({self.format})"]
        parts.extend(self.notes)
        for label, keys in (("missing", self.missing), ("unexpected", self.unexpected),
                            ("dropped", self.dropped), ("ignored", self.ignored)):
            if keys:
                parts.append(f"{label}: {preview_keys(keys)}")
        return "; ".join(parts)


def check_state(
    expected: Mapping[str, Tensor],
    state: Mapping[str, Tensor],
    *,
    where: str,
    model_name: str = "",
    strict: bool = True,
    check_finite: bool = True,
) -> None:
    """The one check of a state dict against the model's own keys; raises CheckpointError.

    Shapes must be equal (always); with ``strict`` every expected key is present and every present
    key is expected; with ``check_finite`` no loaded tensor holds NaN or Inf.
    """
    target = model_name or "the model"
    mismatched = shape_mismatches(expected, state)
    if mismatched:
        raise CheckpointError(
            f"{len(mismatched)} tensors of {where} do not fit {target}: " + "; ".join(mismatched[:8])
            + ". Check that the checkpoint matches the composition."
        )
    if strict:
        problems = []
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing:
            problems.append(f"missing keys: {preview_keys(missing)}")
        if unexpected:
            problems.append(f"unexpected keys: {preview_keys(unexpected)}")
        if problems:
            raise CheckpointError(f"{where} does not fit {target}: " + " | ".join(problems)
                                  + ". Pass strict=False to load what fits.")
    if check_finite:
        check_finite_values({key: value for key, value in state.items() if key in expected}, where)


def convert_state(model: Blip2, state: Mapping[str, Tensor], source: CheckpointFormat) -> ConvertedState:
    """A whole external checkpoint -> ``model.state_dict()`` keys (each part picks its own)."""
    converted = ConvertedState()
    parts = {"vision": model.vision, "bridge": model.bridge, "language": model.language}
    for prefix, part in parts.items():
        if part is None:
            continue
        share = part.convert_external_state(state, source)
        converted.state.update({f"{prefix}.{key}": value for key, value in share.state.items()})
        converted.consumed |= share.consumed
    if model.projection is not None:
        prefix = projection_prefix(model, source)
        for key, value in state.items():
            if key.startswith(prefix):
                converted.state["projection." + key[len(prefix):]] = value
                converted.consumed.add(key)
    return converted


def export_state(model: Blip2, target: CheckpointFormat) -> dict[str, Tensor]:
    """The whole model under ``target`` key names (each part exports its own)."""
    state: dict[str, Tensor] = {}
    for part in (model.vision, model.bridge, model.language):
        if part is not None:
            state.update(part.export_external_state(target))
    if model.projection is not None:
        prefix = projection_prefix(model, target)
        state.update({prefix + key: value for key, value in model.projection.state_dict().items()})
    return state


def load_state(
    model: Blip2,
    state: Mapping[str, Tensor],
    source: CheckpointFormat | None = None,
    *,
    strict: bool = True,
    check_finite: bool = True,
    where: str = "a state dict",
    device_of: Callable[[str], torch.device] | None = None,
) -> LoadReport:
    """Load an external checkpoint into ``model``; raise CheckpointError naming what does not fit.

    Strict loading fails on mis-shaped keys, on keys no part claims and on missing keys, except
    that a LAVIS checkpoint may leave out the frozen towers (LAVIS never saves them).

    ``state`` may be a ``LazyState`` (``open_state``): everything is checked on its meta tensors
    first, then each tensor the model uses is read straight into the dtype of the model tensor it
    fills. Parameters on the meta device (``build_from_composition(empty=...)``) are replaced by
    the loaded tensors, on ``device_of(key)`` (the CPU by default); real ones are copied into.
    """
    source = source or detect_format(state)
    converted = convert_state(model, state, source)
    own = model.state_dict(keep_vars=True)
    report = LoadReport(source=where, format=source)

    mismatched = shape_mismatches(own, converted.state)
    if mismatched:
        raise CheckpointError(
            f"{len(mismatched)} tensors of {where} do not fit {model.name or 'the model'}: "
            + "; ".join(mismatched[:8]) + ". Check that the checkpoint matches the composition."
        )
    unknown_own = sorted(set(converted.state) - set(own))
    if unknown_own:
        raise CheckpointError(f"conversion produced keys the model does not have: {preview_keys(unknown_own)}")

    leftovers = set(state) - converted.consumed
    report.ignored = sorted(leftovers & HF_IGNORED_KEYS) if source == "hf" else []
    report.unexpected = sorted(leftovers - set(report.ignored))
    report.missing = sorted(set(own) - set(converted.state))
    report.loaded = sorted(converted.state)

    # Keys the format has no name for keep their initial values; a LAVIS file may leave a frozen
    # tower out entirely (LAVIS saves only what trains), but never hold part of one.
    allowed_missing = _unrepresentable_keys(model, source)
    partial_towers = []
    if source == "lavis":
        for tower in ("vision", "language"):
            keys = {key for key in own if key.startswith(tower + ".")}
            if not keys & set(converted.state):
                allowed_missing |= keys
            elif keys - set(converted.state) - allowed_missing:
                partial_towers.append(tower)
    if strict:
        problems = []
        hard_missing = [key for key in report.missing if key not in allowed_missing]
        if partial_towers:
            problems.append(f"it holds only part of the {' and '.join(partial_towers)} tower(s), which "
                            "a LAVIS file leaves out entirely or holds whole")
        if hard_missing:
            problems.append(f"missing keys (model names): {preview_keys(hard_missing)}")
        if report.unexpected:
            problems.append(f"unexpected keys (checkpoint names): {preview_keys(report.unexpected)}")
        if problems:
            raise CheckpointError(
                f"{where} does not fit {model.name or 'the model'}: " + " | ".join(problems)
                + ". Pass strict=False to load what fits and get a LoadReport instead."
            )
    if isinstance(state, LazyState):
        # Everything fits: read what is used, each tensor in the dtype it will be kept in, and
        # convert again, now with values (the first pass ran on meta tensors).
        read = read_used(state, converted, own, device_of)
        converted = convert_state(model, read, source)
    if check_finite:
        check_finite_values(converted.state, where, names="model names")
    assign_state(model, converted.state, device_of=device_of)
    if source == "lavis" and any(key.startswith(("vision.", "language.")) for key in report.missing):
        report_towers = [tower for tower in ("vision", "language")
                         if any(key.startswith(tower + ".") for key in report.missing)]
        report.notes = towers_from_settings(model, [part for part in PARTS if part not in report_towers])
        warnings.warn(
            f"{where} holds no weights for the frozen {' and '.join(report_towers)} (LAVIS saves only "
            "trainable keys); they keep the weights their components loaded from their own "
            "'pretrained' settings: " + "; ".join(report.notes), stacklevel=2,
        )
    return report


def check_finite_values(values: Mapping[str, Tensor], where: str, names: str = "") -> None:
    """Refuse NaN/Inf in loaded values, naming the tensors (``names`` says whose names they are)."""
    bad = non_finite_keys(values)
    if bad:
        whose = f" ({names})" if names else ""
        raise CheckpointError(
            f"{where} holds NaN or Inf values in {preview_keys(bad)}{whose}; the checkpoint is damaged "
            "or diverged in training. Pass check_finite=False to load it anyway."
        )


# -- reading into the model's own dtypes, and materialising meta parameters ------------------------


def read_used(
    state: LazyState,
    converted: ConvertedState,
    own: Mapping[str, Tensor],
    device_of: Callable[[str], torch.device] | None = None,
) -> dict[str, Tensor]:
    """The tensors of ``state`` that ``converted`` (made from its meta tensors) uses, read.

    A file tensor that becomes a model tensor as it is (the same meta object came back from the
    conversion) is read straight into that model tensor's dtype and device; one the conversion
    computes with (split, resampled) is read as stored, so the result is what loading the whole
    file and converting it would give. Tied names of one stored tensor are read once.
    """
    targets: dict[int, set[tuple[torch.dtype, torch.device]]] = {}
    for own_key, value in converted.state.items():
        tensor = own[own_key]
        if not tensor.is_meta:
            device = tensor.device  # copied into where it is
        else:
            device = torch.device(device_of(own_key)) if device_of is not None else torch.device("cpu")
        targets.setdefault(id(value), set()).add((tensor.dtype, device))
    read: dict[str, Tensor] = {}
    by_object: dict[int, Tensor] = {}
    for key in sorted(converted.consumed | {k for k in state if id(state[k]) in targets}):
        meta = state[key]
        if id(meta) not in by_object:
            wanted = targets.get(id(meta), set())
            dtype, device = next(iter(wanted)) if len(wanted) == 1 else (None, None)
            by_object[id(meta)] = state.read(key, dtype, device)
        read[key] = by_object[id(meta)]
    return read


def assign_state(
    model: nn.Module,
    values: Mapping[str, Tensor],
    *,
    device_of: Callable[[str], torch.device | str] | None = None,
) -> None:
    """Put ``values`` (the model's own state_dict keys) into ``model``.

    A real tensor is copied into (in its own dtype and device). A meta one is replaced by the value,
    cast to the meta tensor's dtype, on ``device_of(key)`` (the CPU by default); every name that
    shares the parameter (tied weights) gets the same new parameter, so ties survive, and two
    parameters never share memory unless they shared it before.
    """
    places: dict[int, list[tuple[str, nn.Module, str, bool]]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{module_name}." if module_name else ""
        for leaf, tensor in module._parameters.items():
            if tensor is not None:
                places.setdefault(id(tensor), []).append((prefix + leaf, module, leaf, True))
        for leaf, tensor in module._buffers.items():
            if tensor is not None:
                places.setdefault(id(tensor), []).append((prefix + leaf, module, leaf, False))
    used_storage: set[int] = set()
    for group in places.values():
        present = [place for place in group if place[0] in values]
        if not present:
            continue
        name, module, leaf, is_parameter = present[0]
        old = (module._parameters if is_parameter else module._buffers)[leaf]
        value = values[name]
        if not old.is_meta:
            with torch.no_grad():
                old.copy_(value)
            continue
        device = torch.device(device_of(name) if device_of is not None else "cpu")
        new = value.detach().to(device=device, dtype=old.dtype)
        storage = new.untyped_storage()
        if storage.data_ptr() in used_storage or storage.nbytes() != new.numel() * new.element_size():
            new = new.clone()  # a view of a bigger tensor, or a tensor another parameter took
        used_storage.add(new.untyped_storage().data_ptr())
        replacement = nn.Parameter(new, requires_grad=old.requires_grad) if is_parameter else new
        for _, owner, owner_leaf, owner_is_parameter in group:
            (owner._parameters if owner_is_parameter else owner._buffers)[owner_leaf] = replacement


def meta_tensors(model: nn.Module) -> list[str]:
    """Names of parameters and buffers still on the meta device (no values)."""
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    return sorted(name for name, tensor in named if tensor.is_meta)


def _unrepresentable_keys(model: Blip2, fmt: CheckpointFormat) -> set[str]:
    """Own keys that format ``fmt`` has no name for (HF keeps no Q-Former LM head or temp): a
    checkpoint in that format cannot hold them, so they keep their initial values."""
    keys: set[str] = set()
    for prefix in ("vision", "bridge", "language"):
        part = getattr(model, prefix)
        if part is None:
            continue
        covered = part.convert_external_state(part.export_external_state(fmt), fmt).state
        keys |= {f"{prefix}.{key}" for key in set(part.state_dict()) - set(covered)}
    return keys


def load_weights(model: Blip2, path: str | Path, *, strict: bool = True,
                 check_finite: bool = True) -> LoadReport:
    """Load a checkpoint (HF directory, LAVIS .pth, .safetensors file or hub id) into ``model``.

    This is what ``build_model(name, weights=...)`` calls.
    """
    local = local_path(path)
    return load_state(model, read_state(local), strict=strict, check_finite=check_finite, where=str(path))


def load_stage1_bridge(model: Blip2, path_or_state: str | Path | Mapping[str, Tensor]) -> LoadReport:
    """Start stage 2 from a stage-1 checkpoint: load the bridge (and its ln_vision), non-strictly.

    Keys of the stage-1 text branch (word/position embeddings, text FFNs, LM/ITC/ITM heads) have no
    place in the stage-2 bridge; they are listed in ``report.dropped``. Reads LAVIS and HF files and
    blip2kit state dicts (``bridge.*`` keys).
    """
    if isinstance(path_or_state, Mapping):
        state, where = dict(path_or_state), "a state dict"
    else:
        state, where = read_state(local_path(path_or_state)), str(path_or_state)
    report = LoadReport(source=where, format="blip2kit")
    own = model.bridge.state_dict()
    if any(key.startswith("bridge.") for key in state):
        values = {key[len("bridge."):]: value for key, value in state.items() if key.startswith("bridge.")}
        report.dropped = sorted(f"bridge.{key}" for key in set(values) - set(own))
        picked = {key: value for key, value in values.items() if key in own}
        consumed = {f"bridge.{key}" for key in values}
    else:
        report.format = detect_format(state)
        converted = model.bridge.convert_external_state(state, report.format)
        picked, consumed = converted.state, converted.consumed
        used = {id(value) for value in picked.values()}
        report.dropped = sorted(key for key in consumed if id(state[key]) not in used)
    mismatched = shape_mismatches(own, picked)
    if mismatched:
        raise CheckpointError(f"stage-1 weights from {where} do not fit the bridge: " + "; ".join(mismatched[:8]))
    model.bridge.load_state_dict(picked, strict=False, assign=any(t.is_meta for t in own.values()))
    report.loaded = sorted(f"bridge.{key}" for key in picked)
    report.missing = sorted(f"bridge.{key}" for key in set(own) - set(picked))
    report.unexpected = sorted(set(state) - consumed)
    return report


__all__ = ["HF_IGNORED_KEYS", "PARTS", "LoadReport", "assign_state", "check_finite_values", "check_state",
           "convert_state", "export_state", "load_stage1_bridge", "load_state", "load_weights",
           "meta_tensors", "parts_of", "projection_prefix", "read_used", "towers_from_settings"]
