"""``blip2kit eval``: run an evaluation task (VQAv2, OK-VQA, GQA, COCO captions, NoCaps, COCO or
Flickr30k retrieval) from its public files, with LAVIS' prompts and decoding as defaults.

``blip2kit eval CONFIG.yaml`` reads the same settings from a file; options given on the command
line win. Under ``torchrun`` the questions are split across the processes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from blip2kit.core.commands.common import PRECISIONS, add_model_options, default_device, load_model, one_line_errors

TASKS = ("vqav2", "okvqa", "gqa", "coco_caption", "nocaps", "coco_retrieval", "flickr_retrieval")


class EvalConfig(BaseModel):
    """The settings of one evaluation run (an eval CONFIG.yaml holds these keys)."""

    model_config = ConfigDict(extra="forbid")

    task: str = Field(description=f"one of {', '.join(TASKS)}")
    model: str = Field(description="model card, composition, checkpoint path or training run directory")
    images: str = Field(description="the folder the dataset's image paths are relative to")
    questions: str | None = Field(None, description="VQA tasks: the questions JSON")
    annotations: str | None = Field(
        None, description="VQA annotations JSON, captions JSON (Karpathy or COCO/NoCaps), or retrieval JSON"
    )
    out: str | None = Field(None, description="output folder (default eval-<task>)")
    batch_size: int = Field(8, ge=1, description="images per forward pass")
    device: str | None = Field(None, description="cpu, cuda, cuda:N (default: cuda when available)")
    precision: str | None = Field(None, description=f"one of {', '.join(PRECISIONS)}; default: the policy")
    prompt: str | None = Field(None, description="override the task's prompt (VQA: with {} for the question)")
    num_beams: int | None = Field(None, ge=1)
    max_len: int | None = Field(None, ge=1, description="new tokens at most")
    min_len: int | None = Field(None, ge=0, description="LAVIS' min_len (counts BOS/prompt or start token)")
    length_penalty: float | None = None
    beam_convention: Literal["transformers", "lavis"] | None = Field(
        None, description="beam scoring: 'transformers' (transformers 5, default) or 'lavis' "
                          "(transformers 4.26, what BLIP-2's published numbers were made with)"
    )
    k_test: int | None = Field(None, ge=1, description="retrieval: candidates re-ranked by ITM")
    split: str | None = Field(None, description="Karpathy split to read (default test; NoCaps val)")
    metrics: list[str] | None = Field(
        None, description="captions: a subset of BLEU, METEOR, ROUGE_L, CIDEr, SPICE (default all)"
    )


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "eval", help="evaluate a model on VQAv2, OK-VQA, GQA, COCO captions, NoCaps or retrieval",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", nargs="?", help="a YAML file with the settings below")
    parser.add_argument("--task", choices=TASKS)
    add_model_options(parser, required=False)
    parser.add_argument("--images", help="folder the dataset's image paths are relative to")
    parser.add_argument("--questions", help="VQA tasks: the questions JSON")
    parser.add_argument("--annotations", help="VQA annotations / captions / retrieval JSON")
    parser.add_argument("--out", help="output folder (default eval-<task>); rerun to resume")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--prompt", help="override the task prompt (VQA: {} is the question)")
    parser.add_argument("--num-beams", type=int)
    parser.add_argument("--max-len", type=int, help="new tokens at most")
    parser.add_argument("--min-len", type=int, help="LAVIS min_len (counts BOS/prompt or start token)")
    parser.add_argument("--length-penalty", type=float)
    parser.add_argument("--beam-convention", choices=("transformers", "lavis"),
                        help="beam scoring: transformers 5's (default) or transformers 4.26's (LAVIS)")
    parser.add_argument("--k-test", type=int, help="retrieval: candidates re-ranked by ITM")
    parser.add_argument("--split", help="Karpathy split (default test; NoCaps val)")
    parser.add_argument("--metrics", type=lambda text: [name.strip() for name in text.split(",") if name.strip()],
                        help="captions: comma-separated subset of BLEU,METEOR,ROUGE_L,CIDEr,SPICE")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(handler=one_line_errors(command_eval))


def resolve_config(args: argparse.Namespace) -> EvalConfig:
    """The config file's settings, overridden by the options given on the command line."""
    import yaml

    settings: dict[str, Any] = {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise FileNotFoundError(f"config {args.config!r} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            raise ValueError(f"{path}: not valid YAML: {error}") from error
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping of settings, got {type(loaded).__name__}")
        settings.update(loaded)
    for key in EvalConfig.model_fields:
        value = getattr(args, key, None)
        if value is not None:
            settings[key] = value
    try:
        config = EvalConfig(**settings)
    except ValidationError as error:
        problem = error.errors()[0]
        field = ".".join(str(part) for part in problem["loc"]) or "config"
        source = f"{args.config}: " if args.config else ""
        raise ValueError(
            f"{source}{field}: {problem['msg']} ({len(error.errors())} problem(s); settings are "
            f"{', '.join(EvalConfig.model_fields)})"
        ) from None
    if config.task not in TASKS:
        raise ValueError(f"task {config.task!r} is unknown; choose one of {', '.join(TASKS)}")
    if config.precision is not None and config.precision not in PRECISIONS:
        raise ValueError(f"precision {config.precision!r} is unknown; choose one of {', '.join(PRECISIONS)}")
    return config


def _ranks(device: str) -> Any:
    """This process's place under torchrun (gloo on CPU, NCCL on GPUs); 1 of 1 otherwise."""
    from blip2kit.core.evaluation.runner import Ranks

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Ranks()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size(), dist.barrier)


def command_eval(args: argparse.Namespace) -> int:
    from blip2kit.core.evaluation.recipes import recipe as task_recipe
    from blip2kit.core.evaluation.runner import METRICS_FILE, load_dataset, run_task

    config = resolve_config(args)
    recipe = task_recipe(
        config.task, prompt=config.prompt, num_beams=config.num_beams, max_len=config.max_len,
        min_len=config.min_len, length_penalty=config.length_penalty, k_test=config.k_test,
        split=config.split, beam_convention=config.beam_convention,
    )
    if not Path(config.images).is_dir():
        raise FileNotFoundError(f"images folder {config.images!r} does not exist")
    dataset = load_dataset(recipe, images=config.images, questions=config.questions,
                           annotations=config.annotations)
    device = default_device(config.device)
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    ranks = _ranks(device)
    out_dir = Path(config.out or f"eval-{config.task}")
    model = load_model(config.model, device=device, precision=config.precision)
    try:
        document = run_task(model, recipe, dataset, out_dir, batch_size=config.batch_size, ranks=ranks,
                            progress=not args.no_progress, caption_metric_names=config.metrics)
    finally:
        if ranks.world_size > 1:
            import torch.distributed as dist

            dist.destroy_process_group()
    if document is None:  # not rank 0
        return 0
    if args.json:
        print(json.dumps(document, indent=2))
    else:
        _print_summary(document, out_dir / METRICS_FILE)
    return 0


def _print_summary(document: dict[str, Any], metrics_path: Path) -> None:
    print(f"{document['task']}: {document['evaluated']} of {document['total']} evaluated, "
          f"{document['skipped']['count']} skipped (unreadable images)")
    print(f"written: {metrics_path} (and the predictions beside it)", file=sys.stderr)
    metrics = document.get("metrics")
    if metrics is None:
        print(f"no metrics: {document.get('metrics_unavailable')}")
        return
    # NoCaps nests its numbers per domain; the summary shows the whole ("overall").
    for name, value in metrics.get("overall", metrics).items():
        if isinstance(value, float):
            print(f"  {name:<24}{value:.4f}")
        elif isinstance(value, int) and not isinstance(value, bool):
            print(f"  {name:<24}{value}")


__all__ = ["EvalConfig", "TASKS", "command_eval", "register", "resolve_config"]
