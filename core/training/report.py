"""What a training run shows and leaves behind: metrics JSONL (and TensorBoard when installed),
the loss-curve PNG, and the end-of-run summary."""

from __future__ import annotations

import json
import resource
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from blip2kit.core.checkpoints.atomic import atomic_write_file, atomic_write_text

METRICS = "metrics.jsonl"
LOSS_PLOT = "loss.png"


class MetricsLog:
    """Appends one JSON line per logged step to ``RUN/metrics.jsonl`` (rank 0 only).

    On resume the lines after the checkpoint's step are dropped first, so the file reads as one
    uninterrupted run.
    """

    def __init__(self, run_dir: Path, *, resume_step: int | None = None) -> None:
        self.path = run_dir / METRICS
        if resume_step is not None and self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        elif resume_step is None:
            atomic_write_text(self.path, "")
        self._tensorboard = _tensorboard_writer(run_dir / "tensorboard")

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
        if self._tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tensorboard.add_scalar(f"train/{key}", value, record["step"])

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()


def _tensorboard_writer(directory: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(directory))


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss(run_dir: Path) -> Path | None:
    """Draw every ``loss*`` series of ``metrics.jsonl`` against the step into ``RUN/loss.png``."""
    records = read_metrics(run_dir)
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    names = sorted({key for record in records for key in record if key.startswith("loss")})
    for name in names:
        points = [(record["step"], record[name]) for record in records if name in record]
        axes.plot(*zip(*points), label=name, linewidth=2 if name == "loss" else 1)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(f"training loss: {Path(run_dir).name}")
    axes.legend()
    axes.grid(alpha=0.3)
    path = Path(run_dir) / LOSS_PLOT
    with atomic_write_file(path) as handle:
        figure.savefig(handle, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return path


def peak_memory_bytes() -> dict[str, int]:
    """Peak resident memory of this process, and peak CUDA memory where a GPU is used."""
    import torch

    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is in KiB on Linux
    peak = {"cpu_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale}
    if torch.cuda.is_available():
        peak["cuda"] = torch.cuda.max_memory_allocated()
    return peak


@dataclass
class TrainSummary:
    """The end of a run, as printed and as written to ``RUN/summary.json``."""

    run_dir: str
    steps: int
    samples: int
    seconds: float
    final_loss: float | None
    bad_samples: int
    bad_sample_summary: str
    peak_memory_bytes: dict[str, int]
    checkpoints: list[str] = field(default_factory=list)
    world_size: int = 1
    trainable_digests: list[str] = field(default_factory=list)  # per rank; all equal in a sound run

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        gib = {name: f"{value / 2**30:.2f} GiB" for name, value in self.peak_memory_bytes.items()}
        loss = "-" if self.final_loss is None else f"{self.final_loss:.4f}"
        lines = [
            f"run          {self.run_dir}",
            f"steps        {self.steps} ({self.samples} samples on {self.world_size} process(es))",
            f"time         {self.seconds:.1f} s",
            f"final loss   {loss}",
            f"bad samples  {self.bad_samples}" + (f": {self.bad_sample_summary}" if self.bad_samples else ""),
            "peak memory  " + ", ".join(f"{name} {value}" for name, value in gib.items()) + " (rank 0)",
            "checkpoints  " + (", ".join(self.checkpoints) if self.checkpoints else "none"),
        ]
        return "\n".join(lines)


__all__ = ["LOSS_PLOT", "METRICS", "MetricsLog", "TrainSummary", "peak_memory_bytes", "plot_loss", "read_metrics"]
