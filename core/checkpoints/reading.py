"""Reading checkpoint files safely: safetensors or ``torch.load(weights_only=True)``, nothing else.

Imports no model code, so plugins may use it (their own weight files) and core may import it from
anywhere. Holds the one error type of the checkpoint layer and the helpers that name keys in errors.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: missing, mis-shaped or unknown keys, by name."""


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
    if path.stat().st_size == 0:
        raise CheckpointError(f"{str(path)!r} is empty (0 bytes); the save or download did not "
                              "finish: save or download it again")
    try:
        loaded: Any = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:
        said = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise CheckpointError(
            f"{str(path)!r} cannot be read with torch.load(weights_only=True): it is corrupt, or it "
            "holds objects other than tensors, which blip2kit does not unpickle (re-save the "
            f"state_dict alone). torch said: {said}"
        ) from error
    # Training runs wrap the weights: LAVIS {"model": ...}, Lightning/timm {"state_dict": ...}.
    for container_key in ("model", "state_dict", "module"):
        if isinstance(loaded, Mapping) and isinstance(loaded.get(container_key), Mapping):
            loaded = loaded[container_key]
    if not isinstance(loaded, Mapping):
        raise CheckpointError(f"{str(path)!r} holds a {type(loaded).__name__}, not a state dict")
    return {key: value for key, value in loaded.items() if isinstance(value, Tensor)}


def detect_format(state: Mapping[str, Tensor]) -> str:
    """'hf' for transformers Blip2* keys, 'lavis' for LAVIS keys."""
    hf_marks = ("vision_model.", "qformer.", "language_model.", "language_projection.")
    lavis_marks = ("Qformer.", "visual_encoder.", "ln_vision.")
    if any(key.startswith(hf_marks) for key in state):
        return "hf"
    if any(key.startswith(lavis_marks) for key in state):
        return "lavis"
    raise CheckpointError(
        "cannot tell the checkpoint format: no Hugging Face (vision_model./qformer./language_model.) "
        f"or LAVIS (Qformer./visual_encoder./ln_vision.) keys among {preview_keys(list(state))}"
    )


def local_path(path: str | Path) -> Path:
    """A local path as is; an 'owner/name' that is not a local path is fetched from the HF hub.

    A path that does not exist is reported as missing, not as a failed download: anything that looks
    like a path (absolute, ./, ~, a file suffix, a parent folder that exists here) is never sent to
    the hub, and a failed download names both readings.
    """
    local = Path(path).expanduser()
    if local.exists():
        return local
    text = str(path)
    looks_local = (text.startswith(("/", ".", "~")) or text.count("/") != 1
                   or local.suffix in (".pth", ".pt", ".bin", ".safetensors", ".json")
                   or local.parent.exists() and str(local.parent) != ".")
    if looks_local:
        raise FileNotFoundError(f"checkpoint path {text!r} does not exist (relative to {Path.cwd()})")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(text, allow_patterns=[
            "*.json", "*.safetensors", "*.model", "*.txt", "*.bin"]))
    except Exception as error:
        raise FileNotFoundError(
            f"checkpoint {text!r} is not a local path (nothing at {str(Path.cwd() / text)!r}) and could "
            f"not be fetched as a Hugging Face hub id: {type(error).__name__}: "
            f"{(str(error).strip().splitlines() or [''])[0]}"
        ) from error


__all__ = ["CheckpointError", "detect_format", "local_path", "non_finite_keys", "preview_keys",
           "read_state", "shape_mismatches"]
