"""Reading released BLIP-2 checkpoints into blip2kit and writing Hugging Face checkpoints back out.

Two external formats (BLIP2_REFERENCE.md section 7):

- ``hf``: a transformers ``Blip2ForConditionalGeneration`` / ``Blip2ForImageTextRetrieval``
  directory (config.json + model.safetensors, possibly sharded). config.json decides the
  composition: an EVA vision tower of its dims, a Q-Former of its dims, OPT or T5 from text_config.
- ``lavis``: a LAVIS ``.pth`` (``{"model": state_dict, ...}``) holding the trainable keys only; the
  frozen ViT and LLM come from their own sources (the components' ``pretrained`` settings).

Each component picks its own keys (``convert_external_state``); this module routes the projection
(``language_projection.*`` / ``opt_proj.*`` / ``t5_proj.*``) and reports every key that is missing,
mis-shaped or left over, by name. Files are read with safetensors or ``torch.load(weights_only=True)``,
never as arbitrary pickles.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from blip2kit.core.checkpoints.atomic import atomic_directory
from blip2kit.core.checkpoints.native import (
    DESCRIPTION_FILE,
    parts_of,
    read_description,
    trainable_parts,
)
from blip2kit.core.interfaces import CheckpointFormat, ConvertedState
from blip2kit.core.model import Blip2

LAVIS_FILE = "checkpoint.pth"

# Buffers transformers writes that blip2kit recomputes (position ids), ignored by name.
HF_IGNORED_KEYS = frozenset({"qformer.embeddings.position_ids", "embeddings.position_ids"})
_PROJECTION_PREFIXES = {"hf": ("language_projection.",), "lavis": ("opt_proj.", "t5_proj.")}
_HF_ARCHITECTURES = ("Blip2ForConditionalGeneration", "Blip2ForImageTextRetrieval")


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: missing, mis-shaped or unknown keys, by name."""


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


def preview_keys(keys: Iterable[str], limit: int = 8) -> str:
    """The first ``limit`` keys, sorted, and how many there are in all (for error messages)."""
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def shape_mismatches(expected: Mapping[str, Tensor], state: Mapping[str, Tensor]) -> list[str]:
    """'key: checkpoint (..) vs model (..)' for each key both hold with different shapes."""
    return [
        f"{key}: checkpoint {tuple(state[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in sorted(set(expected) & set(state))
        if tuple(state[key].shape) != tuple(expected[key].shape)
    ]


def non_finite_keys(state: Mapping[str, Tensor]) -> list[str]:
    """Keys of floating-point tensors holding NaN or Inf."""
    return sorted(key for key, value in state.items()
                  if value.is_floating_point() and not value.is_meta and not torch.isfinite(value).all())


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
        bad = non_finite_keys({key: value for key, value in state.items() if key in expected})
        if bad:
            raise CheckpointError(
                f"{where} holds NaN or Inf values in {preview_keys(bad)}; the checkpoint is damaged "
                "(or diverged in training). Pass check_finite=False to load it anyway."
            )


# -- reading files --------------------------------------------------------------------------------


