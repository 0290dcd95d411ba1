"""Encode profile: where one encode + Q-Former call spends its time, blip2kit against transformers.

Builds the speed suite's two fp32 columns (same weights, same images: ``benchmarks/speed.py``),
then for each: one ``torch.profiler`` pass over a single encode call (the ops by self CPU time and
their shares of the call, and the vision tower's share marked by hooks on the tower), and the
interleaved medians of ``--repeats`` encode calls. ``--compile`` adds ``torch.compile`` (default
inductor backend) of blip2kit's vision tower: the first call's seconds (the compile), then the
interleaved medians of eager and compiled calls, and their outputs' largest difference (set
``TORCHINDUCTOR_FORCE_DISABLE_CACHES=1`` for a cold compile time: inductor caches on disk).

The bench config (default) is the speed suite's: ViT 1408 wide x 6 layers at 224 px, the full
Q-Former, OPT 768 x 12, batch 8; ``--small`` runs the tiny components (CI).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from benchmarks.environment import RESULTS, describe, write_result
from benchmarks.speed import Column, _load_average, build_columns, interleaved_times, matmul_peak

PROFILED = ("transformers fp32", "blip2kit fp32")
ENCODE, VISION = "encode call", "vision tower"  # the profiler ranges this suite marks


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--small", action="store_true", help="tiny components and sizes (CI)")
    parser.add_argument("--batch", type=int, default=None, help="images per batch (8; 2 with --small)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per column (5; 1 with --small)")
    parser.add_argument("--top", type=int, default=10, help="ops listed per column, by self CPU time")
    parser.add_argument("--compile", action="store_true",
                        help="also time torch.compile of blip2kit's vision tower (compile seconds, speed, outputs)")
    parser.add_argument("--output-dir", type=Path, default=RESULTS, help="where the JSON goes")


class _MarkedRange:
    """Forward hooks that open a profiler range when ``module`` starts and close it when it ends."""

    def __init__(self, module: torch.nn.Module, name: str) -> None:
        self.name = name
        self.open: Any = None
        self.handles = [module.register_forward_pre_hook(self._enter), module.register_forward_hook(self._exit)]

    def _enter(self, *_: Any) -> None:
        self.open = torch.profiler.record_function(self.name)
        self.open.__enter__()

    def _exit(self, *_: Any) -> None:
        self.open.__exit__(None, None, None)
        self.open = None

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def profile_encode(column: Column, pixels: torch.Tensor, top: int) -> dict[str, Any]:
    """One profiled encode call: its wall time, the vision tower's share, the top ops by self time."""
    marker = _MarkedRange(column.extra["vision_tower"], VISION)
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
            with torch.profiler.record_function(ENCODE):
                column.encode(pixels)
    finally:
        marker.remove()
    events = {event.key: event for event in profiler.key_averages()}
    call_us = events[ENCODE].cpu_time_total
    vision_us = events[VISION].cpu_time_total
    total_self_us = sum(event.self_cpu_time_total for event in events.values())
    ops = sorted((e for key, e in events.items() if key not in (ENCODE, VISION)),
                 key=lambda e: e.self_cpu_time_total, reverse=True)
    return {
        "call_seconds": call_us / 1e6,
        "vision_tower_seconds": vision_us / 1e6,
        "vision_tower_share": vision_us / call_us,
        "rest_share": 1 - vision_us / call_us,  # Q-Former (+ ln_vision) and projection
        "top_ops": [
            {"op": e.key, "calls": e.count, "self_seconds": e.self_cpu_time_total / 1e6,
             "share": e.self_cpu_time_total / total_self_us}
            for e in ops[:top]
        ],
    }


