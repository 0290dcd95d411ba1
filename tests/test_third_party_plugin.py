"""A third-party distribution adds a vision encoder through its own entry point, with no change to
blip2kit; a distribution whose plugin raises on import is reported and the rest still load.

The packages are built and installed for real (pip, into a target folder put on sys.path).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import blip2kit.registry.registry as registry_module
from blip2kit.core import build_model
from blip2kit.registry import load_registry

PLUGIN_MODULE = '''
"""A vision encoder that lives outside blip2kit."""
import torch
from torch import nn
from blip2kit.core import VisionEncoder
from blip2kit.registry import ComponentCard, hookimpl


class PoolingEncoder(VisionEncoder):
    def __init__(self, width, image_size=32, patch_size=8):
        super().__init__()
        self.width, self.image_size, self.patch_size = width, image_size, patch_size
        self.mean, self.std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
        self.embed = nn.Conv2d(3, width, patch_size, patch_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, width))

    def forward(self, pixels):
        patches = self.embed(pixels).flatten(2).transpose(1, 2)
        return torch.cat([self.cls.expand(len(pixels), -1, -1), patches], dim=1)


def build(config, device=None):
    return PoolingEncoder(**config)


@hookimpl
def blip2kit_register(registry):
    registry.add_vision_encoder(
        ComponentCard(name="pooling_vit", kind="vision", factory="acme_vision.plugin:build",
                      config={"width": 20}, width=20, description="third-party test encoder")
    )
'''


def write_distribution(root: Path, name: str, package: str, files: dict[str, str]) -> Path:
    project = root / name
    (project / package).mkdir(parents=True)
    for filename, text in files.items():
        (project / package / filename).write_text(textwrap.dedent(text))
    (project / "pyproject.toml").write_text(
        textwrap.dedent(
            f"""
            [build-system]
            requires = ["setuptools>=68"]
            build-backend = "setuptools.build_meta"

            [project]
            name = "{name}"
            version = "0.1"

            [project.entry-points.blip2kit]
            {package} = "{package}.plugin"

            [tool.setuptools]
            packages = ["{package}"]
            """
        )
    )
    return project


@pytest.fixture(scope="module")
def installed_plugins(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("third_party")
    good = write_distribution(
        root, "acme-vision", "acme_vision", {"__init__.py": "", "plugin.py": PLUGIN_MODULE}
    )
    broken = write_distribution(
        root,
        "broken-bridge",
        "broken_bridge",
        {"__init__.py": "", "plugin.py": "raise ImportError('needs a CUDA toolkit that is not here')\n"},
    )
    target = root / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
         "--no-build-isolation", "--target", str(target), str(good), str(broken)],
        check=True,
    )
    return target


def test_third_party_encoder_registers_and_composes(installed_plugins: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from doubles import DoublesPlugin

    monkeypatch.syspath_prepend(str(installed_plugins))
    with pytest.warns(RuntimeWarning, match="broken-bridge"):
        registry = load_registry(extra_plugins=[("doubles", DoublesPlugin())])
    monkeypatch.setattr(registry_module, "_REGISTRY", registry)

    card = registry.get("vision", "pooling_vit")
    assert card.distribution == "acme-vision"
    assert registry.plugins["acme_vision"] == "acme-vision"

    # The broken distribution is reported by name; everything else loaded.
    assert [(p.plugin, p.distribution) for p in registry.load_errors] == [("broken_bridge", "broken-bridge")]
    assert "needs a CUDA toolkit" in registry.load_errors[0].error
    assert {"vision", "bridges", "language"} <= set(registry.plugins)

    # The encoder composes by name with components it has never heard of; the bridge follows its width.
    model = build_model("pooling_vit+double_bridge+double_lm")
    assert model.bridge.input_width == 20
    losses = model(torch.randn(2, 3, 32, 32), ["a cat", "a dog"])
    losses["loss"].backward()
    assert model.bridge.queries.grad is not None
    assert not any(p.requires_grad for p in model.vision.parameters())

    # ... and with the built-in Q-Former and OPT, which size themselves to it.
    model = build_model("pooling_vit+qformer_tiny+opt_tiny")
    assert model.bridge.input_width == 20
    prefix_embeds, prefix_mask = model.soft_prompt(torch.randn(2, 3, 32, 32))
    assert prefix_embeds.shape == (2, model.bridge.num_queries, model.language.hidden_size)
    assert prefix_mask.shape == (2, model.bridge.num_queries)


def test_autoload_can_be_disabled(installed_plugins: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(installed_plugins))
    monkeypatch.setenv("BLIP2KIT_DISABLE_PLUGIN_AUTOLOAD", "1")
    registry = load_registry()
    assert "pooling_vit" not in registry.names("vision")
    assert registry.load_errors == []
    assert set(registry.plugins.values()) == {"blip2kit"}


def test_a_third_party_plugin_can_be_blocked_by_distribution(installed_plugins: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(installed_plugins))
    monkeypatch.setenv("BLIP2KIT_BLOCK_PLUGINS", "broken-bridge,acme_vision")
    registry = load_registry()
    assert registry.load_errors == []
    assert "pooling_vit" not in registry.names("vision")