def read_state(path: str | Path) -> dict[str, Tensor]:
    """A flat state dict from a checkpoint file or an HF directory (safetensors preferred, sharded ok).

    ``.pth``/``.bin``/``.pt`` files are read with ``weights_only=True``; a LAVIS runner checkpoint's
    ``{"model": ...}`` container is unwrapped.
    """
    path = Path(path)
    if path.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (path / name).is_file():
                return read_state(path / name)
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            if (path / index_name).is_file():
                shards = sorted(set(json.loads((path / index_name).read_text())["weight_map"].values()))
                state: dict[str, Tensor] = {}
                for shard in shards:
                    state.update(read_state(path / shard))
                return state
        raise FileNotFoundError(
            f"{str(path)!r} has no model.safetensors, pytorch_model.bin or shard index; "
            "point at a Hugging Face checkpoint directory or a .pth/.safetensors file"
        )
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except SafetensorError as error:
            raise CheckpointError(
                f"{str(path)!r} is not a readable safetensors file ({error}); it may be truncated "
                "or corrupt: download or save it again"
            ) from error
    try:
        loaded: Any = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(
            f"{str(path)!r} cannot be read with torch.load(weights_only=True): it is corrupt, or it "
            "holds objects other than tensors, which blip2kit does not unpickle (re-save the "
            f"state_dict alone). torch said: {str(error).splitlines()[0]}"
        ) from error
    # Training runs wrap the weights: LAVIS {"model": ...}, Lightning/timm {"state_dict": ...}.
    for container_key in ("model", "state_dict", "module"):
        if isinstance(loaded, Mapping) and isinstance(loaded.get(container_key), Mapping):
            loaded = loaded[container_key]
    if not isinstance(loaded, Mapping):
        raise CheckpointError(f"{str(path)!r} holds a {type(loaded).__name__}, not a state dict")
    return {key: value for key, value in loaded.items() if isinstance(value, Tensor)}


def detect_format(state: Mapping[str, Tensor]) -> CheckpointFormat:
    """'hf' for transformers Blip2* keys, 'lavis' for LAVIS keys."""
    hf_marks = ("vision_model.", "qformer.", "language_model.", "language_projection.")
    lavis_marks = ("Qformer.", "visual_encoder.", "ln_vision.", "opt_proj.", "t5_proj.",
                   "opt_model.", "t5_model.")
    if any(key.startswith(hf_marks) for key in state):
        return "hf"
    if any(key.startswith(lavis_marks) for key in state):
        return "lavis"
    raise CheckpointError(
        "cannot tell the checkpoint format: no Hugging Face (vision_model./qformer./language_model.) "
        f"or LAVIS (Qformer./visual_encoder./opt_proj.) keys among {preview_keys(list(state))}"
    )


# -- routing keys ---------------------------------------------------------------------------------


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
        for key, value in state.items():
            for prefix in _PROJECTION_PREFIXES[source]:
                if key.startswith(prefix):
                    converted.state["projection." + key[len(prefix):]] = value
                    converted.consumed.add(key)
    return converted


def load_state(
    model: Blip2,
    state: Mapping[str, Tensor],
    source: CheckpointFormat | None = None,
    *,
    strict: bool = True,
    where: str = "a state dict",
) -> LoadReport:
    """Load an external checkpoint into ``model``; raise CheckpointError naming what does not fit.

    Strict loading fails on mis-shaped keys, on keys no part claims and on missing keys, except
    that a LAVIS checkpoint may leave out the frozen towers (LAVIS never saves them).
    """
    source = source or detect_format(state)
    converted = convert_state(model, state, source)
    own = model.state_dict()
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

    if strict:
        problems = []
        frozen_towers = ("vision.", "language.") if source == "lavis" else ()
        unrepresentable = _unrepresentable_keys(model, source)
        hard_missing = [key for key in report.missing
                        if not key.startswith(frozen_towers) and key not in unrepresentable]
        if hard_missing:
            problems.append(f"missing keys (model names): {preview_keys(hard_missing)}")
        if report.unexpected:
            problems.append(f"unexpected keys (checkpoint names): {preview_keys(report.unexpected)}")
        if problems:
            raise CheckpointError(
                f"{where} does not fit {model.name or 'the model'}: " + " | ".join(problems)
                + ". Pass strict=False to load what fits and get a LoadReport instead."
            )
    on_meta = any(tensor.is_meta for tensor in own.values())
    model.load_state_dict(converted.state, strict=False, assign=on_meta)
    if source == "lavis" and any(key.startswith(("vision.", "language.")) for key in report.missing):
        report_towers = [tower for tower in ("vision", "language")
                         if any(key.startswith(tower + ".") for key in report.missing)]
        warnings.warn(
            f"{where} holds no weights for the frozen {' and '.join(report_towers)} (LAVIS saves only "
            "trainable keys); they keep the weights their components loaded from their own "
            "'pretrained' settings", stacklevel=2,
        )
    return report


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


