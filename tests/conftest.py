"""Shared fixtures: a registry that also holds the test doubles, installed as the process registry."""

from __future__ import annotations

import pytest
import torch

import blip2kit.registry.registry as registry_module
from blip2kit.registry import Registry, load_registry
from doubles import DoublesPlugin


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> Registry:
    """The built-in plugins plus the doubles, used by build_model for the duration of a test."""
    fresh = load_registry(extra_plugins=[("doubles", DoublesPlugin())])
    monkeypatch.setattr(registry_module, "_REGISTRY", fresh)
    return fresh


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
