"""Speed suite: blip2kit against transformers' Blip2ForConditionalGeneration on the same weights.

Rows: encode + Q-Former (+ projection, the soft prompt; images/s), greedy generation and 5-beam
captioning (new tokens/s), a stage-2 training step with AdamW over what trains (samples/s), and the
peak memory of each. Columns: transformers fp32, transformers bf16 (the whole model cast, its
fastest simple setting), blip2kit fp32 and blip2kit under its default precision policy (frozen
towers in half precision, fp32 master weights for the Q-Former and projection under autocast).

All four run in one process on the same weights and inputs. Timings are interleaved (one call of
each column in turn, then again) so machine noise hits every column alike; each cell is the median
of ``--repeats`` calls after ``--warmup`` untimed rounds. Outputs are checked to agree: soft prompts
and losses as the largest difference from blip2kit fp32, generations as the share of identical
sequences. The machine's fp32 and bf16 matmul peak is measured in the same run, and encoding's
achieved FLOP/s is reported as a fraction of the peak of its dtype.

The bench config (default): ViT 1408 wide x 6 layers at 224 px, the full Q-Former, OPT 768 x 12
with OPT's 50272-token vocabulary; ``--small`` runs the tiny components (CI runs it end to end).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from benchmarks.environment import RESULTS, describe, write_result

COLUMNS = ("transformers fp32", "transformers bf16", "blip2kit fp32", "blip2kit policy")
ROWS = ("encode", "greedy", "beam5", "train_step")
ROW_TITLES = {
    "encode": "encode + Q-Former (img/s)",
    "greedy": "greedy generation (new tok/s)",
    "beam5": "5-beam captioning (new tok/s)",
    "train_step": "stage-2 training step, AdamW (samples/s)",
}

# ViT 1408 x 6 layers, full Q-Former, OPT 768 x 12 (the bench config).
BENCH_OPT = {
    "vocab_size": 50272, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
    "ffn_dim": 3072, "max_position_embeddings": 2048, "word_embed_proj_dim": 768,
}
CAPTIONS = (
    "a photo of a red circle on a blue square",
    "two cats laying on a couch next to a remote",
    "a green triangle above a small yellow circle",
    "a man riding a horse on the beach at sunset",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--small", action="store_true", help="tiny components and sizes (CI)")
    parser.add_argument("--batch", type=int, default=None, help="images per batch (8; 2 with --small)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per cell (5; 1 with --small)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed rounds first, at least 1 (its outputs are compared, its memory measured)")
    parser.add_argument("--new-tokens", type=int, default=None,
                        help="tokens each generation adds (exactly; 20; 3 with --small)")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {ROWS}")
    parser.add_argument("--columns", default=",".join(COLUMNS),
                        help="comma-separated subset of the columns (e.g. the fp32 ones where the CPU has "
                             "no native bf16 matmul and half precision runs on a slow fallback)")
    parser.add_argument("--output-dir", type=Path, default=RESULTS, help="where the JSON and plot go")


# -- measuring ------------------------------------------------------------------------------------


def interleaved_times(
    steps: dict[str, Callable[[], Any]], repeats: int, warmup: int, progress: Any
) -> dict[str, list[float]]:
    """Seconds of each step, called in turn (a, b, c, a, b, c, ...) after ``warmup`` rounds."""
    for _ in range(warmup):
        for step in steps.values():
            step()
            progress.update(1)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
            progress.update(1)
    return times


def _status_kib(field_name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_working_memory(step: Callable[[], Any]) -> tuple[Any, int | None]:
    """``step()``'s result, and the bytes by which the process's resident set grew at its peak
    while it ran (Linux: the peak is reset through /proc/self/clear_refs after freed memory is
    returned to the OS). None where the kernel does not offer that."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return step(), None
    before = _status_kib("VmRSS")
    output = step()
    peak = _status_kib("VmHWM")
    if before is None or peak is None:
        return output, None
    return output, max(0, peak - before) * 1024