def load_weights(model: Blip2, path: str | Path, *, strict: bool = True) -> LoadReport:
    """Load a checkpoint (HF directory, LAVIS .pth, .safetensors file or hub id) into ``model``.

    This is what ``build_model(name, weights=...)`` calls.
    """
    local = _local_path(path)
    return load_state(model, read_state(local), strict=strict, where=str(path))


def load_stage1_bridge(model: Blip2, path_or_state: str | Path | Mapping[str, Tensor]) -> LoadReport:
    """Start stage 2 from a stage-1 checkpoint: load the bridge (and its ln_vision), non-strictly.

    Keys of the stage-1 text branch (word/position embeddings, text FFNs, LM/ITC/ITM heads) have no
    place in the stage-2 bridge; they are listed in ``report.dropped``. Reads LAVIS and HF files and
    blip2kit state dicts (``bridge.*`` keys).
    """
    if isinstance(path_or_state, Mapping):
        state, where = dict(path_or_state), "a state dict"
    else:
        state, where = read_state(_local_path(path_or_state)), str(path_or_state)
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


# -- composing from an HF config ------------------------------------------------------------------


def _vision_overrides(vision_config: Mapping[str, Any]) -> dict[str, Any]:
    image_size = vision_config.get("image_size", 224)
    patch_size = vision_config.get("patch_size", 14)
    return {
        "image_size": int(image_size[0] if isinstance(image_size, (list, tuple)) else image_size),
        "patch_size": int(patch_size[0] if isinstance(patch_size, (list, tuple)) else patch_size),
        "width": vision_config.get("hidden_size", 1408),
        "depth": vision_config.get("num_hidden_layers", 39),
        "num_heads": vision_config.get("num_attention_heads", 16),
        "mlp_dim": vision_config.get("intermediate_size", 6144),
        "layer_norm_eps": vision_config.get("layer_norm_eps", 1e-6),
    }


def _bridge_overrides(config: Mapping[str, Any]) -> dict[str, Any]:
    qformer = config.get("qformer_config") or {}
    vision = config.get("vision_config") or {}
    dropout = qformer.get("hidden_dropout_prob", 0.1)
    return {
        "hidden_size": qformer.get("hidden_size", 768),
        "num_layers": qformer.get("num_hidden_layers", 12),
        "num_heads": qformer.get("num_attention_heads", 12),
        "intermediate_size": qformer.get("intermediate_size", 3072),
        "num_queries": config.get("num_query_tokens", 32),
        "cross_attention_freq": qformer.get("cross_attention_frequency", 2),
        "vocab_size": qformer.get("vocab_size", 30522),
        "max_position_embeddings": qformer.get("max_position_embeddings", 512),
        "embed_dim": config.get("image_text_hidden_size", 256),
        "layer_norm_eps": qformer.get("layer_norm_eps", 1e-12),
        "dropout": dropout,
        # HF's ln_vision is vision_model.post_layernorm, with the vision tower's eps.
        "ln_vision_eps": vision.get("layer_norm_eps", 1e-6),
    }


def _language_card(text_config: Mapping[str, Any]) -> str:
    """The built-in card whose code path reads ``text_config`` (dims are then overridden)."""
    model_type = text_config.get("model_type", "opt")
    hidden = text_config.get("hidden_size", text_config.get("d_model"))
    if model_type == "opt":
        return {2560: "opt_2.7b", 4096: "opt_6.7b"}.get(hidden, "opt_tiny")
    if model_type == "t5":
        return {2048: "flant5_xl", 4096: "flant5_xxl"}.get(hidden, "flant5_tiny")
    raise CheckpointError(
        f"text_config model_type {model_type!r} has no blip2kit language model; built in: opt, t5"
    )


