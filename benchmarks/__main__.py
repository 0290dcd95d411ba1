"""Run a benchmark: ``python -m benchmarks qformer|speed|encode-profile|beam|precision|params|train|quality|towers-probe|loading [options]`` (``--help`` on each)."""

from __future__ import annotations

import argparse
import sys

from benchmarks import (
    beam,
    encode_profile,
    loading,
    params,
    precision_effect,
    qformer_forward,
    quality,
    speed,
    towers_probe,
    train,
)

BENCHMARKS = {
    "qformer": qformer_forward,
    "speed": speed,
    "encode-profile": encode_profile,
    "beam": beam,
    "precision": precision_effect,
    "params": params,
    "train": train,
    "quality": quality,
    "towers-probe": towers_probe,
    "loading": loading,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    commands = parser.add_subparsers(dest="benchmark", required=True)
    for name, module in BENCHMARKS.items():
        module.add_arguments(commands.add_parser(name, help=module.__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    BENCHMARKS[args.benchmark].run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
