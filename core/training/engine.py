"""The DeepSpeed side of training: process group, model under ZeRO, AdamW and its schedule.

DeepSpeed runs in fp32 mode (no fp16/bf16 section): the model applies its own precision policy
(frozen towers in half precision, bridge and projection fp32 under autocast). Only trainable
parameters reach the optimizer, so frozen towers never get gradients or optimizer state.
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from blip2kit.core.config import JobConfig

# -- the process group ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Distributed:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def init_distributed(backend: str = "auto") -> Distributed:
    """Join (or, for a lone process, create) the process group DeepSpeed needs.

    ``torchrun`` and the ``deepspeed`` launcher set RANK/WORLD_SIZE/MASTER_*; a process started
    without a launcher is rank 0 of 1 and gets a free local port, so no launcher is needed.
    """
    import deepspeed
    import torch.distributed as dist

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"})
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available()
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    if backend == "nccl" and not use_cuda:
        raise RuntimeError("deepspeed.backend is nccl but no CUDA device is visible; use gloo (or auto) on CPU")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    elif int(os.environ["WORLD_SIZE"]) == 1:
        _skip_shared_memory_all_reduce()
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return Distributed(dist.get_rank(), local_rank, dist.get_world_size(), device)


def _skip_shared_memory_all_reduce() -> None:
    """Keep a lone CPU process from building DeepSpeed's shared-memory all-reduce op.

    DeepSpeed's CPU backend compiles that op the first time any process group starts (about 40 s
    on a fresh machine, most of a short job), yet the op only speeds up reductions between
    processes on one node, and a world of one reduces nothing. DeepSpeed reads which ops it may
    build from ``deepspeed.ops.__compatible_ops__``, a dict it keeps for such edits; where a
    DeepSpeed lacks it, the op is built as before.
    """
    import deepspeed.ops

    try:
        from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

        compatible = deepspeed.ops.__compatible_ops__
    except (ImportError, AttributeError):
        return
    compatible[ShareMemCommBuilder.NAME] = False


def forget_process_groups() -> None:
    """Destroy the process group this process made and DeepSpeed's cached sub-groups of it.

    DeepSpeed keeps the groups it derives (data parallel, sequence parallel, ...) in module
    globals; after ``destroy_process_group`` they point at dead groups, and a second training in
    the same process (a notebook, a test session) fails with "Group ... is not registered".
    """
    import torch.distributed as dist
    from deepspeed.utils import groups

    if dist.is_initialized():
        dist.destroy_process_group()
    for name, value in list(vars(groups).items()):
        if name == "mpu" or (name.startswith("_") and name.endswith(("_GROUP", "_GROUP_RANKS"))):
            setattr(groups, name, {} if isinstance(value, dict) else None)


# -- the DeepSpeed config -------------------------------------------------------------------------


def deepspeed_config(config: JobConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config dict for ``config`` on ``world_size`` processes (fp32 mode)."""
    settings = config.deepspeed
    zero: dict[str, Any] = {"stage": settings.zero_stage}
    if settings.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if settings.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if settings.zero_stage == 3:
        # Gather whole small modules at once; never keep a gathered copy beyond its use.
        zero.update({"stage3_param_persistence_threshold": 0, "stage3_max_live_parameters": 1e9})
    train = config.train
    return {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.batch_size * train.grad_accum * world_size,
        "gradient_clipping": train.grad_clip or 0.0,
        "zero_optimization": zero,
        # A client torch.optim.AdamW: DeepSpeed's CPU Adam would need a compiler on every machine.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def register_owned_parameters(model: nn.Module) -> None:
    """ZeRO-3 gathers a module's own parameters when its ``forward`` runs. Container modules
    (a bridge holding its query tokens, an encoder its class token) also use theirs in other
    methods (``encode_image``, ``encode_text``); register those with the root module so they are
    gathered for the whole forward pass. Leaf layers are always called through ``forward``."""
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter

    for module in model.modules():
        if module is model or not any(True for _ in module.children()):
            continue
        for parameter in module.parameters(recurse=False):
            register_external_parameter(model, parameter)


# -- optimizer and schedule -----------------------------------------------------------------------


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters in two AdamW groups: decayed matrices, and biases/norms/1-D without decay."""
    decayed: list[nn.Parameter] = []
    undecayed: list[nn.Parameter] = []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        shape = getattr(parameter, "ds_shape", parameter.shape)  # ZeRO-3 partitions report ds_shape
        if len(shape) < 2 or name.endswith(".bias"):
            undecayed.append(parameter)
        else:
            decayed.append(parameter)
    if not decayed and not undecayed:
        raise ValueError("the model has no trainable parameters; nothing to train")
    return [
        {"params": decayed, "weight_decay": weight_decay},
        {"params": undecayed, "weight_decay": 0.0},
    ]


def learning_rate(step: int, *, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """The lr of optimizer step ``step`` (0-based): linear warmup to ``lr`` over ``warmup_steps``
    steps, then cosine decay per step to ``min_lr`` at ``max_steps``."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosine:
    """A picklable LambdaLR factor for ``learning_rate`` (relative to the peak lr)."""

    def __init__(self, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> None:
        self.lr, self.min_lr, self.warmup_steps, self.max_steps = lr, min_lr, warmup_steps, max_steps

    def __call__(self, step: int) -> float:
        return learning_rate(
            step, lr=self.lr, min_lr=self.min_lr, warmup_steps=self.warmup_steps, max_steps=self.max_steps
        ) / self.lr


def build_optimizer(model: nn.Module, config: JobConfig) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW over the trainable parameters, and its per-step warmup + cosine schedule."""
    settings, train = config.optimizer, config.train
    optimizer = torch.optim.AdamW(
        parameter_groups(model, settings.weight_decay), lr=train.lr, betas=settings.betas, eps=settings.eps
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupCosine(train.lr, train.min_lr, train.warmup_steps, train.max_steps)
    )
    return optimizer, schedule


# -- the engine -----------------------------------------------------------------------------------


def initialize_engine(model: nn.Module, config: JobConfig, ds_config: dict[str, Any]) -> Any:
    """Wrap ``model`` in a DeepSpeed engine with the client AdamW and its schedule (stepped by the engine)."""
    import deepspeed

    if config.deepspeed.zero_stage == 3:
        register_owned_parameters(model)
    optimizer, schedule = build_optimizer(model, config)
    with _broadcast_scalars_too():
        engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=schedule, config=ds_config
        )
    return engine


@contextmanager
def _broadcast_scalars_too() -> Iterator[None]:
    """DeepSpeed (0.19) syncs rank 0's weights by viewing each parameter as bytes, which fails for
    0-dim parameters (the Q-Former's ITC temperature): in ``DeepSpeedEngine._broadcast_model``
    (ZeRO 0-2) and in ``Init._zero_init_param`` (ZeRO-3). While the engine is built, both
    broadcast such parameters through a 1-element view instead."""
    import torch.distributed as dist
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.zero.partition_parameters import Init

    original_broadcast_model = DeepSpeedEngine._broadcast_model
    original_zero_init_param = Init._zero_init_param

    def broadcast_model(engine: Any) -> None:
        scalars = [p for p in engine.module.parameters() if p.dim() == 0 and not hasattr(p, "ds_status")]
        for parameter in scalars:
            dist.broadcast(parameter.data.view(1), src=0)
            parameter.ds_optim_param = True  # DeepSpeed's own "skip this one" mark, for its loop only
        try:
            original_broadcast_model(engine)
        finally:
            for parameter in scalars:
                del parameter.ds_optim_param

    def zero_init_param(init: Any, parameter: Any) -> None:
        if parameter.dim() != 0:
            original_zero_init_param(init, parameter)
            return
        init._convert_to_deepspeed_param(parameter)
        group = init.get_partition_dp_group(parameter)
        dist.broadcast(parameter.data.view(1), dist.get_global_rank(group, 0), group)
        parameter.partition()

    DeepSpeedEngine._broadcast_model = broadcast_model
    Init._zero_init_param = zero_init_param
    try:
        yield
    finally:
        DeepSpeedEngine._broadcast_model = original_broadcast_model
        Init._zero_init_param = original_zero_init_param


def trainable_state(model: nn.Module, zero_stage: int) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full fp32 copy) of each trainable parameter, gathered from ZeRO-3 partitions."""
    names = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in names], modifier_rank=None):
            gathered = [(name, p.detach().clone().cpu()) for name, p in names]
        yield from gathered
        return
    for name, parameter in names:
        yield name, parameter.detach().clone().cpu()


__all__ = [
    "Distributed",
    "WarmupCosine",
    "build_optimizer",
    "deepspeed_config",
    "init_distributed",
    "initialize_engine",
    "learning_rate",
    "parameter_groups",
    "register_owned_parameters",
    "trainable_state",
]
