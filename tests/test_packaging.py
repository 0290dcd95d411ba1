"""Packaging: every source folder is installed, a built wheel holds the mapped packages, and the
README's install and test commands are exactly what CI runs."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAPPED = {"core": "blip2kit.core", "registry": "blip2kit.registry", "plugins": "blip2kit.plugins"}


def declared_packages() -> set[str]:
    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])


def test_every_source_package_is_declared() -> None:
    found = set()
    for folder, package in MAPPED.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((package, *relative)))
    missing = found - declared_packages()
    assert not missing, f"add {sorted(missing)} to [tool.setuptools] packages in pyproject.toml"


def readme_block(name: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"<!-- {name} -->\s*```(?:bash|sh)\n(.*?)```", text, re.S)
    assert match, f"README.md has no ```bash block after <!-- {name} -->"
    return [line for line in match.group(1).splitlines() if line.strip()]


def test_ci_runs_the_readme_commands() -> None:
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    for block in ("install", "test"):
        for command in readme_block(block):
            assert command in ci, f".ci/run does not run the README's {block} command {command!r}"


@pytest.mark.slow
def test_built_wheel_maps_the_folders(tmp_path: Path) -> None:
    # Build from a copy: setuptools leaves build/ and *.egg-info in the tree it builds.
    source = tmp_path / "source"
    for name in [*MAPPED, "pyproject.toml", "README.md"]:
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(tmp_path), str(source)],
        check=True,
    )
    (wheel,) = tmp_path.glob("blip2kit-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for package in declared_packages():
        assert f"{package.replace('.', '/')}/__init__.py" in names, package
    assert not any(name.startswith(("core/", "registry/", "plugins/", "tests/")) for name in names)
    # The shapes world's frozen towers ship as package data.
    assert "blip2kit/plugins/shapes/assets/shapes_vit.safetensors" in names
    assert "blip2kit/plugins/shapes/assets/shapes_opt/model.safetensors" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "[blip2kit]" in text and "blip2kit.plugins.vision" in text