def tensor_bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def matmul_peak(dtype: torch.dtype, size: int, repeats: int = 5) -> float:
    """Best FLOP/s of a square matmul of ``size`` in ``dtype`` on this machine (CPU threads)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


# -- the four implementations ---------------------------------------------------------------------


@dataclass
class Column:
    """One implementation under test: what each row calls, and its resident state."""

    name: str
    encode: Callable[[torch.Tensor], torch.Tensor]
    generate: Callable[[torch.Tensor, int, int], list[str]]
    train_step: Callable[[torch.Tensor], float]
    loss: Callable[[torch.Tensor], float]
    resident: Callable[[], int]
    extra: dict[str, Any] = field(default_factory=dict)


def _adamw(parameters: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    # The paper's optimiser settings; foreach keeps it vectorised on CPU for both sides.
    return torch.optim.AdamW(parameters, lr=1e-5, betas=(0.9, 0.98), weight_decay=0.05)


def blip2kit_column(name: str, model: Any, captions: list[str]) -> Column:
    optimizer = _adamw(model.trainable_parameters())

    @torch.inference_mode()
    def encode(pixels: torch.Tensor) -> torch.Tensor:
        return model.soft_prompt(pixels)[0]

    def generate(pixels: torch.Tensor, beams: int, new_tokens: int) -> list[str]:
        model.eval()
        return model.generate(pixels, num_beams=beams, max_new_tokens=new_tokens, min_new_tokens=new_tokens)

    def train_step(pixels: torch.Tensor) -> float:
        model.train()
        loss = model(pixels, captions)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    @torch.no_grad()
    def loss(pixels: torch.Tensor) -> float:
        model.eval()
        return model(pixels, captions)["loss"].item()

    def resident() -> int:
        state = [v for s in optimizer.state.values() for v in s.values()]
        return tensor_bytes(model.parameters()) + tensor_bytes(model.buffers()) + tensor_bytes(state)

    return Column(name, encode, generate, train_step, loss, resident,
                  extra={"vision_tower": model.vision})


def transformers_column(name: str, hf: Any, tokenizer: Any, captions: list[str], newline_id: int) -> Column:
    """transformers' Blip2ForConditionalGeneration, fed the same ids blip2kit builds for OPT."""
    config = hf.config
    queries = config.num_query_tokens
    image_token = config.image_token_index
    for module in (hf.vision_model, hf.language_model):
        module.requires_grad_(False)
    trainable = [p for p in hf.parameters() if p.requires_grad]  # Q-Former, queries, projection
    optimizer = _adamw(trainable)

    tokenizer.padding_side = "right"
    text = tokenizer([c + "\n" for c in captions], return_tensors="pt", padding="longest")
    batch = len(captions)
    input_ids = torch.cat([torch.full((batch, queries), image_token), text.input_ids], dim=1)
    attention_mask = torch.cat([torch.ones(batch, queries, dtype=torch.long), text.attention_mask], dim=1)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :queries] = -100

    def set_mode(training: bool) -> None:
        hf.train(training)
        hf.vision_model.eval()  # frozen ViT in eval mode, as LAVIS and blip2kit

    @torch.inference_mode()
    def encode(pixels: torch.Tensor) -> torch.Tensor:
        return hf.get_image_features(pixel_values=pixels.to(hf.dtype)).pooler_output

    @torch.inference_mode()
    def generate(pixels: torch.Tensor, beams: int, new_tokens: int) -> list[str]:
        set_mode(False)
        output = hf.generate(
            pixel_values=pixels.to(hf.dtype), num_beams=beams, max_new_tokens=new_tokens,
            min_new_tokens=new_tokens, eos_token_id=newline_id, pad_token_id=tokenizer.pad_token_id,
        )
        new = output[:, queries + 1:]  # after the image tokens and BOS
        return [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]

    def forward_loss(pixels: torch.Tensor) -> torch.Tensor:
        return hf(pixel_values=pixels.to(hf.dtype), input_ids=input_ids, attention_mask=attention_mask,
                  labels=labels).loss

    def train_step(pixels: torch.Tensor) -> float:
        set_mode(True)
        loss = forward_loss(pixels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    @torch.no_grad()
    def loss(pixels: torch.Tensor) -> float:
        set_mode(False)
        return forward_loss(pixels).float().item()

    def resident() -> int:
        state = [v for s in optimizer.state.values() for v in s.values()]
        return tensor_bytes(hf.parameters()) + tensor_bytes(hf.buffers()) + tensor_bytes(state)

    # vision_model includes post_layernorm (blip2kit's ln_vision, in its bridge): one LayerNorm.
    return Column(name, encode, generate, train_step, loss, resident,
                  extra={"vision_tower": hf.vision_model})


def build_columns(args: argparse.Namespace, workdir: Path) -> tuple[dict[str, Column], Any, dict[str, Any]]:
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    from blip2kit.core import build_model
    from blip2kit.core.checkpoints import export_state, hf_config_of
    from blip2kit.plugins.language.testing import make_opt_tokenizer

    tokenizer = make_opt_tokenizer(workdir / "tokenizer")
    torch.manual_seed(0)
    if args.small:
        name, overrides = "vit_tiny+qformer_tiny+opt_tiny", {}
    else:
        name = "vit_g+qformer+opt_2.7b"
        overrides = {"vision": {"depth": 6}, "language": dict(BENCH_OPT)}
    ours = build_model(name, precision="fp32", bridge={"ln_vision_eps": 1e-6}, **overrides)
    # Every id the random LM may produce decodes to a token of its own, so outputs compare as text.
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(ours.language.vocab_size - len(tokenizer))])
    ours.language.tokenizer = tokenizer
    _spread_weights(ours)
    ours.eval()

    hf = Blip2ForConditionalGeneration(Blip2Config(**hf_config_of(ours)))
    missing, unexpected = hf.load_state_dict(export_state(ours, "hf"), strict=False)
    missing = [key for key in missing if not key.endswith("lm_head.weight")]  # tied to the embeddings
    if missing or unexpected:
        raise RuntimeError(f"the exported weights do not fit transformers: missing {missing}, unexpected {unexpected}")
    hf.tie_weights()
    hf.eval()

    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(args.batch)]
    newline = ours.language.newline_token_id
    makers = {
        "transformers fp32": lambda: transformers_column("transformers fp32", hf, tokenizer, captions, newline),
        "transformers bf16": lambda: transformers_column(
            "transformers bf16", copy.deepcopy(hf).to(torch.bfloat16), tokenizer, captions, newline),
        "blip2kit fp32": lambda: blip2kit_column("blip2kit fp32", ours, captions),
        "blip2kit policy": lambda: blip2kit_column(
            "blip2kit policy", copy.deepcopy(ours).set_precision("half"), captions),
    }
    columns = {name: makers[name]() for name in args.column_list}
    config = {"model": name, "overrides": overrides, "policy": "half (bf16 on CPU)",
              "image_size": ours.vision.image_size, "image_tokens": ours.vision.num_tokens}
    return columns, ours, config


