"""The precision policy: which dtype each part of a composed model holds and computes in.

BLIP-2 trains a small bridge between two large frozen towers. LAVIS runs the frozen towers in half
precision and the trainable Q-Former with fp32 weights under autocast; this module is the one place
blip2kit decides the same, at the boundaries between towers (``Blip2`` applies it):

======== ====================== ============================== ===============================
policy   frozen towers' weights bridge + projection weights    bridge + projection compute
======== ====================== ============================== ===============================
fp32     fp32                   fp32                           fp32 (exact parity work)
bf16     bf16                   fp32 (master weights)          bf16 autocast
fp16     fp16                   fp32 (master weights)          fp16 autocast
======== ====================== ============================== ===============================

A tower may keep parts in fp32 through its own ``cast_frozen`` (Flan-T5 keeps ``wo``, and serves
fp16 as bf16 because it overflows). A tower that is not frozen keeps fp32 weights and runs under
autocast like the bridge. ``half`` picks bf16 where the device has it, fp16 elsewhere.

The legacy ``dtype=`` argument of ``build_model``/``from_pretrained`` is the policy
``frozen-<dtype>``: frozen towers cast, the bridge computing in fp32 (no autocast).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

PRECISIONS = ("fp32", "bf16", "fp16")
FROZEN_LLM_DROPOUT = ("as_released", "off")

_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_DTYPE_ALIASES = {
    "fp32": torch.float32, "float32": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}


@dataclass(frozen=True)
class PrecisionPolicy:
    """Dtypes of a composed model: frozen towers' weights, and the autocast dtype of what trains."""

    name: str  # "fp32" | "bf16" | "fp16" | "frozen-bf16" | "frozen-fp16" (legacy dtype=)
    frozen_dtype: torch.dtype  # weights of the frozen vision and language towers
    compute_dtype: torch.dtype | None  # autocast dtype of bridge + projection; None: plain fp32

    def autocast(self, device_type: str) -> AbstractContextManager:
        """The context the trainable parts run in: autocast to compute_dtype, or nothing."""
        if self.compute_dtype is None:
            return nullcontext()
        return torch.autocast(device_type, dtype=self.compute_dtype)


FP32 = PrecisionPolicy("fp32", torch.float32, None)


def as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A torch dtype from a dtype or one of its names ('bf16', 'bfloat16', 'fp16', 'half', ...)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPE_ALIASES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPE_ALIASES)}") from None


def half_precision_for(device: torch.device | str | None = None) -> str:
    """'bf16' on CPU and on GPUs that support it, 'fp16' on other GPUs."""
    device = torch.device(device if device is not None else "cpu")
    if device.type == "cuda" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        return "fp16"
    return "bf16"


def resolve_precision(
    precision: str | None,
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
) -> PrecisionPolicy:
    """The policy named by ``precision`` ('fp32', 'bf16', 'fp16', 'half'), or by the legacy ``dtype``.

    With neither, fp32. Both at once is an error: they say different things about the bridge.
    """
    if precision is not None and dtype is not None:
        raise ValueError(
            f"got precision={precision!r} and dtype={dtype!r}; pass only precision (dtype= is the "
            "older setting that casts the frozen towers and leaves the bridge computing in fp32)"
        )
    if precision is None:
        if dtype is None:
            return FP32
        frozen = as_dtype(dtype)
        if frozen == torch.float32:
            return FP32
        return PrecisionPolicy(f"frozen-{_DTYPE_NAMES[frozen]}", frozen, None)
    name = str(precision).lower()
    if name in ("half", "auto"):
        name = half_precision_for(device)
    if name not in PRECISIONS:
        raise ValueError(
            f"unknown precision {precision!r}; use one of {list(PRECISIONS)} or 'half' (bf16 where "
            "the device has it, fp16 elsewhere)"
        )
    if name == "fp32":
        return FP32
    if name == "bf16" and half_precision_for(device) != "bf16":
        raise ValueError(
            f"precision='bf16' but {device} has no bf16 support; use precision='fp16' or 'half'"
        )
    half = _DTYPE_ALIASES[name]
    return PrecisionPolicy(name, half, half)


def check_frozen_llm_dropout(setting: str) -> str:
    if setting not in FROZEN_LLM_DROPOUT:
        raise ValueError(
            f"unknown frozen_llm_dropout {setting!r}; use 'as_released' (the frozen LLM's own "
            "dropout is active in training, as in LAVIS) or 'off' (the frozen LLM stays in eval mode)"
        )
    return setting


__all__ = [
    "FP32",
    "FROZEN_LLM_DROPOUT",
    "PRECISIONS",
    "PrecisionPolicy",
    "as_dtype",
    "check_frozen_llm_dropout",
    "half_precision_for",
    "resolve_precision",
]
