"""The ``blip2kit`` command line: list registered components, plan a model's memory, and the
commands defined in ``blip2kit.core.commands`` (train, eval, caption, ...).

Each module named in ``COMMAND_MODULES`` has ``register(commands)``, which adds its subparsers
and sets ``handler``. Those modules import torch only inside their handlers, so ``blip2kit list``
stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence

from blip2kit.registry import ComponentCard, ModelCard, RegistryError, get_registry


def _human(count: int | None) -> str:
    if count is None:
        return "-"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f}{unit}"
    return str(count)


def _bytes(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(headers, widths)).rstrip()]
    lines.append("  ".join("-" * width for width in widths))
    lines += ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


def _card_record(card: ComponentCard | ModelCard) -> dict[str, object]:
    if isinstance(card, ModelCard):
        return {
            "name": card.name,
            "kind": "model",
            "composition": card.composition,
            "weights": card.weights,
            "lavis_weights": card.lavis_weights,
            "distribution": card.distribution,
            "description": card.description,
        }
    return {
        "name": card.name,
        "kind": card.kind,
        "width": card.width,
        "params": card.params,
        "weights": card.weights,
        "distribution": card.distribution,
        "factory": card.factory,
        "description": card.description,
    }


def command_list(args: argparse.Namespace) -> int:
    registry = get_registry()
    cards = registry.cards(args.kind)
    for problem in registry.load_errors:
        print(f"warning: could not load {problem}", file=sys.stderr)
    if args.json:
        print(json.dumps([_card_record(card) for card in cards], indent=2))
        return 0
    components = [c for c in cards if isinstance(c, ComponentCard)]
    models = [c for c in cards if isinstance(c, ModelCard)]
    if components:
        print(
            _table(
                ["name", "kind", "width", "params", "weights", "distribution"],
                [
                    [c.name, c.kind, str(c.width or "-"), _human(c.params), c.weights or "-", c.distribution or "-"]
                    for c in components
                ],
            )
        )
    if models:
        print()
        print(
            _table(
                ["model", "composition", "weights", "distribution"],
                [[m.name, m.composition, m.weights or "-", m.distribution or "-"] for m in models],
            )
        )
    if not cards:
        print("no components registered" + (f" of kind {args.kind!r}" if args.kind else ""))
    return 0


def command_plan(args: argparse.Namespace) -> int:
    from blip2kit.core.planning import plan

    result = plan(args.name, devices=args.devices)
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
        return 0
    stage = "stage 1 (vision+bridge)" if result.stage == 1 else "stage 2 (vision+bridge+language)"
    print(f"{result.name}: {stage}")
    print(
        _table(
            ["part", "total", "trainable"],
            [[part, f"{c['total']:,}", f"{c['trainable']:,}"] for part, c in result.parts.items()]
            + [["all", f"{result.total_params:,}", f"{result.trainable_params:,}"]],
        )
    )
    print(f"\nper-device memory for weights, gradients and AdamW state on {args.devices} device(s)")
    print("(frozen towers replicated, trainable part sharded by ZeRO; activations not included)")
    print(
        _table(
            ["dtype", "ZeRO", "weights", "gradients", "optimizer", "total"],
            [
                [
                    row.dtype,
                    str(row.zero_stage),
                    _bytes(row.weights_bytes),
                    _bytes(row.gradients_bytes),
                    _bytes(row.optimizer_bytes),
                    _bytes(row.total_bytes),
                ]
                for row in result.memory
            ],
        )
    )
    return 0


# Modules that add subcommands; each has ``register(commands: argparse._SubParsersAction)``.
COMMAND_MODULES: tuple[str, ...] = (
    "blip2kit.core.commands.demo",
    "blip2kit.core.commands.train",
    "blip2kit.core.commands.evaluate",
    "blip2kit.core.commands.use",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blip2kit",
        description="Build, train, evaluate and serve BLIP-2 style vision-language models.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    listing = commands.add_parser("list", help="registered vision encoders, bridges, LLMs and models")
    listing.add_argument("--kind", choices=["vision", "bridge", "language", "model"], help="only this kind")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(handler=command_list)

    planning = commands.add_parser(
        "plan", help="parameter counts and per-device memory of a model under ZeRO 0-3"
    )
    planning.add_argument("name", help="e.g. vit_g+qformer (stage 1) or vit_g+qformer+opt_2.7b")
    planning.add_argument("--devices", type=int, default=1, help="number of data-parallel devices")
    planning.add_argument("--json", action="store_true", help="machine-readable output")
    planning.set_defaults(handler=command_plan)

    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (RegistryError, ValueError) as error:
        print(f"blip2kit {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
