"""What the model-using commands share: the model options, loading a model by any name blip2kit
knows, the device, and turning file errors into one-line messages. Imports no torch at import time.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

PRECISIONS = ("fp32", "bf16", "fp16")


def add_model_options(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    """--model, --device, --precision, --json: the options every model-using command takes."""
    parser.add_argument(
        "--model", required=required,
        help="a model card (blip2-opt-2.7b), a composition (vit_g+qformer+opt_2.7b, random weights), "
        "an HF or LAVIS checkpoint path, or a training run directory",
    )
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument(
        "--precision", choices=PRECISIONS,
        help="precision of the frozen towers (default: the model's precision policy)",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output on stdout")


def default_device(requested: str | None) -> str:
    import torch

    if requested:
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def _precision_arguments(function: Callable[..., Any], precision: str | None) -> dict[str, Any]:
    """``precision=`` where the loader takes it (the precision policy), else the older ``dtype=``."""
    if precision is None:
        return {}
    if "precision" in inspect.signature(function).parameters:
        return {"precision": precision}
    return {"dtype": None if precision == "fp32" else precision}


def load_model(spec: str, *, device: str | None = None, precision: str | None = None) -> Any:
    """The model ``spec`` names, in eval mode on ``device``.

    A path (HF directory, LAVIS ``.pth``, blip2kit directory or training run directory) and a
    model card with weights load through ``from_pretrained``; a composition (or a card without
    weights) is built with random weights, which is said on stderr.
    """
    from blip2kit.core.build import build_model
    from blip2kit.core.checkpoints import from_pretrained
    from blip2kit.registry import get_registry

    device = default_device(device)
    registry = get_registry()
    if not Path(spec).exists():
        card = registry.get("model", spec) if spec in registry.names("model") else None
        random_weights = card is not None and card.weights is None
        if card is None and "+" in spec:
            registry.resolve(spec)  # an unknown part: RegistryError names the slot and close matches
            random_weights = True
        if random_weights:
            print(f"note: {spec!r} names no weights; using random weights", file=sys.stderr)
            model = build_model(spec, device=device, **_precision_arguments(build_model, precision))
            return model.eval()
        if card is None and (spec.startswith(("/", ".", "~")) or spec.count("/") != 1):
            raise FileNotFoundError(
                f"model {spec!r} is not a path that exists, a registered model or composition "
                "(see `blip2kit list`), nor a hub id 'owner/name'"
            )
    model = from_pretrained(spec, device=device, **_precision_arguments(from_pretrained, precision))
    return model.to(device).eval()


def existing_files(paths: list[str], what: str) -> list[Path]:
    """``paths`` as Paths; the first that does not exist or is not a file is a one-line error."""
    for path in paths:
        if not Path(path).exists():
            raise FileNotFoundError(f"{what} {path!r} does not exist")
        if not Path(path).is_file():
            raise FileNotFoundError(f"{what} {path!r} is not a file")
    return [Path(path) for path in paths]


def one_line_errors(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """File-system errors (missing paths, unreadable files) as ``blip2kit CMD: error: ...``.

    ValueError (bad input, unreadable images, bad checkpoints) is already reported so by the CLI.
    """

    @functools.wraps(handler)
    def wrapped(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except OSError as error:
            message = str(error) if isinstance(error, FileNotFoundError) and not error.filename else (
                f"{error.strerror or error}: {error.filename}" if error.filename else str(error))
            print(f"blip2kit {args.command}: error: {message}", file=sys.stderr)
            return 2

    return wrapped


def batches(items: list[Any], size: int) -> list[list[Any]]:
    return [items[start : start + size] for start in range(0, len(items), size)]


__all__ = [
    "PRECISIONS",
    "add_model_options",
    "batches",
    "default_device",
    "existing_files",
    "load_model",
    "one_line_errors",
]
