"""Beam-search suite: 5-beam captioning, generation alone, blip2kit's beam search against transformers'.

The speed suite's 5-beam row includes encoding the images; here the soft prompts are given (random
query vectors, as many as the Q-Former makes), so the time is the language model's alone: the
prefill of [queries ; prompt] and the decoding steps. Columns, all fp32 on the same weights:

- ``transformers``: transformers' ``generate``, which copies every input to each beam before the
  prefill (``beam_search="transformers"``);
- ``blip2kit``: blip2kit's beam search, prefill once per image, transformers 5's scoring;
- ``blip2kit lavis``: the same with transformers 4.26's scoring (``beam_convention="lavis"``).

Timings are interleaved (one call of each column in turn), medians of ``--repeats`` after
``--warmup`` rounds. Every generation adds exactly ``--new-tokens`` (min = max), so each column
does the same number of steps. The captions are compared: ``blip2kit`` against ``transformers``
(share of identical), and ``blip2kit lavis`` against ``blip2kit`` (how often the conventions pick
different captions).

The bench config (default): OPT 768 x 12 with OPT's 50272-token vocabulary (the speed suite's),
batch 8, 32 queries, the prompt "a photo of"; ``--small`` runs the tiny OPT (CI).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch

from benchmarks.environment import RESULTS, describe, write_result
from benchmarks.speed import BENCH_OPT, _load_average, interleaved_times

COLUMNS = {
    "transformers": {"beam_search": "transformers"},
    "blip2kit": {"beam_search": "blip2kit", "beam_convention": "transformers"},
    "blip2kit lavis": {"beam_search": "blip2kit", "beam_convention": "lavis"},
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--small", action="store_true", help="the tiny OPT and sizes (CI)")
    parser.add_argument("--batch", type=int, default=None, help="images per batch (8; 2 with --small)")
    parser.add_argument("--beams", type=int, default=5, help="beams (5, LAVIS' captioning setting)")
    parser.add_argument("--queries", type=int, default=32, help="soft-prompt vectors per image (32)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per column (5; 1 with --small)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens each caption adds (20; 3 with --small)")
    parser.add_argument("--prompt", default="a photo of", help="the captioning prompt after the queries")
    parser.add_argument("--output-dir", type=Path, default=RESULTS, help="where the JSON goes")


def build_language(small: bool, workdir: Path) -> Any:
    from blip2kit.core import build_component
    from blip2kit.plugins.language.testing import make_opt_tokenizer
    from blip2kit.registry import get_registry

    torch.manual_seed(0)
    if small:
        language = build_component(get_registry().get("language", "opt_tiny"))
    else:
        language = build_component(get_registry().get("language", "opt_2.7b"), dict(BENCH_OPT))
    tokenizer = make_opt_tokenizer(workdir / "tokenizer")
    # Every id the random LM may produce decodes to a token of its own, so captions compare as text.
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(language.vocab_size - len(tokenizer))])
    language.tokenizer = tokenizer
    return language.freeze()


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm import tqdm

    from blip2kit.core.validation import generation_options

    small = args.small
    args.batch = args.batch or (2 if small else 8)
    args.repeats = args.repeats or (1 if small else 5)
    args.new_tokens = args.new_tokens or (3 if small else 20)
    with tempfile.TemporaryDirectory() as workdir:
        language = build_language(small, Path(workdir))
    generator = torch.Generator().manual_seed(2)
    prefix = torch.randn(args.batch, args.queries, language.hidden_size, generator=generator)
    prefix_mask = torch.ones(args.batch, args.queries, dtype=torch.long)
    prompts = [args.prompt] * args.batch
    decoding = {"num_beams": args.beams, "max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens}
    options = {name: generation_options({}, {**decoding, **extra}) for name, extra in COLUMNS.items()}

    def step(name: str):
        return lambda: language.generate(prefix, prefix_mask, prompts, options[name])

    with torch.inference_mode():
        outputs = {name: step(name)() for name in COLUMNS}
        progress = tqdm(total=len(COLUMNS) * (args.warmup - 1 + args.repeats), desc="beam", unit="call")
        times = interleaved_times({name: step(name) for name in COLUMNS}, args.repeats,
                                  max(0, args.warmup - 1), progress)
        progress.close()

    def same(a: list[str], b: list[str]) -> float:
        return sum(x == y for x, y in zip(a, b)) / len(a)

    work = args.batch * args.new_tokens
    cells = {name: {"per_second": work / statistics.median(seconds), "median_seconds": statistics.median(seconds),
                    "seconds": seconds} for name, seconds in times.items()}
    result = {
        "benchmark": "beam",
        "environment": {**describe(), "load_average": _load_average()},
        "settings": {key: getattr(args, key) for key in
                     ("small", "batch", "beams", "queries", "repeats", "warmup", "new_tokens", "prompt")},
        "model": "opt_tiny" if small else {"card": "opt_2.7b", "overrides": BENCH_OPT},
        "rows": {"beam5": cells},
        "ratios": {f"{name} / transformers": cells[name]["per_second"] / cells["transformers"]["per_second"]
                   for name in ("blip2kit", "blip2kit lavis")},
        "agreement": {"blip2kit / transformers": same(outputs["blip2kit"], outputs["transformers"]),
                      "blip2kit lavis / blip2kit": same(outputs["blip2kit lavis"], outputs["blip2kit"])},
    }
    path = write_result(f"beam-{'small' if small else f'b{args.batch}'}", result, args.output_dir)
    print(format_table(result))
    print(f"written to {path}")
    return result


def format_table(result: dict[str, Any]) -> str:
    cells = result["rows"]["beam5"]
    lines = ["| work | " + " | ".join(cells) + " | blip2kit / transformers |", "|---" * (len(cells) + 2) + "|"]
    lines.append(f"| {result['settings']['beams']}-beam captioning, soft prompts given (new tok/s) | "
                 + " | ".join(f"{cell['per_second']:.2f}" for cell in cells.values())
                 + f" | {result['ratios']['blip2kit / transformers']:.2f}x |")
    agreement = result["agreement"]
    lines += ["", f"identical captions: blip2kit vs transformers {agreement['blip2kit / transformers']:.0%}, "
                  f"lavis vs transformers convention {agreement['blip2kit lavis / blip2kit']:.0%}"]
    return "\n".join(lines)
