"""Peak resident memory of loading an HF Blip2 checkpoint in bf16: blip2kit against transformers.

Writes a random ``Blip2ForConditionalGeneration`` checkpoint (fp32 safetensors, as released ones
are) with the bench config (ViT 1408 wide x 6 layers at 224 px, the full Q-Former, OPT 768 x 12;
``--small``: tiny widths), then loads it in a fresh process per loader and reads that process's
peak RSS (``ru_maxrss``):

- ``blip2kit``: ``from_pretrained(dir, precision="bf16")`` (empty build, each tensor read into its
  final dtype; the bridge and projection keep fp32 master weights by the precision policy);
- ``blip2kit_eager``: what ``from_pretrained`` did before (whole model built with random fp32
  weights, whole file read, copied in, then cast), for comparison;
- ``transformers``: ``Blip2ForConditionalGeneration.from_pretrained(dir, dtype=torch.bfloat16)``
  (everything bf16, the Q-Former too).

Each row also gives the peak after the imports (before loading) and the bytes the loaded model's
tensors hold. One torch thread; the checkpoint is written once and kept with ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.environment import RESULTS, describe, write_result

LOADERS = ("blip2kit", "blip2kit_eager", "transformers")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--small", action="store_true", help="tiny widths (CI)")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="directory of the random HF checkpoint (written if missing; default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint written to a temp dir")
    parser.add_argument("--loaders", default=",".join(LOADERS), help=f"comma-separated subset of {LOADERS}")
    parser.add_argument("--output-dir", type=Path, default=RESULTS, help="where the JSON goes")


def blip2_config(small: bool) -> dict[str, Any]:
    """Blip2Config fields of the bench (or tiny) checkpoint."""
    if small:
        return {"vision_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                  "num_attention_heads": 4, "image_size": 28, "patch_size": 14},
                "qformer_config": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                                   "intermediate_size": 64, "encoder_hidden_size": 64},
                "text_config": {"model_type": "opt", "vocab_size": 512, "hidden_size": 48,
                                "num_hidden_layers": 2, "num_attention_heads": 4, "ffn_dim": 96,
                                "word_embed_proj_dim": 48},
                "num_query_tokens": 8, "image_token_index": 511}
    return {"vision_config": {"hidden_size": 1408, "intermediate_size": 6144, "num_hidden_layers": 6,
                              "num_attention_heads": 16, "image_size": 224, "patch_size": 14},
            "qformer_config": {"encoder_hidden_size": 1408},
            "text_config": {"model_type": "opt", "vocab_size": 50272, "hidden_size": 768,
                            "num_hidden_layers": 12, "num_attention_heads": 12, "ffn_dim": 3072,
                            "max_position_embeddings": 2048, "word_embed_proj_dim": 768},
            "num_query_tokens": 32, "image_token_index": 50271}


_WRITE = """
import json, sys, torch
from transformers import Blip2Config, Blip2ForConditionalGeneration
torch.manual_seed(0)
model = Blip2ForConditionalGeneration(Blip2Config(**json.loads(sys.argv[2])))
model.save_pretrained(sys.argv[1])
print(sum(p.numel() for p in model.parameters()))
"""

# Each loader in a fresh interpreter: imports first (their peak is reported apart), then the load.
_LOAD = """
import gc, json, resource, sys, time, torch
torch.set_num_threads(1)
which, directory = sys.argv[1], sys.argv[2]
if which == "transformers":
    from transformers import Blip2ForConditionalGeneration
else:  # the registry and the component modules it imports on first build, as transformers' imports
    from blip2kit.core import from_pretrained
    from blip2kit.core.checkpoints import load_state, read_state
    from blip2kit.core.checkpoints.hf import model_from_hf_config, read_hf_config
    from blip2kit.registry import get_registry
    import blip2kit.plugins.bridges.qformer, blip2kit.plugins.language.opt, blip2kit.plugins.vision.eva_vit
    import timm.models.eva, transformers.models.opt.modeling_opt
    get_registry()
import warnings; warnings.simplefilter("ignore")
gc.collect()
imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
start = time.perf_counter()
if which == "transformers":
    model = Blip2ForConditionalGeneration.from_pretrained(directory, dtype=torch.bfloat16)
elif which == "blip2kit":
    model = from_pretrained(directory, precision="bf16")
else:  # the path before: random fp32 build, whole file read and copied in, then cast
    model = model_from_hf_config(read_hf_config(__import__("pathlib").Path(directory)))
    load_state(model, read_state(directory), "hf")
    model.set_precision("bf16")
seconds = time.perf_counter() - start
tensors = {t.data_ptr(): t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]}
print(json.dumps({"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "peak_rss_after_imports_bytes": imports, "seconds": round(seconds, 2),
                  "model_tensor_bytes": sum(tensors.values()),
                  "params": sum(p.numel() for p in model.parameters())}))
"""


def _python(code: str, *args: str) -> str:
    env_threads = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    completed = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                               env={**os.environ, **env_threads}, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"benchmark child failed ({completed.returncode}):\n{completed.stderr[-3000:]}")
    return completed.stdout.strip().splitlines()[-1]


def run(args: argparse.Namespace) -> dict[str, Any]:
    loaders = [name for name in args.loaders.split(",") if name]
    unknown = sorted(set(loaders) - set(LOADERS))
    if unknown:
        raise SystemExit(f"unknown loaders {unknown}; use a subset of {LOADERS}")
    scratch = None
    directory = args.checkpoint
    if directory is None:
        scratch = Path(tempfile.mkdtemp(prefix="blip2kit-loading-"))
        directory = scratch / "hf"
    config = blip2_config(args.small)
    try:
        written = None
        if not (directory / "config.json").is_file():
            start = time.perf_counter()
            written = int(_python(_WRITE, str(directory), json.dumps(config)))
            print(f"wrote {written:,} parameters to {directory} in {time.perf_counter() - start:.0f} s")
        rows = {}
        for name in loaders:
            rows[name] = json.loads(_python(_LOAD, name, str(directory)))
            gib = rows[name]["peak_rss_bytes"] / 2**30
            print(f"{name:>15}: peak RSS {gib:.2f} GiB ({rows[name]['peak_rss_after_imports_bytes'] / 2**30:.2f} "
                  f"after imports), model tensors {rows[name]['model_tensor_bytes'] / 2**30:.2f} GiB, "
                  f"{rows[name]['seconds']} s")
        file_bytes = sum(path.stat().st_size for path in directory.glob("*.safetensors"))
        result = {
            "benchmark": "loading",
            "environment": describe(),
            "config": "small" if args.small else "bench (ViT 1408 x 6, full Q-Former, OPT 768 x 12)",
            "blip2_config": config,
            "checkpoint_bytes": file_bytes,
            "checkpoint_dtype": "float32",
            "rows": rows,
        }
        path = write_result("loading-small" if args.small else "loading-bench-bf16", result, args.output_dir)
        print(f"wrote {path}")
        return result
    finally:
        if scratch is not None and not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