@torch.no_grad()
def _spread_weights(model: Any) -> None:
    """Wider random weights than the init (std 0.02 everywhere gives near-constant outputs, where
    any rounding flips a greedy choice and comparisons say nothing)."""
    generator = torch.Generator().manual_seed(1)
    for name, parameter in model.named_parameters():
        if name.startswith("language.") or "norm" in name or name.endswith("bias"):
            continue
        parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))


# -- the run --------------------------------------------------------------------------------------


def _settings(args: argparse.Namespace) -> None:
    small = args.small
    defaults = {"batch": 2 if small else 8, "repeats": 1 if small else 5, "warmup": 1,
                "new_tokens": 3 if small else 20}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    rows = [row.strip() for row in args.rows.split(",") if row.strip()]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        raise SystemExit(f"--rows: unknown row(s) {unknown}; choose from {list(ROWS)}")
    args.row_list = [row for row in ROWS if row in rows]
    columns = [c.strip() for c in args.columns.split(",") if c.strip()]
    unknown = sorted(set(columns) - set(COLUMNS))
    if unknown or "blip2kit fp32" not in columns:
        raise SystemExit(f"--columns: choose from {list(COLUMNS)}, including 'blip2kit fp32' (the "
                         f"reference outputs are compared with); got unknown {unknown}")
    args.column_list = [c for c in COLUMNS if c in columns]
    if args.warmup < 1:
        raise SystemExit("--warmup: at least 1 (the first round's outputs are compared and its memory measured)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    import tempfile

    from torch.utils.flop_counter import FlopCounterMode
    from tqdm import tqdm

    _settings(args)
    with tempfile.TemporaryDirectory() as workdir:
        columns, reference_model, model_config = build_columns(args, Path(workdir))
    size = model_config["image_size"]
    pixels = torch.randn(args.batch, 3, size, size, generator=torch.Generator().manual_seed(2))

    # 1024 is large enough to reach the fp32 peak on CPU and small enough for a CPU whose bf16
    # matmul has no native path (AVX2 only: ~40x slower than fp32) to finish.
    matmul_size = 256 if args.small else 1024
    peaks = {"fp32": matmul_peak(torch.float32, matmul_size, repeats=3),
             "bf16": matmul_peak(torch.bfloat16, matmul_size, repeats=3),
             "cpu_capability": torch.backends.cpu.get_cpu_capability()}

    with FlopCounterMode(display=False) as counter:
        columns["blip2kit fp32"].encode(pixels)
    encode_flops = counter.get_total_flops()
    tag = "small" if args.small else f"b{args.batch}"
    total = len(args.row_list) * len(columns) * (args.repeats + args.warmup)
    progress = tqdm(total=total, desc="speed", unit="call")
    rows: dict[str, Any] = {}
    agreement: dict[str, Any] = {}
    memory: dict[str, Any] = {}
    for row in args.row_list:
        if row == "encode":
            steps = {name: (lambda c=c: c.encode(pixels)) for name, c in columns.items()}
            work = args.batch
        elif row in ("greedy", "beam5"):
            beams = 1 if row == "greedy" else 5
            steps = {name: (lambda c=c: c.generate(pixels, beams, args.new_tokens)) for name, c in columns.items()}
            work = args.batch * args.new_tokens
        else:
            # The loss before any update, in eval mode (no dropout), is what the columns compare.
            losses = {name: c.loss(pixels) for name, c in columns.items()}
            agreement[row] = {name: abs(value - losses["blip2kit fp32"]) for name, value in losses.items()}
            agreement[row + "_loss"] = losses
            steps = {name: (lambda c=c: c.train_step(pixels)) for name, c in columns.items()}
            work = args.batch
        # The first warm-up round gives the outputs to compare and each column's peak memory.
        outputs, memory[row] = {}, {}
        for name, step in steps.items():
            outputs[name], working = peak_working_memory(step)
            resident = columns[name].resident()
            memory[row][name] = {"resident_bytes": resident, "working_bytes": working,
                                 "peak_bytes": None if working is None else resident + working}
            progress.update(1)
        if row == "encode":
            agreement[row] = {name: (out.float() - outputs["blip2kit fp32"].float()).abs().max().item()
                              for name, out in outputs.items()}
        elif row in ("greedy", "beam5"):
            agreement[row] = {name: sum(a == b for a, b in zip(out, outputs["blip2kit fp32"])) / len(out)
                              for name, out in outputs.items()}
        times = interleaved_times(steps, args.repeats, args.warmup - 1, progress)
        rows[row] = {}
        for name, seconds in times.items():
            median = statistics.median(seconds)
            rows[row][name] = {"per_second": work / median, "median_seconds": median, "seconds": seconds}
        # A partial result after each row, so an interrupted run still leaves what it measured.
        write_result(f"speed-{tag}", summarise(args, model_config, peaks, encode_flops, rows, agreement, memory,
                                               complete=False), args.output_dir)
    progress.close()
    result = summarise(args, model_config, peaks, encode_flops, rows, agreement, memory, complete=True)
    path = write_result(f"speed-{tag}", result, args.output_dir)
    plot = _plot(result, path.with_suffix(".png"))
    print(format_table(result))
    print(f"written to {path} and {plot}")
    del reference_model
    return result


def summarise(
    args: argparse.Namespace,
    model_config: dict[str, Any],
    peaks: dict[str, float],
    encode_flops: int,
    rows: dict[str, Any],
    agreement: dict[str, Any],
    memory: dict[str, Any],
    *,
    complete: bool,
) -> dict[str, Any]:
    """The result document: rates, ratios against both transformers columns, agreement, memory."""
    ratios = {
        row: {
            f"{name} / {base}": rows[row][name]["per_second"] / rows[row][base]["per_second"]
            for name in ("blip2kit fp32", "blip2kit policy")
            for base in ("transformers fp32", "transformers bf16")
            if name in rows[row] and base in rows[row]
        }
        for row in rows
    }
    utilisation: dict[str, Any] = {"encode_flops": encode_flops}
    for name, cell in rows.get("encode", {}).items():
        dtype = "fp32" if name.endswith("fp32") else "bf16"
        achieved = encode_flops / cell["median_seconds"]
        utilisation[name] = {"flop_per_s": achieved, "peak_dtype": dtype, "fraction_of_peak": achieved / peaks[dtype]}
    return {
        "benchmark": "speed",
        "complete": complete,
        "environment": {**describe(), "load_average": _load_average()},
        "settings": {key: getattr(args, key) for key in ("small", "batch", "repeats", "warmup", "new_tokens")},
        "model": model_config,
        "matmul_peak_flop_per_s": peaks,
        "columns": list(args.column_list),
        "rows": rows,
        "ratios": ratios,
        "agreement": agreement,
        "encode_utilisation": utilisation,
        "peak_memory": memory,
    }


def _load_average() -> list[float] | None:
    try:
        import os

        return list(os.getloadavg())
    except OSError:
        return None


def format_table(result: dict[str, Any]) -> str:
    """The rows x columns table (per-second rates) with blip2kit's ratios, as Markdown."""
    columns = result["columns"]
    ratio_names = [name for name in ("blip2kit policy / transformers fp32", "blip2kit policy / transformers bf16",
                                     "blip2kit fp32 / transformers fp32", "blip2kit fp32 / transformers bf16")
                   if any(name in ratios for ratios in result["ratios"].values())]
    short = {name: name.replace("blip2kit ", "").replace("transformers", "tf") for name in ratio_names}
    lines = ["| work | " + " | ".join(columns + [short[n] for n in ratio_names]) + " |",
             "|---" * (1 + len(columns) + len(ratio_names)) + "|"]
    for row, cells in result["rows"].items():
        values = [f"{cells[c]['per_second']:.2f}" for c in columns]
        values += [f"{result['ratios'][row][n]:.2f}x" for n in ratio_names]
        lines.append(f"| {ROW_TITLES[row]} | " + " | ".join(values) + " |")
    for row, cells in result["peak_memory"].items():
        values = ["n/a" if cells[c]["peak_bytes"] is None else f"{cells[c]['peak_bytes'] / 2**20:.0f}" for c in columns]
        lines.append(f"| peak memory, {row} (MiB) | " + " | ".join(values + [""] * len(ratio_names)) + " |")
    peaks = result["matmul_peak_flop_per_s"]
    util = result["encode_utilisation"]
    notes = [f"matmul peak ({peaks.get('cpu_capability', '')}): fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s, "
             f"bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s"]
    if any(c in util for c in columns):
        notes.append("encode at " + ", ".join(
            f"{name} {util[name]['fraction_of_peak']:.0%} of {util[name]['peak_dtype']} peak"
            for name in columns if name in util))
    return "\n".join(lines + [""] + notes)


def _plot(result: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(result["rows"])
    columns = result["columns"]
    base = "transformers fp32" if "transformers fp32" in columns else "blip2kit fp32"
    figure, axis = plt.subplots(figsize=(2.2 * len(rows) + 2, 4))
    width = 0.8 / len(columns)
    for index, column in enumerate(columns):
        speedups = [result["rows"][row][column]["per_second"] / result["rows"][row][base]["per_second"]
                    for row in rows]
        axis.bar([r + index * width for r in range(len(rows))], speedups, width, label=column)
    axis.set_xticks([r + 0.4 - width / 2 for r in range(len(rows))], [ROW_TITLES[r].split(" (")[0] for r in rows],
                    fontsize=8)
    axis.axhline(1.0, color="grey", linewidth=0.8)
    axis.set_ylabel(f"speed relative to {base}")
    env = result["environment"]
    axis.set_title(f"blip2kit vs transformers ({env['device']}, {env['cpu_threads']} threads)", fontsize=9)
    axis.legend(fontsize=8)
    figure.tight_layout()
    partial = path.with_suffix(".tmp.png")
    figure.savefig(partial, dpi=120)
    plt.close(figure)
    partial.replace(path)
    return path
