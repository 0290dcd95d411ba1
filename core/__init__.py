"""blip2kit.core: component interfaces, composition by name, objectives, training and evaluation.

Names are imported on first use (PEP 562), so ``blip2kit list`` runs without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "Blip2": "blip2kit.core.model",
    "ParameterCount": "blip2kit.core.model",
    "count_parameters": "blip2kit.core.model",
    "WidthMismatchError": "blip2kit.core.build",
    "build_component": "blip2kit.core.build",
    "build_model": "blip2kit.core.build",
    "from_pretrained": "blip2kit.core.checkpoints",
    "load_weights": "blip2kit.core.checkpoints",
    "Bridge": "blip2kit.core.interfaces",
    "Component": "blip2kit.core.interfaces",
    "ConvertedState": "blip2kit.core.interfaces",
    "GenerationOptions": "blip2kit.core.interfaces",
    "ImageKeyValues": "blip2kit.core.interfaces",
    "LanguageModel": "blip2kit.core.interfaces",
    "QueryState": "blip2kit.core.interfaces",
    "RepresentationBridge": "blip2kit.core.interfaces",
    "VisionEncoder": "blip2kit.core.interfaces",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from blip2kit.core.build import WidthMismatchError, build_component, build_model
    from blip2kit.core.checkpoints import from_pretrained, load_weights
    from blip2kit.core.interfaces import (
        Bridge,
        Component,
        ConvertedState,
        GenerationOptions,
        ImageKeyValues,
        LanguageModel,
        QueryState,
        RepresentationBridge,
        VisionEncoder,
    )
    from blip2kit.core.model import Blip2, ParameterCount, count_parameters


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'blip2kit.core' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
