"""Fixture data for the training tests: a JSONL caption file with PNG images, a BERT vocabulary for
the tiny Q-Former and an OPT tokenizer for the tiny OPT, all written in their public formats."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

# Every caption is four words, each a single token of both tiny tokenizers, so every sample has the
# same number of tokens and a per-rank token mean equals the global one (1 vs 2 processes).
CAPTIONS = ("a red circle above", "a blue square below", "a green triangle above", "a yellow circle below")
BERT_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "blue", "green", "yellow",
              "circle", "square", "triangle", "above", "below"]


def write_caption_data(root: Path, images: int = 16, *, corrupt: int = 0) -> Path:
    """``root/captions.jsonl`` over ``images`` random PNGs (plus ``corrupt`` unreadable ones)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for index in range(images):
        pixels = (rng.random((40, 40, 3)) * 255).astype("uint8")
        Image.fromarray(pixels).save(root / f"image{index}.png")
        lines.append({"image": f"image{index}.png", "caption": CAPTIONS[index % len(CAPTIONS)]})
    for index in range(corrupt):
        (root / f"broken{index}.png").write_bytes(b"\x89PNG\r\n\x1a\n not really an image")
        lines.append({"image": f"broken{index}.png", "caption": CAPTIONS[0]})
    path = root / "captions.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def write_tokenizers(root: Path) -> tuple[Path, Path]:
    """(BERT vocabulary directory, OPT tokenizer directory) for the tiny Q-Former and OPT."""
    from blip2kit.plugins.language.testing import CORPUS, make_opt_tokenizer

    bert = root / "bert"
    bert.mkdir(parents=True, exist_ok=True)
    (bert / "vocab.txt").write_text("\n".join(BERT_WORDS) + "\n")
    opt = root / "opt"
    make_opt_tokenizer(opt, corpus=(*CORPUS, *CAPTIONS))
    return bert, opt


def job(data: Path, bert: Path, out: Path, *, stage: int = 1, opt: Path | None = None,
        **changes: Any) -> dict[str, Any]:
    """A tiny fp32 job config (as a dict) that trains in seconds on CPU."""
    model = "vit_tiny+qformer_tiny" if stage == 1 else "vit_tiny+qformer_tiny+opt_tiny"
    overrides: dict[str, Any] = {"bridge": {"tokenizer": str(bert), "vocab_size": len(BERT_WORDS) + 1}}
    if stage == 2:
        overrides = {"language": {"tokenizer": str(opt)}}
    config: dict[str, Any] = {
        "model": model,
        "model_overrides": overrides,
        "precision": "fp32",
        "output_dir": str(out),
        "data": {"train": [{"format": "jsonl", "path": str(data)}]},
        "train": {"max_steps": 8, "batch_size": 4, "lr": 2e-3, "min_lr": 1e-4, "warmup_steps": 1,
                  "save_every": 4, "keep_last": 2, "log_every": 1, "seed": 7},
        "deepspeed": {"zero_stage": 2},
    }
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            config.setdefault(section, {})[field] = value
        else:
            config[section] = value
    return config


def write_job(path: Path, config: dict[str, Any]) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(config))
    return path


def cli_environment() -> dict[str, str]:
    """One thread per process (the tests share two cores), no inherited rendezvous variables."""
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    environment["OMP_NUM_THREADS"] = "1"
    return environment


def run_cli(*args: str, processes: int = 1, timeout: float = 900) -> subprocess.CompletedProcess:
    """``blip2kit ARGS`` in a fresh interpreter; under ``torch.distributed.run`` for processes > 1."""
    if processes == 1:
        command = [sys.executable, "-m", "blip2kit.core.cli", *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                   "--master_port", str(_free_port()), "-m", "blip2kit.core.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=cli_environment())


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]


def final_weights(run_dir: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    from blip2kit.core.training import latest_checkpoint

    return load_file(str(latest_checkpoint(run_dir) / "model.safetensors"))