def _language_overrides(card_config: Mapping[str, Any], text_config: Mapping[str, Any],
                        directory: Path | None) -> dict[str, Any]:
    overrides: dict[str, Any] = {key: text_config[key] for key in card_config
                                 if key in text_config and key not in ("tokenizer", "pretrained")}
    overrides["extra_config"] = dict(text_config)
    if directory is not None and any((directory / name).is_file() for name in
                                     ("tokenizer.json", "tokenizer_config.json", "vocab.json", "spiece.model")):
        overrides["tokenizer"] = str(directory)
    return overrides


def model_from_hf_config(config: Mapping[str, Any], directory: Path | None = None, *,
                         device: torch.device | str | None = None) -> Blip2:
    """Compose the Blip2 that a transformers ``Blip2Config`` describes (random weights)."""
    from blip2kit.core.build import build_from_composition
    from blip2kit.registry import get_registry

    architectures = config.get("architectures") or ["Blip2ForConditionalGeneration"]
    if architectures[0] not in _HF_ARCHITECTURES:
        raise CheckpointError(
            f"config.json names architecture {architectures[0]!r}; blip2kit reads {_HF_ARCHITECTURES}"
        )
    registry = get_registry()
    retrieval = architectures[0] == "Blip2ForImageTextRetrieval"
    language_name = None if retrieval else _language_card(config.get("text_config") or {})
    name = "vit_g+qformer" + ("" if retrieval else f"+{language_name}")
    composition = registry.resolve(name)
    overrides: dict[str, dict[str, Any]] = {
        "vision": _vision_overrides(config.get("vision_config") or {}),
        "bridge": _bridge_overrides(config),
    }
    if language_name is not None:
        overrides["language"] = _language_overrides(
            composition.language.config, config.get("text_config") or {}, directory
        )
    model = build_from_composition(composition, device=device, overrides=overrides)
    model.hf_image_token_index = config.get("image_token_index")
    return model


def from_pretrained(
    path_or_hub_id: str | Path,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    strict: bool = True,
    precision: str | None = None,
    **overrides: Mapping[str, Any],
) -> Blip2:
    """A BLIP-2 model with released weights: an HF directory or hub id, a LAVIS ``.pth``, or a
    registered model name (``blip2-opt-2.7b`` ...; fetched from its hub id).

    ``overrides`` (vision=..., bridge=..., language=...) are per-slot config overrides, e.g.
    ``language={"pretrained": "facebook/opt-2.7b"}`` for the LLM a LAVIS checkpoint leaves out.
    ``precision`` applies a precision policy after loading ("fp32", "bf16", "fp16", "half"; see
    ``blip2kit.core.precision``); ``dtype`` is the older setting that casts the frozen towers only.
    """
    model = _from_pretrained(path_or_hub_id, device=device, strict=strict, **overrides)
    if precision is not None or dtype is not None:
        model.set_precision(precision, dtype=dtype)
    return model


def _from_pretrained(
    path_or_hub_id: str | Path,
    *,
    device: torch.device | str | None,
    strict: bool,
    **overrides: Mapping[str, Any],
) -> Blip2:
    from blip2kit.core.build import build_model
    from blip2kit.registry import get_registry

    text = str(path_or_hub_id)
    registry = get_registry()
    if text in registry.names("model") and not Path(text).exists():
        card = registry.get("model", text)
        if card.weights is None:
            raise CheckpointError(f"model {card.name!r} names no weights; pass a checkpoint path")
        model = _from_pretrained(card.weights, device=device, strict=strict)  # config.json: composition
        model.name = card.name
        prompt = card.overrides.get("language", {}).get("prompt")
        if prompt is not None and model.language is not None:
            model.language.prompt = prompt  # the captioning prompt the weights were finetuned with
        return model

    local = _local_path(text)
    if local.is_dir() and not (local / DESCRIPTION_FILE).is_file() and (local / "checkpoints").is_dir():
        local = latest_checkpoint(local)  # a training run directory: its newest complete checkpoint
        text = str(local)
    if local.is_dir() and (local / DESCRIPTION_FILE).is_file():
        if overrides:
            raise ValueError(f"{text!r} records its composition in {DESCRIPTION_FILE}; overrides do not apply")
        return _from_described_directory(local, device=device, strict=strict)
    if local.is_dir():
        config_path = local / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{text!r} has no config.json; is it a Hugging Face Blip2 checkpoint?")
        config = json.loads(config_path.read_text())
        if overrides:
            raise ValueError("overrides apply to LAVIS checkpoints and model names; an HF config.json "
                             "fixes the composition")
        model = model_from_hf_config(config, local, device=device)
        load_state(model, read_state(local), "hf", strict=strict, where=text)
        return model

    if local.is_file() and (local.parent / DESCRIPTION_FILE).is_file() and not overrides:
        described = read_description(local.parent)
        if described["format"] == "lavis" and local.name == LAVIS_FILE:
            return _from_described_directory(local.parent, device=device, strict=strict)
    state = read_state(local)
    fmt = detect_format(state)
    if fmt != "lavis":
        raise CheckpointError(f"{text!r} holds HF keys without a config.json; give the directory")
    model = build_model(composition_of_lavis_state(state), device=device, **overrides)
    load_state(model, state, "lavis", strict=strict, where=text)
    return model