def measure_compile(tower: torch.nn.Module, pixels: torch.Tensor, repeats: int) -> dict[str, Any]:
    """torch.compile (inductor) of the vision tower: the first call's seconds, steady-state medians
    of eager and compiled calls (interleaved), and the outputs' largest difference."""
    from torch._inductor import config as inductor_config

    compiled = torch.compile(tower)
    try:
        with torch.inference_mode():
            start = time.perf_counter()
            compiled_out = compiled(pixels)
            first_call = time.perf_counter() - start
            eager_out = tower(pixels)
    except Exception as error:  # a missing C++ compiler, an unsupported op: report it as it is
        return {"error": f"{type(error).__name__}: {error}".strip()[:2000]}

    @torch.inference_mode()
    def eager() -> torch.Tensor:
        return tower(pixels)

    @torch.inference_mode()
    def compiled_call() -> torch.Tensor:
        return compiled(pixels)

    with tqdm(total=2 * repeats, desc="eager vs compiled", unit="call") as progress:
        times = interleaved_times({"eager": eager, "compiled": compiled_call}, repeats, 0, progress)
    medians = {name: statistics.median(seconds) for name, seconds in times.items()}
    saving = medians["eager"] - medians["compiled"]
    return {
        "backend": "inductor",
        "first_call_seconds": first_call,
        # With its on-disk caches (the default) a second run's first call skips most of the work.
        "inductor_caches_disabled": bool(inductor_config.force_disable_caches),
        "eager_median_seconds": medians["eager"],
        "compiled_median_seconds": medians["compiled"],
        "speedup": medians["eager"] / medians["compiled"],
        # The compile's extra seconds over the seconds each compiled call saves (None: it saves none).
        "calls_to_repay_compile": (first_call - medians["compiled"]) / saving if saving > 0 else None,
        "max_abs_diff": (compiled_out.float() - eager_out.float()).abs().max().item(),
        "seconds": times,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from torch.utils.flop_counter import FlopCounterMode

    small = args.small
    for option in ("batch", "repeats", "top"):
        if getattr(args, option) is not None and getattr(args, option) < 1:
            raise SystemExit(f"--{option}: at least 1, got {getattr(args, option)}")
    args.batch = args.batch or (2 if small else 8)
    args.repeats = args.repeats or (1 if small else 5)
    args.column_list = list(PROFILED)
    with tempfile.TemporaryDirectory() as workdir:
        columns, ours, model_config = build_columns(args, Path(workdir))
    size = model_config["image_size"]
    pixels = torch.randn(args.batch, 3, size, size, generator=torch.Generator().manual_seed(2))

    outputs = {name: column.encode(pixels) for name, column in columns.items()}  # warm-up, compared
    max_abs_diff = (outputs["transformers fp32"] - outputs["blip2kit fp32"]).abs().max().item()
    with FlopCounterMode(display=False) as counter:
        columns["blip2kit fp32"].encode(pixels)
    peak = matmul_peak(torch.float32, 256 if small else 1024, repeats=10)  # best of 10: load spikes

    profiles = {name: profile_encode(column, pixels, args.top) for name, column in columns.items()}
    with tqdm(total=len(columns) * args.repeats, desc="encode, interleaved", unit="call") as progress:
        times = interleaved_times({name: (lambda c=column: c.encode(pixels)) for name, column in columns.items()},
                                  args.repeats, 0, progress)
    medians = {name: statistics.median(seconds) for name, seconds in times.items()}
    result: dict[str, Any] = {
        "benchmark": "encode-profile",
        "environment": {**describe(), "load_average": _load_average()},
        "settings": {"small": small, "batch": args.batch, "repeats": args.repeats},
        "model": model_config,
        "max_abs_diff": max_abs_diff,
        "encode_flops": counter.get_total_flops(),
        "fp32_matmul_peak_flop_per_s": peak,
        "profiles": profiles,
        "encode": {
            name: {"median_seconds": medians[name], "images_per_second": args.batch / medians[name],
                   "fraction_of_peak": counter.get_total_flops() / medians[name] / peak, "seconds": times[name]}
            for name in columns
        },
        "blip2kit / transformers": medians["transformers fp32"] / medians["blip2kit fp32"],
    }
    if args.compile:
        result["compile_vision_tower"] = measure_compile(ours.vision, pixels.to(ours.vision.input_dtype),
                                                         args.repeats)
    path = write_result(f"encode-profile-{'small' if small else f'b{args.batch}'}", result, args.output_dir)
    print(format_report(result))
    print(f"written to {path}")
    return result


def format_report(result: dict[str, Any]) -> str:
    lines = []
    for name, profile in result["profiles"].items():
        timing = result["encode"][name]
        lines += [f"{name}: {timing['images_per_second']:.3f} img/s (median), {timing['fraction_of_peak']:.0%} of "
                  f"fp32 peak; vision tower {profile['vision_tower_share']:.0%} of the profiled call, "
                  f"Q-Former + projection {profile['rest_share']:.0%}",
                  "| op | calls | self s | share |", "|---|---|---|---|"]
        lines += [f"| {op['op']} | {op['calls']} | {op['self_seconds']:.3f} | {op['share']:.1%} |"
                  for op in profile["top_ops"]]
        lines.append("")
    lines.append(f"blip2kit / transformers (encode img/s): {result['blip2kit / transformers']:.3f}x; "
                 f"outputs differ by {result['max_abs_diff']:.2e}")
    compiled = result.get("compile_vision_tower")
    if compiled and "error" in compiled:
        lines.append(f"torch.compile of the vision tower failed: {compiled['error']}")
    elif compiled:
        lines.append(f"torch.compile (inductor) of the vision tower: first call "
                     f"{compiled['first_call_seconds']:.1f} s, steady state {compiled['speedup']:.3f}x eager, outputs differ by {compiled['max_abs_diff']:.2e}")
    return "\n".join(lines)
