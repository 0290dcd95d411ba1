"""What a benchmark ran on, and where its results go (named by environment, as timm's benchmark)."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def describe() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "date": time.strftime("%Y-%m-%d"),
    }


def environment_tag(env: dict[str, Any]) -> str:
    return f"{env['device'].replace(' ', '_').lower()}-{env['cpu_threads']}threads"


def write_result(name: str, result: dict[str, Any], directory: Path = RESULTS) -> Path:
    """Atomically write <directory>/<name>-<environment>.json and return its path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}-{environment_tag(result['environment'])}.json"
    partial = path.with_suffix(".tmp")
    partial.write_text(json.dumps(result, indent=2) + "\n")
    partial.replace(path)
    return path