def _from_described_directory(directory: Path, *, device: torch.device | str | None, strict: bool) -> Blip2:
    """A directory with ``blip2kit.json``: the blip2kit format, or an HF/LAVIS save made by blip2kit
    (the composition and settings come from blip2kit.json, the weights from the external files)."""
    from blip2kit.core.checkpoints.native import load_blip2kit, rebuild, restore_dtypes

    description = read_description(directory)
    fmt = description["format"]
    if fmt == "blip2kit":
        return load_blip2kit(directory, device=device, strict=strict)
    if fmt not in ("hf", "lavis"):
        raise CheckpointError(f"{str(directory / DESCRIPTION_FILE)!r} names format {fmt!r}; "
                              "blip2kit reads 'blip2kit', 'hf' and 'lavis'")
    model = rebuild(description, device=device, where=str(directory / DESCRIPTION_FILE))
    source = directory if fmt == "hf" else directory / LAVIS_FILE
    model.load_report = load_state(model, read_state(source), fmt, strict=strict, where=str(directory))
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


def composition_of_lavis_state(state: Mapping[str, Tensor]) -> str:
    """The composed name a LAVIS state dict was trained as, read from its tensor shapes."""
    if "ln_vision.weight" not in state:
        raise CheckpointError("a LAVIS BLIP-2 checkpoint has ln_vision.weight; this one does not")
    vision = {1408: "vit_g", 1024: "vit_l"}.get(state["ln_vision.weight"].shape[0])
    if vision is None:
        raise CheckpointError(f"ln_vision width {state['ln_vision.weight'].shape[0]} is neither "
                              "ViT-g (1408) nor ViT-L (1024)")
    if "opt_proj.weight" in state:
        language = {2560: "opt_2.7b", 4096: "opt_6.7b"}.get(state["opt_proj.weight"].shape[0])
    elif "t5_proj.weight" in state:
        language = {2048: "flant5_xl", 4096: "flant5_xxl"}.get(state["t5_proj.weight"].shape[0])
    else:
        return f"{vision}+qformer"
    if language is None:
        raise CheckpointError("the projection width of this LAVIS checkpoint matches no built-in LLM")
    return f"{vision}+qformer+{language}"


def _local_path(path: str | Path) -> Path:
    """A local path as is; anything else is taken for a hub id and downloaded (config + weights)."""
    local = Path(path)
    if local.exists():
        return local
    text = str(path)
    if text.startswith(("/", ".", "~")) or text.count("/") != 1:
        raise FileNotFoundError(f"checkpoint {text!r} is neither an existing path nor a hub id 'owner/name'")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(text, allow_patterns=[
        "*.json", "*.safetensors", "*.model", "*.txt", "*.bin"]))


# -- writing --------------------------------------------------------------------------------------


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


