"""What the precision policy changes: losses and logits under bf16 (or fp16) against fp32.

Builds a model in fp32, copies it under the policy (same weights, frozen towers rounded to half),
and compares, in eval mode: the stage-2 loss, the LLM's logits after the soft prompt (largest
absolute difference, relative to the largest logit, and the share of positions whose argmax
agrees), and the stage-1 ITC and ITG losses. ``--size mid`` uses the speed suite's bench config.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path
from typing import Any

import torch

from benchmarks.environment import RESULTS, describe, write_result

CAPTIONS = ["a photo of a red circle on a blue square", "two cats laying on a couch next to a remote",
            "a green triangle above a small yellow circle", "a man riding a horse on the beach at sunset"]
BERT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted({w for c in CAPTIONS for w in c.split()})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", choices=["tiny", "mid"], default="tiny")
    parser.add_argument("--precision", default="half", help="the policy to compare with fp32 (default: half)")
    parser.add_argument("--output-dir", type=Path, default=RESULTS, help="where the JSON goes")


def _compositions(size: str) -> dict[str, tuple[str, dict[str, Any]]]:
    from benchmarks.speed import BENCH_OPT

    if size == "tiny":
        return {"stage2 opt": ("vit_tiny+qformer_tiny+opt_tiny", {}),
                "stage2 flant5": ("vit_tiny+qformer_tiny+flant5_tiny", {}),
                "stage1": ("vit_tiny+qformer_tiny", {})}
    return {"stage2 opt": ("vit_g+qformer+opt_2.7b", {"vision": {"depth": 6}, "language": dict(BENCH_OPT)}),
            "stage1": ("vit_g+qformer", {"vision": {"depth": 6}})}


@torch.no_grad()
def compare(name: str, overrides: dict[str, Any], precision: str, workdir: Path) -> dict[str, Any]:
    from blip2kit.core import build_model
    from blip2kit.plugins.language.testing import make_opt_tokenizer, make_t5_tokenizer

    overrides = copy.deepcopy(overrides)
    if "opt" in name:
        overrides.setdefault("language", {})["tokenizer"] = str(workdir / "opt")
        make_opt_tokenizer(workdir / "opt")
    elif "flant5" in name:
        overrides.setdefault("language", {})["tokenizer"] = str(workdir / "t5")
        make_t5_tokenizer(workdir / "t5")
    else:
        (workdir / "vocab.txt").write_text("\n".join(BERT_VOCAB) + "\n")
        overrides["bridge"] = {"tokenizer": str(workdir), "vocab_size": len(BERT_VOCAB) + 1}  # + [DEC]
    torch.manual_seed(0)
    full = build_model(name, precision="fp32", **overrides).eval()
    half = copy.deepcopy(full).set_precision(precision).eval()
    size = full.vision.image_size
    pixels = torch.randn(len(CAPTIONS), 3, size, size, generator=torch.Generator().manual_seed(1))
    result: dict[str, Any] = {"model": name, "precision": half.precision}
    if full.language is None:
        losses = {}
        for label, model in (("fp32", full), ("policy", half)):
            losses[label] = {k: v.item() for k, v in
                             model(pixels, CAPTIONS, generator=torch.Generator().manual_seed(3)).items()}
        for key in ("loss_itc", "loss_itg"):
            result[key] = {"fp32": losses["fp32"][key], "policy": losses["policy"][key],
                           "abs_diff": abs(losses["fp32"][key] - losses["policy"][key])}
        return result
    if hasattr(full.language, "rng"):
        full.language.rng.seed(3)
        half.language.rng.seed(3)
    loss_full = full(pixels, CAPTIONS)["loss"].item()
    loss_half = half(pixels, CAPTIONS)["loss"].item()
    result["loss"] = {"fp32": loss_full, "policy": loss_half, "abs_diff": abs(loss_full - loss_half)}
    logits = []
    for model in (full, half):
        prefix, prefix_mask = model.soft_prompt(pixels)
        tokens = model.language.tokenizer(CAPTIONS, return_tensors="pt", padding="longest")
        tokens = {"input_ids": tokens.input_ids, "attention_mask": tokens.attention_mask}
        embeds, mask = model.language.prepend_soft_prompt(prefix, prefix_mask, tokens)
        extra = {"decoder_input_ids": tokens["input_ids"]} if model.language.is_encoder_decoder else {}
        logits.append(model.language.model(inputs_embeds=embeds, attention_mask=mask, **extra).logits.float())
    difference = (logits[0] - logits[1]).abs()
    result["logits"] = {
        "max_abs_diff": difference.max().item(),
        "mean_abs_diff": difference.mean().item(),
        "max_abs_fp32": logits[0].abs().max().item(),
        "argmax_agreement": (logits[0].argmax(-1) == logits[1].argmax(-1)).float().mean().item(),
    }
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    results = {}
    with tempfile.TemporaryDirectory() as workdir:
        for label, (name, overrides) in _compositions(args.size).items():
            results[label] = compare(name, overrides, args.precision, Path(workdir))
            print(label, results[label])
    result = {"benchmark": "precision_effect", "environment": describe(),
              "settings": {"size": args.size, "precision": args.precision}, "results": results}
    path = write_result(f"precision_effect-{args.size}", result, args.output_dir)
    print(f"written to {path}")
    return result
