"""Activation functions by their Hugging Face config names (``hidden_act``), for the built-in
components that read HF configs. A name not listed is refused by the readers, naming the setting."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor


def quick_gelu(x: Tensor) -> Tensor:
    """x * sigmoid(1.702 x): OpenAI CLIP's GELU approximation (HF ``quick_gelu``)."""
    return x * torch.sigmoid(1.702 * x)


# HF ACT2FN names -> the same function. gelu_new and gelu_pytorch_tanh are both the tanh form.
HF_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "gelu_new": partial(F.gelu, approximate="tanh"),
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
    "quick_gelu": quick_gelu,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


def activation(name: str, setting: str) -> Callable[[Tensor], Tensor]:
    """The function HF names ``name``; ``setting`` (e.g. 'qformer hidden_act') names it in errors."""
    try:
        return HF_ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"{setting} {name!r} is not implemented; blip2kit implements "
                         f"{sorted(HF_ACTIVATIONS)}") from None


__all__ = ["HF_ACTIVATIONS", "activation", "quick_gelu"]
