"""One rank of ``benchmarks train``'s memory part: build a stage-1 model through blip2kit's
DeepSpeed engine under a ZeRO stage, take two steps on cached-feature batches, and write the
tensor bytes this rank holds and its peak RSS to ``OUT/rank-R.json``."""

from __future__ import annotations

import argparse
import json
import resource
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--zero", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--vocab", required=True)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--small", action="store_true")
    args = parser.parse_args()

    from blip2kit.core.config import config_from_dict
    from blip2kit.core.training.engine import deepspeed_config, init_distributed, initialize_engine
    from blip2kit.core.training.loop import build_training_model

    if args.small:
        model, overrides, words = "vit_tiny+qformer_tiny", {"bridge": {"tokenizer": args.vocab}}, 6
    else:
        model = "vit_g+qformer"
        overrides = {"vision": {"depth": 1}, "bridge": {"tokenizer": args.vocab, "max_text_length": 32}}
        words = 30
    config = config_from_dict({
        "model": model, "model_overrides": overrides, "precision": "fp32", "output_dir": str(args.out),
        "data": {"train": [{"format": "jsonl", "path": "unused.jsonl"}]},  # batches are made below
        "train": {"batch_size": args.batch, "max_steps": 2, "warmup_steps": 1},
        "deepspeed": {"zero_stage": args.zero},
    })
    distributed = init_distributed()
    network = build_training_model(config, distributed.device)
    engine = initialize_engine(network, config, deepspeed_config(config, distributed.world_size))
    from benchmarks.train import captions_of

    captions = captions_of(args.batch, words)
    features = torch.randn(args.batch, network.vision.num_tokens, network.vision.width)
    for _ in range(2):
        loss = engine(text_input=captions, image_features=features)["loss"]
        engine.backward(loss)
        engine.step()

    def nbytes(tensor: torch.Tensor) -> int:
        return tensor.numel() * tensor.element_size()

    own = {id(p) for p in network.parameters()}
    parameter_bytes = sum(nbytes(p.ds_tensor) if hasattr(p, "ds_tensor") else nbytes(p) for p in network.parameters())
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO wraps the client AdamW
    state = [v for s in inner.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    masters = [p for group in inner.param_groups for p in group["params"] if id(p) not in own]
    trainable = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in network.parameters() if p.requires_grad)
    record = {
        "rank": distributed.rank, "zero_stage": args.zero, "trainable_parameters": trainable,
        "parameter_bytes": parameter_bytes,
        "optimizer_bytes": sum(nbytes(t) for t in state) + sum(nbytes(p) for p in masters),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    (args.out / f"rank-{distributed.rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
