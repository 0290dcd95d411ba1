"""Typed job configs for ``blip2kit train``: one pydantic model per concern, YAML in and out.

Every model forbids unknown keys and describes every field; the defaults are the paper's recipe
(AdamW betas (0.9, 0.98), weight decay 0.05, peak lr 1e-4, 2k warmup steps, cosine decay).
``load_config(path, overrides=["train.lr=3e-5"])`` reads a file, applies ``--set`` overrides
(values parsed as YAML) and validates; any error becomes one ``ConfigError`` that names the
field, the value given and what to do.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from blip2kit.core.data import DataSourceConfig


class ConfigError(ValueError):
    """A job config that does not validate; the message names each bad field and the fix."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    """Where the training captions and images come from."""

    train: list[DataSourceConfig] = Field(
        description="training sources, each {format: coco|lavis_json|jsonl|folder|webdataset, path, "
        "image_root}; their samples are concatenated",
    )
    feature_cache: str | None = Field(
        default=None,
        description="a directory written by 'blip2kit cache-features': train on its stored frozen-encoder "
        "features instead of running the encoder (eval transform, no augmentation)",
    )
    max_words: int = Field(default=50, ge=1, description="captions are cut to this many words (LAVIS: 50)")

    @field_validator("train")
    @classmethod
    def _some_sources(cls, sources: list[DataSourceConfig]) -> list[DataSourceConfig]:
        if not sources:
            raise ValueError("give at least one source, e.g. [{format: jsonl, path: captions.jsonl}]")
        return sources


class TrainConfig(_Section):
    """Steps, batch, learning-rate schedule, seed and checkpointing."""

    max_steps: int = Field(default=250_000, ge=1, description="optimizer steps (paper: 250k stage 1, 80k stage 2)")
    batch_size: int = Field(default=100, ge=1, description="samples per device per micro-step (LAVIS stage 1: 100)")
    grad_accum: int = Field(default=1, ge=1, description="micro-steps accumulated into one optimizer step")
    lr: float = Field(default=1e-4, gt=0, description="peak learning rate after warmup (paper: 1e-4)")
    min_lr: float = Field(
        default=1e-5, ge=0, description="floor of the cosine decay (LAVIS: 1e-5; paper stage 2: 5e-5)"
    )
    warmup_steps: int = Field(default=2000, ge=0, description="steps of linear warmup from 0 to lr (paper: 2000)")
    grad_clip: float | None = Field(
        default=None, gt=0, description="clip the global gradient norm to this value; null: no clipping (as LAVIS)"
    )
    seed: int = Field(default=42, description="seeds weights, dropout, negatives and augmentation (LAVIS: 42)")
    save_every: int = Field(default=5000, ge=1, description="write a checkpoint every this many steps (and at the end)")
    keep_last: int = Field(default=3, ge=1, description="how many of the newest checkpoints to keep")
    log_every: int = Field(default=10, ge=1, description="append a metrics line every this many steps")

    @model_validator(mode="after")
    def _floor_below_peak(self) -> TrainConfig:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr {self.min_lr} is above lr {self.lr}; set train.min_lr <= train.lr")
        return self


class OptimizerConfig(_Section):
    """AdamW as the paper: betas (0.9, 0.98), weight decay 0.05 except biases and norms."""

    betas: tuple[float, float] = Field(
        default=(0.9, 0.98),
        description="AdamW betas; the paper uses (0.9, 0.98), LAVIS' released configs (0.9, 0.999)",
    )
    weight_decay: float = Field(
        default=0.05, ge=0, description="decoupled weight decay on matrices; biases and 1-D (norm) weights get none"
    )
    eps: float = Field(default=1e-8, gt=0, description="AdamW epsilon")

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError(f"both betas must be in [0, 1), got {list(betas)}")
        return betas


class DeepSpeedConfig(_Section):
    """How DeepSpeed shards the trainable state across processes."""

    zero_stage: Literal[0, 1, 2, 3] = Field(
        default=2,
        description="ZeRO stage: 0 replicates everything, 1 shards optimizer state, 2 also gradients, "
        "3 also parameters (frozen towers too)",
    )
    offload_optimizer: bool = Field(default=False, description="keep optimizer state on the CPU (ZeRO 1-3)")
    offload_params: bool = Field(default=False, description="keep parameters on the CPU (ZeRO 3 only)")
    backend: Literal["auto", "nccl", "gloo"] = Field(
        default="auto", description="process-group backend; auto: nccl on GPU, gloo on CPU"
    )

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> DeepSpeedConfig:
        if self.offload_params and self.zero_stage != 3:
            raise ValueError(f"offload_params needs zero_stage 3, got {self.zero_stage}; set deepspeed.zero_stage=3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage 1, 2 or 3; set deepspeed.zero_stage=2")
        return self


class JobConfig(_Section):
    """A training job: which model, on what data, how long, and where it writes."""

    model: str = Field(
        description="a composition ('vit_g+qformer' for stage 1, 'vit_g+qformer+opt_2.7b' for stage 2) or a "
        "registered model name (see 'blip2kit list')"
    )
    model_overrides: dict[Literal["vision", "bridge", "language"], dict[str, Any]] = Field(
        default_factory=dict,
        description="per-slot component settings, e.g. {vision: {image_size: 364}, language: {tokenizer: DIR}}",
    )
    init_from: str | None = Field(
        default=None,
        description="start from these weights: a run directory or checkpoint of a stage-1 run (its bridge is "
        "loaded into a stage-2 model), or any checkpoint 'from_pretrained' reads",
    )
    precision: Literal["fp32", "bf16", "fp16", "half"] = Field(
        default="half",
        description="the precision policy: frozen towers in this dtype, the bridge and projection with fp32 "
        "master weights under autocast; half = bf16 where the device has it, else fp16; fp32 for exact "
        "parity and exact-resume checks",
    )
    frozen_llm_dropout: Literal["as_released", "off"] = Field(
        default="as_released",
        description="as_released: the frozen LLM's own dropout is active in training, as LAVIS leaves it; "
        "off: the frozen LLM runs in eval mode",
    )
    output_dir: str = Field(description="run directory: config, metrics, loss curve and checkpoints go here")
    data: DataConfig = Field(description="training data")
    train: TrainConfig = Field(default_factory=TrainConfig, description="steps, batch, schedule, checkpoints")
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig, description="AdamW settings")
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig, description="ZeRO sharding")

    @field_validator("model")
    @classmethod
    def _model_named(cls, name: str) -> str:
        if not name.strip():
            raise ValueError("name a model, e.g. vit_g+qformer; 'blip2kit list' shows the choices")
        return name.strip()


# -- reading, overriding, writing ----------------------------------------------------------------


def _describe_errors(error: ValidationError, source: str) -> str:
    lines = []
    for problem in error.errors():
        field = ".".join(str(part) for part in problem["loc"]) or "(top level)"
        kind, message = problem["type"], problem["msg"]
        if kind == "extra_forbidden":
            known = _known_fields(problem["loc"][:-1])
            lines.append(f"{field}: unknown field; remove it (fields here: {', '.join(known)})")
            continue
        if kind == "missing":
            lines.append(f"{field}: required; set it in the file or with --set {field}=...")
            continue
        value = problem.get("input")
        message = message.removeprefix("Value error, ")
        lines.append(f"{field}: {message} (got {value!r})")
    return f"invalid config {source}:\n  " + "\n  ".join(lines)


def _known_fields(location: tuple[Any, ...]) -> list[str]:
    """The field names of the model at ``location`` (integer parts index into lists)."""
    model: Any = JobConfig
    for part in location:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return []
        annotation = field.annotation
        inner = getattr(annotation, "__args__", None)
        model = inner[0] if inner else annotation
    if isinstance(model, type) and issubclass(model, BaseModel):
        return sorted(model.model_fields)
    return []


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=3e-5"`` -> (["train", "lr"], 3e-05): the value is parsed as YAML."""
    key, separator, raw = text.partition("=")
    if not separator or not key.strip():
        raise ConfigError(f"--set {text!r}: write it as key=value, e.g. --set train.lr=3e-5")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as error:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({error.problem})") from None
    return [part for part in key.strip().split(".")], value


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Set each ``a.b.c=value`` in the nested dict ``raw`` (creating sections; list items by index)."""
    for text in overrides:
        path, value = parse_override(text)
        node: Any = raw
        for depth, part in enumerate(path[:-1]):
            where = ".".join(path[: depth + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"--set {text!r}: {where} indexes a list of {len(node)} items")
                node = node[int(part)]
                continue
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text!r}: {where} is inside a value that is not a section")
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            node = child
        last = path[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise ConfigError(f"--set {text!r}: {'.'.join(path)} indexes a list of {len(node)} items")
            node[int(last)] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise ConfigError(f"--set {text!r}: {'.'.join(path[:-1])} is not a section")
    return raw


def _numbers_from_yaml_strings(node: Any) -> Any:
    """YAML 1.1 reads ``1e-4`` (no dot) as a string; turn such strings back into numbers."""
    if isinstance(node, dict):
        return {key: _numbers_from_yaml_strings(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_numbers_from_yaml_strings(value) for value in node]
    if isinstance(node, str) and node[:1] in "0123456789.-+" and "e" in node.lower():
        try:
            return float(node)
        except ValueError:
            return node
    return node


def config_from_dict(raw: Mapping[str, Any], source: str = "") -> JobConfig:
    try:
        return JobConfig.model_validate(_numbers_from_yaml_strings(dict(raw)))
    except ValidationError as error:
        raise ConfigError(_describe_errors(error, source or "(in memory)")) from None


def load_config(path: str | Path | None, overrides: Iterable[str] = ()) -> JobConfig:
    """Read a YAML job config (or start empty when ``path`` is None), apply ``--set`` overrides
    and validate."""
    raw: Any = {}
    source = "from --set"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist; 'blip2kit config example stage1' prints one")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {source} is not valid YAML: {error}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {source} must hold a mapping of fields, got {type(raw).__name__}")
    return config_from_dict(apply_overrides(raw, overrides), source)


def dump_config(config: JobConfig) -> str:
    """The resolved config as YAML (every field, defaults included), readable by ``load_config``."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def config_schema() -> dict[str, Any]:
    """The JSON schema of a job config (what ``blip2kit config schema`` prints)."""
    return JobConfig.model_json_schema()


__all__ = [
    "ConfigError",
    "DataConfig",
    "DeepSpeedConfig",
    "JobConfig",
    "OptimizerConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "config_schema",
    "dump_config",
    "load_config",
    "parse_override",
]
