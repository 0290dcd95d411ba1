"""Crash-safe training checkpoints and exact resume.

``RUN/checkpoints/step-XXXXXXXX/`` holds ``model/`` (trainable weights in the blip2kit format,
loadable by ``from_pretrained``), ``config.yaml`` (the resolved job config), ``deepspeed/``
(optimizer, scheduler and ZeRO partitions of every rank), ``rng/rank-R.*`` (Python, NumPy and
torch RNG states of rank R), ``data/rank-R.json`` (the loader's position) and
``trainer_state.json`` (step, samples, time). Rank 0 stages the directory with
``atomic_directory``; every rank writes into it; it appears under its final name only when all
ranks succeeded, so a kill at any moment leaves the previous checkpoints intact.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


class ResumeError(RuntimeError):
    """A run directory that cannot be resumed; the message says why and what to do."""


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint directories of a run, oldest first (staging leftovers are ignored)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [
        path for path in root.iterdir()
        if _STEP_DIR.match(path.name) and (path / "trainer_state.json").is_file()
    ]
    return sorted(found, key=lambda path: int(_STEP_DIR.match(path.name).group(1)))


def latest_checkpoint_directory(run_dir: str | Path) -> Path:
    """The newest complete ``step-XXXXXXXX`` directory of a run."""
    found = complete_checkpoints(run_dir)
    if not found:
        raise FileNotFoundError(
            f"{str(run_dir)!r} holds no complete checkpoint under {CHECKPOINTS}/; is it a 'blip2kit train' "
            "output_dir, and did the run reach its first save_every?"
        )
    return found[-1]


def latest_checkpoint(run_dir: str | Path) -> Path:
    """The ``model/`` directory (blip2kit format) of a run's newest complete checkpoint; the
    checkpoint package's finder, which ``from_pretrained(run_dir)`` uses too."""
    from blip2kit.core.checkpoints import latest_checkpoint as newest_model_directory

    return newest_model_directory(run_dir)


# -- RNG states ---------------------------------------------------------------------------------


def save_rng_state(directory: Path, rank: int) -> None:
    import numpy as np
    import torch
    from safetensors.torch import save_file

    from blip2kit.core.checkpoints.atomic import atomic_write_json

    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    atomic_write_json(directory / f"rank-{rank}.json", {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(position), int(has_gauss), float(cached_gaussian)],
    })
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    save_file(tensors, str(directory / f"rank-{rank}.safetensors"))


def load_rng_state(directory: Path, rank: int) -> None:
    import numpy as np
    import torch
    from safetensors.torch import load_file

    state_file = directory / f"rank-{rank}.json"
    if not state_file.is_file():
        raise ResumeError(
            f"{directory} has no RNG state of rank {rank}: the checkpoint was written by fewer processes. "
            "Resume with the world size it was saved with for an exact continuation"
        )
    states = json.loads(state_file.read_text())
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached_gaussian = states["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached_gaussian))
    tensors = load_file(str(directory / f"rank-{rank}.safetensors"))
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])


# -- collective save ----------------------------------------------------------------------------


def _all_ranks_succeeded(succeeded: bool) -> bool:
    import torch
    import torch.distributed as dist

    flag = torch.tensor([1 if succeeded else 0], dtype=torch.int32)
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def collective_atomic_directory(target: Path, rank: int, write: Callable[[Path], None]) -> None:
    """Every rank runs ``write(staging)`` into one staging directory that rank 0 made; the
    directory replaces ``target`` only if all of them succeed, else every rank raises."""
    import torch.distributed as dist

    from blip2kit.core.checkpoints.atomic import atomic_directory

    def write_and_agree(staging: Path) -> None:
        error: BaseException | None = None
        try:
            write(staging)
        except Exception as caught:  # the other ranks must still reach the agreement below
            error = caught
        if not _all_ranks_succeeded(error is None):
            if error is not None:
                raise error
            raise RuntimeError(f"another rank failed while writing {target}; the previous checkpoints are intact")

    if rank == 0:
        with atomic_directory(target) as staging:
            dist.broadcast_object_list([str(staging)], src=0)
            write_and_agree(staging)
    else:
        shared = [None]
        dist.broadcast_object_list(shared, src=0)
        write_and_agree(Path(shared[0]))
    dist.barrier()


def save_training_checkpoint(
    run_dir: Path,
    *,
    step: int,
    engine: Any,
    model: Any,
    config_yaml: str,
    loader: Any,
    trainer_state: dict[str, Any],
    rank: int,
    zero_stage: int,
) -> Path:
    """Write ``RUN/checkpoints/step-XXXXXXXX`` (collective: every rank calls it)."""
    from blip2kit.core.checkpoints import save_pretrained
    from blip2kit.core.checkpoints.atomic import atomic_write_json, atomic_write_text

    target = Path(run_dir) / CHECKPOINTS / checkpoint_name(step)

    def write(staging: Path) -> None:
        for folder in ("rng", "data"):
            (staging / folder).mkdir(exist_ok=True)
        engine.save_checkpoint(
            str(staging / "deepspeed"), tag="state", exclude_frozen_parameters=True, save_latest=False
        )
        save_rng_state(staging / "rng", rank)
        atomic_write_json(staging / "data" / f"rank-{rank}.json", loader.state_dict())
        with _gathered_trainable(model, zero_stage):
            if rank == 0:
                save_pretrained(model, staging / "model", format="blip2kit", trainable_only=True)
        if rank == 0:
            atomic_write_text(staging / "config.yaml", config_yaml)
            atomic_write_json(staging / "trainer_state.json", {**trainer_state, "step": step})

    collective_atomic_directory(target, rank, write)
    return target


def _gathered_trainable(model: Any, zero_stage: int) -> Any:
    from contextlib import nullcontext

    if zero_stage != 3:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(
        [p for p in model.parameters() if p.requires_grad], modifier_rank=None
    )


def prune_checkpoints(run_dir: Path, keep_last: int) -> list[Path]:
    """Remove all but the newest ``keep_last`` complete checkpoints; returns what was removed."""
    found = complete_checkpoints(run_dir)
    removed = found[: max(0, len(found) - keep_last)]
    for path in removed:
        shutil.rmtree(path)
    return removed


def load_training_checkpoint(checkpoint: Path, *, engine: Any, loader: Any, rank: int) -> dict[str, Any]:
    """Restore optimizer, scheduler, trainable weights, RNG and data position; returns trainer state."""
    load_path, _ = engine.load_checkpoint(
        str(checkpoint / "deepspeed"),
        tag="state",
        load_module_strict=False,  # frozen towers are not in training checkpoints
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
    )
    if load_path is None:
        raise ResumeError(f"DeepSpeed found no state under {checkpoint / 'deepspeed'}; the checkpoint is damaged")
    data_state = checkpoint / "data" / f"rank-{rank}.json"
    if not data_state.is_file():
        raise ResumeError(f"{checkpoint} has no data position of rank {rank}; resume with the world size it was saved with")
    loader.load_state_dict(json.loads(data_state.read_text()))
    load_rng_state(checkpoint / "rng", rank)
    return json.loads((checkpoint / "trainer_state.json").read_text())


__all__ = [
    "CHECKPOINTS",
    "ResumeError",
    "checkpoint_name",
    "collective_atomic_directory",
    "complete_checkpoints",
    "latest_checkpoint",
    "latest_checkpoint_directory",
    "load_rng_state",
    "load_training_checkpoint",
    "prune_checkpoints",
    "save_rng_state",
    "save_training_checkpoint",
]
