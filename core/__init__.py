"""blip2kit.core: component interfaces, composition by name, objectives, training and evaluation."""

from blip2kit.core.build import WidthMismatchError, build_component, build_model
from blip2kit.core.checkpoints import from_pretrained, load_weights
from blip2kit.core.interfaces import (
    Bridge,
    Component,
    ConvertedState,
    GenerationOptions,
    LanguageModel,
    QueryState,
    RepresentationBridge,
    VisionEncoder,
)
from blip2kit.core.model import Blip2, ParameterCount, count_parameters

__all__ = [
    "Blip2",
    "Bridge",
    "Component",
    "ConvertedState",
    "GenerationOptions",
    "LanguageModel",
    "ParameterCount",
    "QueryState",
    "RepresentationBridge",
    "VisionEncoder",
    "WidthMismatchError",
    "build_component",
    "build_model",
    "count_parameters",
    "from_pretrained",
    "load_weights",
]
