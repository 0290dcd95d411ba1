"""Training steps: stage 1 at BERT-base size (with a profile), stage 2 against transformers, memory
per rank under ZeRO 0/2/3, a stage-1 step with and without the frozen-feature cache, stage 1 with and
without ITM's reuse of the images' cross-attention K/V, and stage 2 with and without the cache.

Stage 1: the full Q-Former (BERT-base shaped, 32 queries) on 257 image tokens of width 1408 from a
stand-in encoder (one EVA block of ViT-g's width), batch 16, 32 text tokens, dropout 0.1, AdamW,
fp32 and the precision policy. Stage 2: ``benchmarks speed``'s stage-2 AdamW step (blip2kit and
``Blip2ForConditionalGeneration`` on the same weights), interleaved. Memory: 2 processes under
``torch.distributed.run`` through blip2kit's DeepSpeed engine, tensor bytes each rank holds and
its peak RSS. Feature cache: the same stage-1 step from fp16 cached features instead of pixels.
ITM K/V reuse (``itm_kv``): the stage-1 step from cached features with the reuse on and off, at
BERT-base and at half width/depth, with the top operators of one step. Stage 2 with the cache
(``stage2_cache``): the bench config's stage-2 step (ViT 1408 x 6 blocks, Q-Former, OPT 768 x 12)
from pixels and from fp16 cached features.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from benchmarks.environment import RESULTS, describe, write_result

PARTS = ("stage1", "cache", "stage2", "memory", "itm_kv", "stage2_cache")
WORDS = ("a photo of the red circle on blue square two cats laying couch next to remote green triangle above "
         "small yellow man riding horse beach at sunset dog sitting in grass near tree").split()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--small", action="store_true", help="tiny components and sizes (CI smoke test)")
    parser.add_argument("--batch", type=int, default=None, help="images per step (16; 2 with --small)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per variant (3; 1 with --small)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
    parser.add_argument("--output-dir", type=Path, default=RESULTS, help="where the JSON goes")


# -- stage 1 --------------------------------------------------------------------------------------


def write_vocabulary(directory: Path) -> Path:
    """A bert-base-uncased layout vocabulary holding the benchmark's words (ids stay in range)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return directory


def captions_of(batch: int, words: int) -> list[str]:
    return [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(words)) for i in range(batch)]


def stage1_model(small: bool, vocabulary: Path, precision: str) -> Any:
    from blip2kit.core.build import build_model

    torch.manual_seed(0)
    if small:
        return build_model("vit_tiny+qformer_tiny", precision=precision,
                           bridge={"tokenizer": str(vocabulary), "max_text_length": 8})
    # The stand-in encoder: one EVA block at ViT-g's width and token count (257 at 224 px).
    return build_model("vit_g+qformer", precision=precision, vision={"depth": 1},
                       bridge={"tokenizer": str(vocabulary), "max_text_length": 32})


def step_function(
    model: Any, captions: list[str], optimizer: torch.optim.Optimizer | None = None, **inputs: Any
) -> Callable[[], float]:
    """One training step (forward, backward, AdamW) on fixed inputs (and objective options)."""
    if optimizer is None:
        optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-5, betas=(0.9, 0.98), weight_decay=0.05)
    model.train()

    def step() -> float:
        loss = model(text_input=captions, **inputs)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def interleaved(steps: dict[str, Callable[[], Any]], repeats: int, progress: Any) -> dict[str, float]:
    """Median seconds of each step, called in turn after one untimed round."""
    from benchmarks.speed import interleaved_times

    times = interleaved_times(steps, repeats, 1, progress)
    return {name: statistics.median(values) for name, values in times.items()}