def export_state(model: Blip2, target: CheckpointFormat) -> dict[str, Tensor]:
    """The whole model under ``target`` key names (each part exports its own)."""
    state: dict[str, Tensor] = {}
    for part in (model.vision, model.bridge, model.language):
        if part is not None:
            state.update(part.export_external_state(target))
    if model.projection is not None:
        prefix = "language_projection." if target == "hf" else (
            "t5_proj." if model.language.is_encoder_decoder else "opt_proj.")
        state.update({prefix + key: value for key, value in model.projection.state_dict().items()})
    return state


def lavis_state(model: Blip2) -> tuple[dict[str, Tensor], list[str]]:
    """What a LAVIS runner saves: the parts that train (bridge, projection, any unfrozen tower),
    under LAVIS key names; and the names of those parts."""
    kept: dict[str, Tensor] = {}
    saved_parts = trainable_parts(model)
    for name in ("vision", "bridge", "language"):
        if name in saved_parts:
            kept.update(getattr(model, name).export_external_state("lavis"))
    if "projection" in saved_parts:
        prefix = "t5_proj." if model.language.is_encoder_decoder else "opt_proj."
        kept.update({prefix + k: v for k, v in model.projection.state_dict().items()})
    return kept, saved_parts


def save_pretrained(model: Blip2, directory: str | Path, format: str = "hf", *,
                    trainable_only: bool = False) -> Path:
    """Write ``model`` as a checkpoint directory, atomically, with ``blip2kit.json`` beside it.

    format "blip2kit": model.safetensors under the model's own keys (``trainable_only`` keeps only
    the parts that train). format "hf": config.json + model.safetensors that transformers'
    ``Blip2ForConditionalGeneration`` (stage 2) or ``Blip2ForImageTextRetrieval`` (stage 1) loads.
    format "lavis": ``checkpoint.pth`` with ``{"model": trainable keys}``, as the LAVIS runner saves
    it. The directory appears complete or not at all; a previous save there survives any failure.
    """
    from blip2kit.core.checkpoints.native import describe, save_blip2kit, write_description

    directory = Path(directory)
    if format == "blip2kit":
        return save_blip2kit(model, directory, trainable_only=trainable_only)
    if format not in ("hf", "lavis"):
        raise ValueError(f"unknown checkpoint format {format!r}; use 'blip2kit', 'hf' or 'lavis'")
    if trainable_only and format == "hf":
        raise ValueError("an HF checkpoint holds the whole model; use format='blip2kit' or 'lavis' "
                         "to save only the trainable parts")
    if format == "lavis":
        kept, saved_parts = lavis_state(model)
        with atomic_directory(directory) as staging:
            torch.save({"model": kept}, staging / LAVIS_FILE)
            tokenizer_saved = model.language is not None and model.language.save_tokenizer(staging)
            write_description(staging, describe(model, format="lavis", saved_parts=saved_parts,
                                                files=[LAVIS_FILE], tokenizer_saved=tokenizer_saved))
        return directory
    if any(p.is_meta for p in model.parameters()):
        raise ValueError("a meta-device model has no weights to save; build it on a real device")
    eps = getattr(getattr(model.bridge, "config", None), "ln_vision_eps", None)
    vision_eps = model.vision.hf_config().get("layer_norm_eps")
    if eps is not None and vision_eps is not None and abs(eps - vision_eps) > 1e-12:
        warnings.warn(
            f"ln_vision eps {eps} differs from the vision tower's {vision_eps}; HF applies the tower's "
            "eps to vision_model.post_layernorm, so outputs differ slightly", stacklevel=2)
    from safetensors.torch import save_file

    from blip2kit.core.checkpoints.native import unique_tensors

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


__all__ = [
    "CheckpointError",
    "HF_IGNORED_KEYS",
    "LoadReport",
    "composition_of_lavis_state",
    "convert_state",
    "detect_format",
    "export_state",
    "from_pretrained",
    "hf_config_of",
    "load_stage1_bridge",
    "load_state",
    "check_state",
    "latest_checkpoint",
    "load_weights",
    "model_from_hf_config",
    "non_finite_keys",
    "read_state",
    "save_pretrained",
]
