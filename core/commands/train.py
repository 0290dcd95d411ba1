"""``blip2kit train``, ``config``, ``export`` and ``cache-features``: training jobs from YAML configs."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def register(commands: Any) -> None:
    training = commands.add_parser(
        "train",
        help="train a model from a YAML job config (one process, or under torchrun/deepspeed)",
        description="Train from a job config. One process needs no launcher; for more, run it under "
        "'torchrun --nproc_per_node N' or the 'deepspeed' launcher (multi-node: its --hostfile).",
    )
    training.add_argument("config", help="job config YAML ('blip2kit config example stage1' prints one)")
    _add_set(training)
    training.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    training.add_argument("--no-progress", action="store_true", help="no progress bar (logs and summary only)")
    training.set_defaults(handler=command_train)

    config = commands.add_parser("config", help="print the job config schema or an example config")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    schema = config_commands.add_parser("schema", help="the JSON schema of a job config")
    schema.set_defaults(handler=command_config_schema)
    example = config_commands.add_parser("example", help="a commented config that runs on the tiny components")
    example.add_argument("stage", choices=["stage1", "stage2"])
    example.set_defaults(handler=command_config_example)

    export = commands.add_parser("export", help="write a training run's model as a full HF or LAVIS checkpoint")
    export.add_argument("run_dir", help="a 'blip2kit train' output_dir (its newest checkpoint is exported)")
    export.add_argument("--format", choices=["hf", "lavis"], required=True, help="checkpoint format to write")
    export.add_argument("out", help="directory to write")
    export.set_defaults(handler=command_export)

    cache = commands.add_parser(
        "cache-features", help="run the frozen image encoder once over a job's data and store its features"
    )
    cache.add_argument("config", help="job config YAML; features go to data.feature_cache (or --out)")
    _add_set(cache)
    cache.add_argument("--out", help="cache directory (default: the config's data.feature_cache)")
    cache.add_argument("--batch-size", type=int, default=32, help="images per encoder batch")
    cache.set_defaults(handler=command_cache_features)


def _add_set(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override any config field, e.g. --set train.lr=3e-5 --set data.train.0.path=x.jsonl (YAML values)",
    )


def command_train(args: argparse.Namespace) -> int:
    from blip2kit.core.config import load_config
    from blip2kit.core.training import train

    from blip2kit.core.training.checkpoints import ResumeError

    config = load_config(args.config, args.overrides)
    try:
        train(config, resume=args.resume, progress=not args.no_progress)
    except (OSError, ResumeError) as error:  # a run directory in the way, a missing file: one line
        print(f"blip2kit train: error: {error}", file=sys.stderr)
        return 2
    return 0


def command_config_schema(args: argparse.Namespace) -> int:
    from blip2kit.core.config import config_schema

    print(json.dumps(config_schema(), indent=2))
    return 0


def command_config_example(args: argparse.Namespace) -> int:
    from blip2kit.core.training.examples import EXAMPLES

    sys.stdout.write(EXAMPLES[args.stage])
    return 0


def command_export(args: argparse.Namespace) -> int:
    from blip2kit.core.checkpoints import from_pretrained, save_pretrained
    from blip2kit.core.training import latest_checkpoint

    source = latest_checkpoint(args.run_dir)
    model = from_pretrained(source)
    save_pretrained(model, args.out, format=args.format)
    print(f"exported {source} as {args.format} to {args.out}")
    return 0


def command_cache_features(args: argparse.Namespace) -> int:
    from blip2kit.core.config import load_config
    from blip2kit.core.data.feature_cache import write_feature_cache
    from blip2kit.core.training.loop import build_training_model

    config = load_config(args.config, args.overrides)
    out = args.out or config.data.feature_cache
    if out is None:
        raise ValueError("name the cache directory: set data.feature_cache in the config or pass --out")
    model = build_training_model(config)
    write_feature_cache(model, config.data.train, out, batch_size=args.batch_size)
    print(f"wrote features of {config.model}'s encoder to {out}")
    return 0
