"""Reading checkpoint files safely: safetensors or ``torch.load(weights_only=True)``, nothing else.

Imports no model code, so plugins may use it (their own weight files) and core may import it from
anywhere. Holds the one error type of the checkpoint layer and the helpers that name keys in errors.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping
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
                  if value.is_floating_point() and not value.is_meta and not _all_finite(value))


def _all_finite(value: Tensor, step: int = 1 << 22) -> bool:
    """Whether every element is finite, a slice at a time (a mask of a whole embedding table would
    cost as much memory as the table). A float64 sum is finite exactly when every element is (NaN
    and Inf propagate; half and fp32 values cannot add up to float64's overflow), and one pass."""
    flat = value.reshape(-1)
    for begin in range(0, flat.numel(), step):
        part = flat[begin:begin + step]
        finite = torch.isfinite(part).all() if part.dtype == torch.float64 else torch.isfinite(part.sum(dtype=torch.float64))
        if not finite:
            return False
    return True


def read_state(path: str | Path) -> dict[str, Tensor]:
    """A flat state dict from a checkpoint file or an HF directory (safetensors preferred, sharded ok).

    ``.pth``/``.bin``/``.pt`` files are read with ``weights_only=True``; a LAVIS runner checkpoint's
    ``{"model": ...}`` container is unwrapped.
    """
    return open_state(path).read_all()


# -- reading tensor by tensor -----------------------------------------------------------------------

# safetensors dtype names (the format's header) -> torch dtypes.
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class LazyState(Mapping[str, Tensor]):
    """A checkpoint's tensors without their values: ``state[key]`` is a meta tensor of the stored
    shape and dtype (the same object each time), ``read(key, dtype, device)`` reads one tensor.

    Routing, shape and strictness checks run on the meta tensors, so nothing is read before the
    checkpoint is known to fit, and each tensor is then read straight into the dtype and device it
    will live in (a 4-byte file value never sits in memory beside its 2-byte copy for long).
    """

    def __init__(self, where: str, meta: dict[str, Tensor]) -> None:
        self.where = where
        self._meta = meta
        self._aliases: dict[str, str] = {}  # alias -> the key its tensor is stored under

    def __getitem__(self, key: str) -> Tensor:
        return self._meta[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._meta)

    def __len__(self) -> int:
        return len(self._meta)

    def alias(self, alias: str, key: str) -> None:
        """Let ``alias`` name the tensor stored under ``key`` (tied weights saved once)."""
        self._meta[alias] = self._meta[key]
        self._aliases[alias] = key

    def read(self, key: str, dtype: torch.dtype | None = None,
             device: torch.device | str | None = None) -> Tensor:
        """The tensor ``key``, in ``dtype`` on ``device`` (as stored, on the CPU, when None): a
        tensor of its own, sharing memory with nothing else."""
        key = self._aliases.get(key, key)
        if key not in self._meta:
            raise KeyError(key)
        value = self._read(key)
        target_dtype = dtype or value.dtype
        target_device = torch.device(device) if device is not None else value.device
        if value.dtype == target_dtype and value.device == target_device and self._owns(value):
            return value
        return value.to(device=target_device, dtype=target_dtype, copy=True)

    def read_all(self) -> dict[str, Tensor]:
        """Every tensor as stored (what ``read_state`` returns)."""
        return {key: self.read(key) for key in self._meta}

    def _read(self, key: str) -> Tensor:
        raise NotImplementedError

    def _owns(self, value: Tensor) -> bool:
        return True


class _SafetensorsFile(LazyState):
    """A ``.safetensors`` file read with plain reads, one tensor at a time.

    Not memory-mapped: the pages of a mapped file count towards the resident memory of the process
    as they are touched, so a mapped fp32 file would weigh on a bf16 load as much as the model.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        size = path.stat().st_size
        try:
            with path.open("rb") as file:
                header_length = int.from_bytes(file.read(8), "little")
                if not 0 < header_length <= size - 8:
                    raise ValueError(f"its header length {header_length} does not fit its {size} bytes")
                header = file.read(header_length)
                header = json.loads(header)
            data_start = 8 + header_length
            self._spans: dict[str, tuple[int, int]] = {}
            meta: dict[str, Tensor] = {}
            for key, entry in header.items():
                if key == "__metadata__":
                    continue
                dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
                if dtype is None:
                    raise ValueError(f"tensor {key} has dtype {entry['dtype']}, which blip2kit does not read")
                shape = [int(side) for side in entry["shape"]]
                begin, end = (int(offset) for offset in entry["data_offsets"])
                expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
                if not 0 <= begin <= end or end - begin != expected or data_start + end > size:
                    raise ValueError(f"tensor {key} has data offsets {begin}..{end} that do not fit its "
                                     f"shape {shape} and the file's {size} bytes")
                self._spans[key] = (data_start + begin, end - begin)
                meta[key] = torch.empty(shape, dtype=dtype, device="meta")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError, OverflowError) as error:
            raise CheckpointError(
                f"{str(path)!r} is not a readable safetensors file ({error}); it may be truncated "
                "or corrupt: download or save it again"
            ) from None
        super().__init__(str(path), meta)

    # Bytes read at a time when a tensor changes dtype or device on its way in.
    CHUNK_BYTES = 16 * 2**20

    def read(self, key: str, dtype: torch.dtype | None = None,
             device: torch.device | str | None = None) -> Tensor:
        """The tensor ``key``, made once in ``dtype`` on ``device``: stored bytes go straight into
        it, or through one small reused buffer when they must be cast or moved, so reading a file
        never holds a tensor twice (nor leaves freed full-size buffers behind)."""
        key = self._aliases.get(key, key)
        meta = self._meta[key]
        start, length = self._spans[key]
        target = torch.empty(meta.shape, dtype=dtype or meta.dtype,
                             device=torch.device(device) if device is not None else "cpu")
        with self.path.open("rb", buffering=0) as file:
            file.seek(start)
            if target.dtype == meta.dtype and target.device.type == "cpu":
                self._fill(file, target.view(-1).view(torch.uint8), key)
                return target
            flat = target.view(-1)
            step = max(1, self.CHUNK_BYTES // meta.element_size())
            staging = torch.empty(min(step, max(flat.numel(), 1)) * meta.element_size(), dtype=torch.uint8)
            for begin in range(0, flat.numel(), step):
                count = min(step, flat.numel() - begin)
                chunk = staging[: count * meta.element_size()]
                self._fill(file, chunk, key)
                flat[begin:begin + count].copy_(chunk.view(meta.dtype))
        return target

    def _fill(self, file: Any, buffer: Tensor, key: str) -> None:
        if buffer.numel() and file.readinto(memoryview(buffer.numpy())) != buffer.numel():
            raise CheckpointError(f"{self.where!r} ends inside tensor {key}; it is truncated: save "
                                  "or download it again")


class _TorchFile(LazyState):
    """A ``.pth``/``.bin`` file: ``torch.load(weights_only=True)``, memory-mapped where the file
    allows it (zip format), so only the tensors read are brought into memory."""

    def __init__(self, path: Path) -> None:
        if path.stat().st_size == 0:
            raise CheckpointError(f"{str(path)!r} is empty (0 bytes); the save or download did not "
                                  "finish: save or download it again")
        try:
            try:
                loaded: Any = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as error:
                if "mmap" not in str(error):
                    raise
                # A file in torch's legacy (pre-zip) format cannot be mapped; read it whole.
                loaded = torch.load(str(path), map_location="cpu", weights_only=True)
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
        self._tensors = {key: value for key, value in loaded.items() if isinstance(value, Tensor)}
        super().__init__(str(path), {key: value.to("meta") for key, value in self._tensors.items()})

    def _read(self, key: str) -> Tensor:
        return self._tensors[key]

    def _owns(self, value: Tensor) -> bool:
        return False  # a view of the mapped file: copied, so the model never holds file pages


class _Shards(LazyState):
    """The shards of a sharded checkpoint as one state."""

    def __init__(self, where: str, shards: list[LazyState]) -> None:
        self._shard_of = {key: shard for shard in shards for key in shard}
        super().__init__(where, {key: shard[key] for key, shard in self._shard_of.items()})

    def read(self, key: str, dtype: torch.dtype | None = None,
             device: torch.device | str | None = None) -> Tensor:
        key = self._aliases.get(key, key)
        return self._shard_of[key].read(key, dtype, device)


def open_state(path: str | Path) -> LazyState:
    """A checkpoint file or HF directory (safetensors preferred, sharded ok) as a ``LazyState``:
    its keys, shapes and dtypes now, each tensor when it is read."""
    path = Path(path)
    if path.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (path / name).is_file():
                return open_state(path / name)
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            if (path / index_name).is_file():
                shards = sorted(set(json.loads((path / index_name).read_text())["weight_map"].values()))
                return _Shards(str(path), [open_state(path / shard) for shard in shards])
        raise FileNotFoundError(
            f"{str(path)!r} has no model.safetensors, pytorch_model.bin or shard index; "
            "point at a Hugging Face checkpoint directory or a .pth/.safetensors file"
        )
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        return _SafetensorsFile(path)
    return _TorchFile(path)


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


__all__ = ["CheckpointError", "LazyState", "detect_format", "local_path", "non_finite_keys", "open_state",
           "preview_keys", "read_state", "shape_mismatches"]
