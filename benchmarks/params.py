"""Parameter counts of the paper's BLIP-2 configurations, built on the meta device, against Table 2.

Each configuration is composed by name and built full size on ``meta`` (no memory, no weights);
total and trainable parameters are counted from the modules and set beside the numbers the paper
prints in Table 2 (Li et al. 2023; trainable in millions, total in billions, rounded as printed).
Writes ``benchmarks/results/params-<environment>.json`` and a bar plot beside it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from benchmarks.environment import RESULTS, describe, environment_tag, write_result

# Table 2 of the paper: name -> (composition, trainable params in M, total params in B).
PAPER_TABLE_2: dict[str, tuple[str, float, float]] = {
    "BLIP-2 ViT-L OPT-2.7B": ("vit_l+qformer+opt_2.7b", 104, 3.1),
    "BLIP-2 ViT-g OPT-2.7B": ("vit_g+qformer+opt_2.7b", 107, 3.8),
    "BLIP-2 ViT-g OPT-6.7B": ("vit_g+qformer+opt_6.7b", 108, 7.8),
    "BLIP-2 ViT-L FlanT5-XL": ("vit_l+qformer+flant5_xl", 103, 3.4),
    "BLIP-2 ViT-g FlanT5-XL": ("vit_g+qformer+flant5_xl", 107, 4.1),
    "BLIP-2 ViT-g FlanT5-XXL": ("vit_g+qformer+flant5_xxl", 108, 12.1),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--only", nargs="*", default=None, help="compositions to count (default: all of Table 2)")
    parser.add_argument("--output-dir", type=Path, default=RESULTS, help="where the JSON and the plot go")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")


def count(composition: str) -> dict[str, Any]:
    """Total, trainable and per-part parameters of a stage-2 model built on meta."""
    from blip2kit.core.planning import plan

    result = plan(composition)
    return {
        "total_params": result.total_params,
        "trainable_params": result.trainable_params,
        "parts": result.parts,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm import tqdm

    rows = []
    chosen = {
        label: spec for label, spec in PAPER_TABLE_2.items()
        if args.only is None or spec[0] in args.only
    }
    if not chosen:
        raise SystemExit(f"--only matched none of {[spec[0] for spec in PAPER_TABLE_2.values()]}")
    for label, (composition, paper_trainable_m, paper_total_b) in tqdm(chosen.items(), desc="meta builds"):
        started = time.perf_counter()
        counted = count(composition)
        trainable_m = counted["trainable_params"] / 1e6
        total_b = counted["total_params"] / 1e9
        rows.append({
            "configuration": label,
            "composition": composition,
            **counted,
            "trainable_millions": round(trainable_m, 2),
            "total_billions": round(total_b, 3),
            "paper_trainable_millions": paper_trainable_m,
            "paper_total_billions": paper_total_b,
            # Relative gaps against the paper's rounded numbers.
            "trainable_ratio": trainable_m / paper_trainable_m,
            "total_ratio": total_b / paper_total_b,
            "build_seconds": time.perf_counter() - started,
        })
    result = {
        "benchmark": "params",
        "environment": describe(),
        "source": "Li et al. 2023 (BLIP-2), Table 2: trainable params (M) and total params (B)",
        "rows": rows,
    }
    path = write_result("params", result, args.output_dir)
    print(_table(rows))
    print(f"wrote {path}")
    if not args.no_plot:
        plot = _plot(rows, args.output_dir / f"params-{environment_tag(result['environment'])}.png")
        print(f"wrote {plot}")
    return result


def _table(rows: list[dict[str, Any]]) -> str:
    header = f"{'configuration':<26}{'trainable':>11}{'paper':>8}{'total':>9}{'paper':>8}"
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row['configuration']:<26}{row['trainable_millions']:>10.1f}M{row['paper_trainable_millions']:>7.0f}M"
            f"{row['total_billions']:>8.2f}B{row['paper_total_billions']:>7.1f}B"
        )
    return "\n".join(lines)


def _plot(rows: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from blip2kit.core.checkpoints.atomic import atomic_write_file

    labels = [row["configuration"].replace("BLIP-2 ", "") for row in rows]
    positions = range(len(rows))
    figure, (trainable, total) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.38
    for axis, ours, paper, unit in (
        (trainable, "trainable_millions", "paper_trainable_millions", "trainable parameters (M)"),
        (total, "total_billions", "paper_total_billions", "total parameters (B)"),
    ):
        axis.bar([p - width / 2 for p in positions], [row[ours] for row in rows], width, label="blip2kit (meta build)")
        axis.bar([p + width / 2 for p in positions], [row[paper] for row in rows], width, label="paper, Table 2")
        axis.set_xticks(list(positions), labels, rotation=30, ha="right", fontsize=8)
        axis.set_ylabel(unit)
    trainable.legend(fontsize=8, loc="lower left")
    figure.suptitle("BLIP-2 parameter counts: blip2kit vs the paper")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write_file(path) as handle:
        figure.savefig(handle, format="png", dpi=120)
    plt.close(figure)
    return path
