"""Q-Former forward (queries cross-attending to ViT-g features): blip2kit vs transformers.

Both run the full-size BLIP-2 Q-Former (12 layers, 768 wide, 32 queries, image width 1408, 257
image tokens) on the same random weights, loaded into blip2kit through its Hugging Face key
conversion. Reports the median time per batch of each, their ratio and the largest difference
between the two outputs (they must agree, or the timing compares different work).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from benchmarks.environment import RESULTS, describe, write_result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, default=8, help="images per batch")
    parser.add_argument("--tokens", type=int, default=257, help="image tokens (257 at 224 px, 677 at 364)")
    parser.add_argument("--repeats", type=int, default=10, help="timed batches per implementation")
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches first")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--output-dir", type=Path, default=RESULTS, help="where the JSON goes")


def _median_seconds(step: Callable[[], Any], repeats: int, warmup: int, label: str) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in tqdm(range(repeats), desc=label, leave=False):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    from blip2kit.plugins.bridges import QFORMER_CONFIG
    from blip2kit.plugins.bridges.qformer import build_qformer

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    reference = Blip2QFormerModel(Blip2QFormerConfig(encoder_hidden_size=1408)).eval().to(dtype)
    query_tokens = torch.randn(1, 32, 768, dtype=dtype) * 0.02
    state = {f"qformer.{k}": v for k, v in reference.state_dict().items()} | {"query_tokens": query_tokens}

    ours = build_qformer({**QFORMER_CONFIG, "encoder_width": 1408}).eval()
    ours.drop_text_branch()
    ours.load_state_dict(ours.convert_external_state(state, "hf").state, strict=False)
    ours.to(dtype)

    image_embeds = torch.randn(args.batch, args.tokens, 1408, dtype=dtype)
    queries = query_tokens.expand(args.batch, -1, -1)

    @torch.inference_mode()
    def step_reference() -> torch.Tensor:
        return reference(query_embeds=queries, encoder_hidden_states=image_embeds).last_hidden_state

    @torch.inference_mode()
    def step_ours() -> torch.Tensor:
        return ours.encode_image(image_embeds).query_output

    max_abs_diff = (step_ours().float() - step_reference().float()).abs().max().item()
    seconds_reference = _median_seconds(step_reference, args.repeats, args.warmup, "transformers")
    seconds_ours = _median_seconds(step_ours, args.repeats, args.warmup, "blip2kit")
    result = {
        "benchmark": "qformer_forward",
        "environment": describe(),
        "settings": {key: getattr(args, key) for key in ("batch", "tokens", "repeats", "warmup", "dtype")},
        "max_abs_diff": max_abs_diff,
        "seconds_per_batch": {"transformers": seconds_reference, "blip2kit": seconds_ours},
        "images_per_second": {
            "transformers": args.batch / seconds_reference,
            "blip2kit": args.batch / seconds_ours,
        },
        "speedup_vs_transformers": seconds_reference / seconds_ours,
    }
    path = write_result(f"qformer_forward-b{args.batch}-t{args.tokens}-{args.dtype}", result, args.output_dir)
    print(f"{'implementation':<14}{'s/batch':>10}{'images/s':>10}")
    for name in ("transformers", "blip2kit"):
        print(f"{name:<14}{result['seconds_per_batch'][name]:>10.4f}{result['images_per_second'][name]:>10.1f}")
    print(f"speedup {result['speedup_vs_transformers']:.2f}x, max abs diff {max_abs_diff:.2e}, written to {path}")
    return result
