"""The training loop: build the model (under ZeRO-3 partitioned as it is built), wrap it in a
DeepSpeed engine, draw batches from the train loader, step, log, checkpoint, and summarise.

``train(config, resume=...)`` is what ``blip2kit train`` runs on every rank.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path
from typing import Any

import torch

from blip2kit.core.config import JobConfig, dump_config
from blip2kit.core.training.checkpoints import (
    CHECKPOINTS,
    complete_checkpoints,
    latest_checkpoint,
    latest_checkpoint_directory,
    load_training_checkpoint,
    prune_checkpoints,
    save_training_checkpoint,
)
from blip2kit.core.training.engine import (
    Distributed,
    deepspeed_config,
    init_distributed,
    initialize_engine,
    learning_rate,
    trainable_state,
)
from blip2kit.core.training.report import MetricsLog, TrainSummary, peak_memory_bytes, plot_loss

_RENDEZVOUS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def model_build_options(config: JobConfig) -> dict[str, Any]:
    """The precision policy arguments of ``build_model`` for this job."""
    return {"precision": config.precision, "frozen_llm_dropout": config.frozen_llm_dropout}


def build_training_model(config: JobConfig, device: torch.device | None = None) -> Any:
    """The job's model with its init weights (the same on every rank and in every command, as
    the seed fixes them).

    Under ZeRO-3 the model is built whole and ``deepspeed.initialize`` partitions every parameter,
    frozen towers included. It is not built inside ``zero.Init``: components initialise weights
    after building their layers (the Q-Former zeroes its padding embedding), which ``zero.Init``
    has already partitioned by then.
    """
    from blip2kit.core.build import build_model

    torch.manual_seed(config.train.seed)  # the same initial weights on every rank
    model = build_model(
        config.model,
        device=None if device is None or device.type == "cpu" else device,
        vision=config.model_overrides.get("vision"),
        bridge=config.model_overrides.get("bridge"),
        language=config.model_overrides.get("language"),
        **model_build_options(config),
    )
    if config.init_from is not None:
        load_init_weights(model, config.init_from)
    return model


def resolve_weights_path(path: str | Path) -> Path:
    """A run directory stands for its newest checkpoint's ``model/``; anything else as given."""
    path = Path(path)
    if (path / CHECKPOINTS).is_dir():
        return latest_checkpoint(path)
    if not path.exists():
        raise FileNotFoundError(f"init_from {str(path)!r} does not exist; give a run directory or a checkpoint")
    return path


def load_init_weights(model: Any, source: str | Path) -> None:
    """Start from a checkpoint's bridge (a stage-1 run for stage 2) and projection, if it has one."""
    from blip2kit.core.checkpoints import load_stage1_bridge, read_state

    state = read_state(resolve_weights_path(source))
    report = load_stage1_bridge(model, state)
    projection = {key.removeprefix("projection."): value for key, value in state.items()
                  if key.startswith("projection.")}
    if projection and model.projection is not None:
        model.projection.load_state_dict(projection)
    if not report.loaded:
        raise ValueError(f"init_from {str(source)!r} holds no weights of the bridge; is it a stage-1 checkpoint?")


