"""The demo's held-out metrics and the Figure 5 ablation over several seeds, with their spread.

Each seed is one whole ``blip2kit demo`` run (``blip2kit.core.demo.run_demo``: world, stage 1,
stage 2, the ablation, evaluation) under ``--work-dir/seed-N``; a seed whose report was written
from scratch with the same settings is read back, not run again. Writes
``benchmarks/results/quality-<environment>.json`` (per-seed values, mean, sample standard
deviation, min and max of every metric, and how many seeds reproduce the paper's finding that
stage 1 helps zero-shot VQA) and a plot beside it.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks.environment import RESULTS, describe, environment_tag, write_result
from blip2kit.core.demo import stage1_helps

METRICS = (
    "vqa_accuracy", "vqa_accuracy_without_stage1", "caption_cider", "caption_cider_without_stage1",
    "retrieval_r1_text_to_image", "retrieval_r1_image_to_text", "llm_vqa_ceiling", "llm_vqa_floor", "seconds",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="demo seeds (default 0 1 2)")
    parser.add_argument("--fast", action="store_true", help="the demo's smoke budgets (numbers mean nothing)")
    parser.add_argument("--work-dir", type=Path, default=Path("quality-runs"), help="where the demo runs go")
    parser.add_argument("--output-dir", type=Path, default=RESULTS, help="where the JSON and the plot go")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")


def spread(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


def summarise(reports: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Per-metric spread over the seeds' reports, and the ablation's verdict per seed.

    ``seconds`` counts only the seeds whose demo trained every run itself: one that kept finished
    runs from before timed only its evaluation.
    """
    metrics = {}
    for name in METRICS:
        counted = {seed: report for seed, report in reports.items()
                   if name != "seconds" or not report.get("reused_runs")}
        if counted:
            metrics[name] = {"per_seed": {str(seed): report[name] for seed, report in counted.items()},
                             **spread([report[name] for report in counted.values()])}
    reproduced = [seed for seed, report in reports.items()
                  if stage1_helps(report["vqa_accuracy"], report["vqa_accuracy_without_stage1"],
                                  report["test_questions"])]
    return {"metrics": metrics, "ablation_reproduced_on_seeds": reproduced,
            "ablation_reproduced": f"{len(reproduced)} of {len(reports)} seeds"}


def finished_report(out: Path, settings: Any) -> dict[str, Any] | None:
    """``out/report.json`` when a demo with exactly these settings wrote it, training every run."""
    path = out / "report.json"
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    same_settings = report.get("settings") == json.loads(json.dumps(asdict(settings)))
    return report if same_settings and report.get("reused_runs") == [] else None


def run(args: argparse.Namespace) -> dict[str, Any]:
    from blip2kit.core.demo import FAST, FULL, TARGETS, run_demo

    base = FAST if args.fast else FULL
    reports = {}
    for seed in args.seeds:
        settings = type(base)(**{**base.__dict__, "seed": seed})
        out = args.work_dir / f"seed-{seed}"
        reports[seed] = finished_report(out, settings) or run_demo(out, settings)
    environment = describe()
    result = {
        "benchmark": "quality",
        "environment": environment,
        "settings": {"seeds": args.seeds, "fast": args.fast},
        "targets": TARGETS,
        **summarise(reports),
    }
    name = "quality-fast" if args.fast else "quality"
    path = write_result(name, result, args.output_dir)
    print(_table(result))
    print(f"written: {path}")
    if not args.no_plot:
        print(f"plot: {_plot(result, args.output_dir / f'{name}-{environment_tag(environment)}.png')}")
    return result


def _table(result: dict[str, Any]) -> str:
    lines = [f"{'metric':<32}{'mean':>9}{'std':>9}{'min':>9}{'max':>9}"]
    for name, values in result["metrics"].items():
        lines.append(f"{name:<32}" + "".join(f"{values[key]:>9.3f}" for key in ("mean", "std", "min", "max")))
    lines.append(f"stage 1 helps zero-shot VQA (Figure 5): {result['ablation_reproduced']}")
    return "\n".join(lines)


def _plot(result: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from blip2kit.core.checkpoints.atomic import atomic_write_file

    shown = [name for name in METRICS if name not in ("seconds", "caption_cider", "caption_cider_without_stage1")]
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [3, 1]})
    for axis, names in ((left, shown), (right, ["caption_cider", "caption_cider_without_stage1"])):
        means = [result["metrics"][name]["mean"] for name in names]
        stds = [result["metrics"][name]["std"] for name in names]
        axis.bar(range(len(names)), means, yerr=stds, capsize=4, color="tab:blue")
        for index, name in enumerate(names):
            seeds = list(result["metrics"][name]["per_seed"].values())
            axis.scatter([index] * len(seeds), seeds, color="black", s=10, zorder=3)
        axis.set_xticks(range(len(names)), [name.replace("_", "\n", 2) for name in names], fontsize=7)
        axis.grid(axis="y", alpha=0.3)
    left.set_ylabel("fraction (held-out test scenes)")
    right.set_ylabel("CIDEr")
    figure.suptitle(f"blip2kit demo over seeds {result['settings']['seeds']}: mean ± std, dots per seed")
    with atomic_write_file(path) as handle:
        figure.savefig(handle, format="png", dpi=90, bbox_inches="tight")
    plt.close(figure)
    return path


__all__ = ["METRICS", "add_arguments", "finished_report", "run", "spread", "summarise"]