def interleaved_wall_and_cpu(
    steps: dict[str, Callable[[], Any]], repeats: int, progress: Any
) -> dict[str, dict[str, float]]:
    """Median wall and process-CPU seconds of each step, called in turn after one untimed round.

    With one thread on a shared machine the CPU time is the steadier measure: other jobs stretch
    the wall time of whatever step they overlap.
    """
    for step in steps.values():
        step()
        progress.update(1)
    wall: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            step()
            wall[name].append(time.perf_counter() - start_wall)
            cpu[name].append(time.process_time() - start_cpu)
            progress.update(1)
    return {"wall": {name: statistics.median(values) for name, values in wall.items()},
            "cpu": {name: statistics.median(values) for name, values in cpu.items()}}


def profile_stage1(model: Any, captions: list[str], pixels: torch.Tensor) -> dict[str, Any]:
    """Where a stage-1 step's time goes: by phase, and the top operators by self CPU time."""
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-5)
    phases: dict[str, float] = {}
    start = time.perf_counter()
    with torch.no_grad():
        image_features = model.encode_image(pixels)
    phases["frozen encoder"] = time.perf_counter() - start
    start = time.perf_counter()
    losses = model(text_input=captions, image_features=image_features)
    phases["Q-Former forward (ITC+ITM+ITG)"] = time.perf_counter() - start
    start = time.perf_counter()
    losses["loss"].backward()
    phases["backward"] = time.perf_counter() - start
    start = time.perf_counter()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    phases["AdamW step"] = time.perf_counter() - start

    top = top_operators(step_function(model, captions, optimizer, pixels=pixels), count=12)
    return {"phases_seconds": phases, "top_ops": top}