def _seed_everything(seed: int) -> None:
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    import torch.distributed as dist

    names = sorted(values)
    tensor = torch.tensor([values[name] for name in names], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    tensor /= dist.get_world_size()
    return dict(zip(names, tensor.tolist()))


def _to_device(value: Any, device: torch.device) -> Any:
    return value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value


def model_inputs(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The loader's batch as ``Blip2.forward`` keywords (pixels, or cached image features)."""
    inputs: dict[str, Any] = {"text_input": batch["text_input"]}
    if "image_features" in batch:
        inputs["image_features"] = _to_device(batch["image_features"], device)
    else:
        inputs["pixels"] = _to_device(batch["pixels"], device)
    if batch.get("text_output") is not None:
        inputs["text_output"] = batch["text_output"]
    return inputs


def build_loader(config: JobConfig, model: Any, dist_info: Distributed) -> Any:
    from blip2kit.core.data import build_train_loader

    feature_cache = None
    if config.data.feature_cache is not None:
        from blip2kit.core.data.feature_cache import FeatureCache

        feature_cache = FeatureCache(config.data.feature_cache)
        feature_cache.check(model)
    return build_train_loader(
        config.data.train,
        transform=model.vision.transform(train=True),
        batch_size=config.train.batch_size,
        seed=config.train.seed,
        rank=dist_info.rank,
        world_size=dist_info.world_size,
        feature_cache=feature_cache,
        max_words=config.data.max_words,
    )


def train(config: JobConfig, *, resume: bool = False, progress: bool = True) -> TrainSummary:
    """Run (or, with ``resume``, continue) the job on this rank; every rank calls it."""
    launched_by_us = "RANK" not in os.environ
    saved_environment = {name: os.environ.get(name) for name in _RENDEZVOUS}
    dist_info = init_distributed(config.deepspeed.backend)
    try:
        return _train(config, dist_info, resume=resume, progress=progress)
    finally:
        if launched_by_us:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            for name, value in saved_environment.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def _train(config: JobConfig, dist_info: Distributed, *, resume: bool, progress: bool) -> TrainSummary:
    import torch.distributed as dist
    from tqdm import tqdm

    from blip2kit.core.checkpoints.atomic import atomic_write_json, atomic_write_text

    run_dir = Path(config.output_dir)
    existing = complete_checkpoints(run_dir)
    if existing and not resume:
        raise FileExistsError(
            f"output_dir {str(run_dir)!r} already holds checkpoints (newest {existing[-1].name}); pass --resume "
            "to continue that run, or choose another output_dir"
        )
    config_yaml = dump_config(config)
    ds_config = deepspeed_config(config, dist_info.world_size)
    model = build_training_model(config, dist_info.device)
    loader = build_loader(config, model, dist_info)
    engine = initialize_engine(model, config, ds_config)

    step, seconds_before = 0, 0.0
    if resume and existing:
        checkpoint = latest_checkpoint_directory(run_dir)
        trainer_state = load_training_checkpoint(checkpoint, engine=engine, loader=loader, rank=dist_info.rank)
        step, seconds_before = trainer_state["step"], trainer_state["seconds"]
        if dist_info.is_main:
            print(f"resuming from {checkpoint} (step {step})")
    else:
        _seed_everything(config.train.seed + dist_info.rank)  # dropout and negatives differ per rank
    if dist_info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", config_yaml)
        metrics = MetricsLog(run_dir, resume_step=step if resume else None)
    dist.barrier()

    train = config.train
    samples_per_step = train.batch_size * train.grad_accum * dist_info.world_size
    batches = iter(loader)
    bar = tqdm(total=train.max_steps, initial=step, desc="train", unit="step", dynamic_ncols=True,
               disable=not (progress and dist_info.is_main))
    saved: list[Path] = []
    last_loss: float | None = None
    started = time.perf_counter()
    window_start, window_steps = started, 0
    engine.train()
    while step < train.max_steps:
        sums: dict[str, float] = {}
        for _ in range(train.grad_accum):
            losses = engine(**model_inputs(next(batches), dist_info.device))
            engine.backward(losses["loss"])
            engine.step()
            for name, value in losses.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach()) / train.grad_accum
        step += 1
        window_steps += 1
        if step % train.log_every == 0 or step == train.max_steps or step % train.save_every == 0:
            averaged = _mean_over_ranks(sums, dist_info.device)
            now = time.perf_counter()
            samples_per_second = window_steps * samples_per_step / max(now - window_start, 1e-9)
            window_start, window_steps = now, 0
            last_loss = averaged["loss"]
            if dist_info.is_main:
                used_lr = _lr_of_step(config, step - 1)
                metrics.write({"step": step, **averaged, "lr": used_lr, "samples": step * samples_per_step,
                               "samples_per_second": samples_per_second,
                               "bad_samples": loader.bad_samples.count})
                bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{used_lr:.2e}", samples_s=f"{samples_per_second:.1f}")
        bar.update(1)
        if step % train.save_every == 0 or step == train.max_steps:
            seconds = seconds_before + time.perf_counter() - started
            path = save_training_checkpoint(
                run_dir, step=step, engine=engine, model=model, config_yaml=config_yaml, loader=loader,
                trainer_state={"seconds": seconds, "samples": step * samples_per_step,
                               "world_size": dist_info.world_size},
                rank=dist_info.rank, zero_stage=config.deepspeed.zero_stage,
            )
            saved.append(path)
            if dist_info.is_main:
                prune_checkpoints(run_dir, train.keep_last)
                plot_loss(run_dir)
            window_start = time.perf_counter()  # samples/s counts training, not saving
    bar.close()

    bad_counts = torch.tensor([loader.bad_samples.count], dtype=torch.int64, device=dist_info.device)
    dist.all_reduce(bad_counts)
    bad_texts: list[Any] = [None] * dist_info.world_size
    dist.all_gather_object(bad_texts, loader.bad_samples.summary() if loader.bad_samples.count else "")
    digests: list[Any] = [None] * dist_info.world_size
    dist.all_gather_object(digests, trainable_digest(model, config.deepspeed.zero_stage))
    if dist_info.is_main and len(set(digests)) > 1:
        print(f"warning: the ranks hold different trainable weights after training: {digests}")
    summary = TrainSummary(
        run_dir=str(run_dir),
        steps=step,
        samples=step * samples_per_step,
        seconds=seconds_before + time.perf_counter() - started,
        final_loss=last_loss,
        bad_samples=int(bad_counts.item()),
        bad_sample_summary="; ".join(text for text in bad_texts if text),
        peak_memory_bytes=peak_memory_bytes(),
        checkpoints=[str(path) for path in complete_checkpoints(run_dir)],
        world_size=dist_info.world_size,
        trainable_digests=digests,
    )
    if dist_info.is_main:
        metrics.close()
        plot_loss(run_dir)
        atomic_write_json(run_dir / "summary.json", summary.as_dict())
        print(summary.format())
    dist.barrier()
    return summary


def trainable_digest(model: Any, zero_stage: int) -> str:
    """SHA-256 of the trainable weights (gathered under ZeRO-3): equal on every rank of a sound run."""
    import hashlib

    digest = hashlib.sha256()
    for name, value in trainable_state(model, zero_stage):
        digest.update(name.encode())
        digest.update(value.float().numpy().tobytes())
    return digest.hexdigest()


def _lr_of_step(config: JobConfig, step: int) -> float:
    train = config.train
    return learning_rate(step, lr=train.lr, min_lr=train.min_lr, warmup_steps=train.warmup_steps,
                         max_steps=train.max_steps)


__all__ = ["build_training_model", "load_init_weights", "model_build_options", "model_inputs",
           "resolve_weights_path", "train"]
