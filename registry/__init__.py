"""blip2kit.registry: names, cards and plugin loading. Imports no torch and no model code."""

from blip2kit.registry.cards import CheckpointFormats, ComponentCard, ModelCard, Preprocessing
from blip2kit.registry.errors import (
    Blip2kitError,
    DuplicateNameError,
    MalformedNameError,
    RegistryError,
    UnknownNameError,
)
from blip2kit.registry.hookspecs import hookimpl, hookspec
from blip2kit.registry.registry import (
    Composition,
    PluginLoadError,
    Registry,
    get_registry,
    load_registry,
    reset_registry,
)

__all__ = [
    "Blip2kitError",
    "CheckpointFormats",
    "ComponentCard",
    "Composition",
    "DuplicateNameError",
    "MalformedNameError",
    "ModelCard",
    "PluginLoadError",
    "Preprocessing",
    "Registry",
    "RegistryError",
    "UnknownNameError",
    "get_registry",
    "hookimpl",
    "hookspec",
    "load_registry",
    "reset_registry",
]