def top_operators(step: Callable[[], Any], count: int) -> list[dict[str, Any]]:
    """The ``count`` operators of one ``step`` with the most self CPU time, and their share of it."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        step()
    events = sorted(profiler.key_averages(), key=lambda event: event.self_cpu_time_total, reverse=True)
    total = sum(event.self_cpu_time_total for event in events) or 1
    return [{"op": event.key, "self_cpu_ms": event.self_cpu_time_total / 1e3,
             "share": event.self_cpu_time_total / total, "calls": event.count} for event in events[:count]]


def run_stage1(args: argparse.Namespace, workdir: Path, progress: Any) -> dict[str, Any]:
    vocabulary = write_vocabulary(workdir / "vocab")
    words = 6 if args.small else 30  # + [CLS]/[DEC] and [SEP]: 32 tokens at full size
    captions = captions_of(args.batch, words)
    fp32 = stage1_model(args.small, vocabulary, "fp32")
    policy = stage1_model(args.small, vocabulary, "half")
    size = fp32.vision.image_size
    pixels = torch.randn(args.batch, 3, size, size)
    seconds = interleaved({"fp32": step_function(fp32, captions, pixels=pixels),
                           "policy": step_function(policy, captions, pixels=pixels)}, args.repeats, progress)
    tokens = fp32.bridge.tokenize(captions, max_length=fp32.bridge.config.max_text_length)["input_ids"].shape[1]
    return {
        "model": "vit_tiny+qformer_tiny" if args.small else "vit_g(1 block stand-in)+qformer",
        "image_tokens": fp32.vision.num_tokens, "image_width": fp32.vision.width, "text_tokens": tokens,
        "policy": policy.precision,
        "seconds_per_step": seconds,
        "policy_speedup": seconds["fp32"] / seconds["policy"],
        "profile_fp32": profile_stage1(fp32, captions, pixels),
    }


def run_cache(args: argparse.Namespace, workdir: Path, progress: Any) -> dict[str, Any]:
    """A stage-1 step from pixels (encoder runs) and from fp16 cached features (it does not)."""
    vocabulary = write_vocabulary(workdir / "vocab")
    captions = captions_of(args.batch, 6 if args.small else 30)
    model = stage1_model(args.small, vocabulary, "fp32")
    size = model.vision.image_size
    pixels = torch.randn(args.batch, 3, size, size)
    with torch.no_grad():
        cached = model.encode_image(pixels).half()  # what the cache stores
    seconds = interleaved({"pixels": step_function(model, captions, pixels=pixels),
                           "feature_cache": step_function(model, captions, image_features=cached)},
                          args.repeats, progress)
    return {"seconds_per_step": seconds, "speedup": seconds["pixels"] / seconds["feature_cache"],
            "note": "the stand-in encoder has 1 of ViT-g's 39 blocks, so the real saving is far larger"}


# -- ITM reusing the images' cross-attention K/V ---------------------------------------------------

# Q-Former sizes timed with and without the reuse: BERT-base (the released one) and half of it.
ITM_KV_SIZES = {
    "bert-base": {},
    "half": {"hidden_size": 384, "num_layers": 6, "num_heads": 6, "intermediate_size": 1536},
}


def run_itm_kv(args: argparse.Namespace, workdir: Path, progress: Any) -> dict[str, Any]:
    """Stage-1 steps from cached features, ITM reusing the query pass's image K/V or projecting
    every pair's image again (LAVIS's way); one model and optimizer per size, the two interleaved."""
    from blip2kit.core.build import build_model

    vocabulary = write_vocabulary(workdir / "vocab")
    words = 6 if args.small else 30
    captions = captions_of(args.batch, words)
    sizes = {"tiny": {}} if args.small else ITM_KV_SIZES
    results: dict[str, Any] = {}
    for size, bridge_changes in sizes.items():
        torch.manual_seed(0)
        if args.small:
            model = stage1_model(True, vocabulary, "fp32")
        else:
            model = build_model("vit_g+qformer", precision="fp32", vision={"depth": 1},
                                bridge={"tokenizer": str(vocabulary), "max_text_length": 32, **bridge_changes})
        features = torch.randn(args.batch, model.vision.num_tokens, model.vision.width).half()  # as cached
        optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-5, betas=(0.9, 0.98), weight_decay=0.05)
        steps = {reuse: step_function(model, captions, optimizer, image_features=features,
                                      reuse_image_key_values=flag)
                 for reuse, flag in (("reuse", True), ("recompute", False))}
        seconds = interleaved_wall_and_cpu(steps, args.repeats, progress)
        config = model.bridge.config
        results[size] = {
            "qformer": {"hidden_size": config.hidden_size, "num_layers": config.num_layers,
                        "cross_attention_layers": sum(layer.cross_attention is not None for layer in model.bridge.layers),
                        "encoder_width": config.encoder_width},
            "image_tokens": model.vision.num_tokens,
            "seconds_per_step": seconds["wall"],
            "cpu_seconds_per_step": seconds["cpu"],
            "speedup": seconds["wall"]["recompute"] / seconds["wall"]["reuse"],
            "speedup_cpu": seconds["cpu"]["recompute"] / seconds["cpu"]["reuse"],
        }
        if size == ("tiny" if args.small else "bert-base"):
            results[size]["top_ops_reuse"] = top_operators(steps["reuse"], count=10)
            progress.update(1)
        del model, optimizer, steps
    return results


# -- stage 2 --------------------------------------------------------------------------------------


def run_stage2(args: argparse.Namespace, workdir: Path, progress: Any) -> dict[str, Any]:
    from benchmarks.speed import build_columns

    settings = argparse.Namespace(small=args.small, batch=args.batch)
    columns, _, model_config = build_columns(settings, workdir)
    pixels = torch.randn(args.batch, 3, model_config["image_size"], model_config["image_size"])
    seconds = interleaved({name: (lambda column=column: column.train_step(pixels)) for name, column in columns.items()},
                          args.repeats, progress)
    reference = seconds["transformers fp32"]
    return {
        "model": model_config,
        "seconds_per_step": seconds,
        "speedup_fp32": reference / seconds["blip2kit fp32"],
        "speedup_policy_vs_transformers_fp32": reference / seconds["blip2kit policy"],
        "speedup_policy_vs_transformers_bf16": seconds["transformers bf16"] / seconds["blip2kit policy"],
    }


def run_stage2_cache(args: argparse.Namespace, workdir: Path, progress: Any) -> dict[str, Any]:
    """The bench config's fp32 stage-2 step from pixels (the frozen ViT runs) and from fp16 cached
    features (it does not), interleaved; and the frozen encoder's forward alone."""
    from benchmarks.speed import BENCH_OPT, CAPTIONS
    from blip2kit.core.build import build_model
    from blip2kit.plugins.language.testing import make_opt_tokenizer

    tokenizer = make_opt_tokenizer(workdir / "tokenizer")
    torch.manual_seed(0)
    if args.small:
        name, overrides = "vit_tiny+qformer_tiny+opt_tiny", {}
    else:
        name, overrides = "vit_g+qformer+opt_2.7b", {"vision": {"depth": 6}, "language": dict(BENCH_OPT)}
    model = build_model(name, precision="fp32", **overrides)
    model.language.tokenizer = tokenizer
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(args.batch)]
    size = model.vision.image_size
    pixels = torch.randn(args.batch, 3, size, size)
    with torch.no_grad():
        start = time.perf_counter()
        cached = model.encode_image(pixels).half()  # what the cache stores
        encoder_seconds = time.perf_counter() - start
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-5, betas=(0.9, 0.98), weight_decay=0.05)
    seconds = interleaved_wall_and_cpu(
        {"pixels": step_function(model, captions, optimizer, pixels=pixels),
         "feature_cache": step_function(model, captions, optimizer, image_features=cached)},
        args.repeats, progress)
    blocks = len(model.vision.vit.blocks)  # the EVA towers run depth - 1 blocks (penultimate output)
    return {
        "model": name, "overrides": overrides, "encoder_blocks": blocks, "batch": args.batch,
        "seconds_per_step": seconds["wall"], "cpu_seconds_per_step": seconds["cpu"],
        "encoder_forward_seconds": encoder_seconds,
        "speedup": seconds["wall"]["pixels"] / seconds["wall"]["feature_cache"],
        "speedup_cpu": seconds["cpu"]["pixels"] / seconds["cpu"]["feature_cache"],
    }


# -- memory per rank ------------------------------------------------------------------------------


def run_memory(args: argparse.Namespace, workdir: Path, progress: Any) -> dict[str, Any]:
    vocabulary = write_vocabulary(workdir / "vocab")
    results: dict[str, Any] = {}
    for stage in (0, 2, 3):
        out = workdir / f"memory-zero{stage}"
        out.mkdir()
        environment = {key: value for key, value in os.environ.items()
                       if key not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                   "--master_port", str(_free_port()), "-m", "benchmarks.train_memory_worker",
                   "--zero", str(stage), "--out", str(out), "--vocab", str(vocabulary),
                   "--batch", str(max(1, args.batch // 2))] + (["--small"] if args.small else [])
        finished = subprocess.run(command, capture_output=True, text=True, env=environment)
        if finished.returncode != 0:
            raise RuntimeError(f"ZeRO-{stage} memory run failed:\n{finished.stderr[-4000:]}")
        results[f"zero{stage}"] = [json.loads((out / f"rank-{rank}.json").read_text()) for rank in range(2)]
        progress.update(1)
    return results


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# -- the run --------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.batch is None:
        args.batch = 2 if args.small else 16
    if args.repeats is None:
        args.repeats = 1 if args.small else 3
    parts = [part.strip() for part in args.parts.split(",") if part.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise SystemExit(f"--parts: unknown part(s) {unknown}; choose from {list(PARTS)}")
    calls = {"stage1": 2 * (args.repeats + 1), "cache": 2 * (args.repeats + 1),
             "stage2": 4 * (args.repeats + 1), "memory": 3,
             "itm_kv": (2 if args.small else 2 * len(ITM_KV_SIZES)) * (args.repeats + 1) + 1,
             "stage2_cache": 2 * (args.repeats + 1)}
    progress = tqdm(total=sum(calls[p] for p in parts), desc="train benchmark", unit="step")
    runners = {"stage1": run_stage1, "cache": run_cache, "stage2": run_stage2, "memory": run_memory,
               "itm_kv": run_itm_kv, "stage2_cache": run_stage2_cache}
    result: dict[str, Any] = {"benchmark": "train", "environment": describe(), "load_average_start": os.getloadavg(),
                              "settings": {"small": args.small, "batch": args.batch, "repeats": args.repeats,
                                           "parts": parts}}
    for part in parts:
        with tempfile.TemporaryDirectory() as workdir:
            result[part] = runners[part](args, Path(workdir), progress)
    progress.close()
    result["load_average_end"] = os.getloadavg()
    name = f"train-{'small' if args.small else 'full'}-b{args.batch}-{'+'.join(parts)}"
    path = write_result(name, result, args.output_dir)
    print(format_report(result))
    print(f"written to {path}")
    return result


def format_report(result: dict[str, Any]) -> str:
    lines = []
    if "stage1" in result:
        s = result["stage1"]
        lines.append(f"stage-1 step ({s['model']}, batch {result['settings']['batch']}, {s['image_tokens']}x"
                     f"{s['image_width']} image tokens, {s['text_tokens']} text tokens): fp32 "
                     f"{s['seconds_per_step']['fp32']:.2f} s, policy ({s['policy']}) "
                     f"{s['seconds_per_step']['policy']:.2f} s ({s['policy_speedup']:.2f}x)")
        for phase, seconds in s["profile_fp32"]["phases_seconds"].items():
            lines.append(f"  {phase:<32}{seconds:>8.2f} s")
    if "cache" in result:
        c = result["cache"]
        lines.append(f"feature cache: pixels {c['seconds_per_step']['pixels']:.2f} s, cached "
                     f"{c['seconds_per_step']['feature_cache']:.2f} s per step ({c['speedup']:.2f}x)")
    if "stage2" in result:
        s = result["stage2"]
        lines.append("stage-2 step: " + ", ".join(f"{k} {v:.2f} s" for k, v in s["seconds_per_step"].items()))
        lines.append(f"  blip2kit vs transformers: fp32 {s['speedup_fp32']:.2f}x, policy vs fp32 "
                     f"{s['speedup_policy_vs_transformers_fp32']:.2f}x, policy vs bf16 "
                     f"{s['speedup_policy_vs_transformers_bf16']:.2f}x")
    if "itm_kv" in result:
        for size, r in result["itm_kv"].items():
            lines.append(f"stage-1 step, {size} Q-Former ({r['qformer']['hidden_size']} x {r['qformer']['num_layers']}): "
                         f"ITM K/V reused {r['seconds_per_step']['reuse']:.2f} s, recomputed "
                         f"{r['seconds_per_step']['recompute']:.2f} s ({r['speedup']:.2f}x); CPU time "
                         f"{r['cpu_seconds_per_step']['reuse']:.2f} vs {r['cpu_seconds_per_step']['recompute']:.2f} s "
                         f"({r['speedup_cpu']:.2f}x)")
            for op in r.get("top_ops_reuse", []):
                lines.append(f"  {op['op']:<40}{op['self_cpu_ms']:>10.1f} ms {op['share']:>6.1%}")
    if "stage2_cache" in result:
        c = result["stage2_cache"]
        lines.append(f"stage-2 step ({c['model']}, {c['encoder_blocks']} encoder blocks): pixels "
                     f"{c['seconds_per_step']['pixels']:.2f} s, feature cache "
                     f"{c['seconds_per_step']['feature_cache']:.2f} s ({c['speedup']:.2f}x; CPU time "
                     f"{c['speedup_cpu']:.2f}x); encoder forward "
                     f"{c['encoder_forward_seconds']:.2f} s")
    if "memory" in result:
        lines.append("memory per rank (2 processes), MiB: parameters held, optimizer state + fp32 partitions, peak RSS")
        for stage, ranks in result["memory"].items():
            for rank in ranks:
                lines.append(f"  {stage:<6} rank {rank['rank']}  {rank['parameter_bytes'] / 2**20:9.1f} "
                             f"{rank['optimizer_bytes'] / 2**20:9.1f} {rank['peak_rss_bytes'] / 2**20:9.1f}")
    return "\n".join(lines)
