"""Job configs, the learning-rate schedule and the AdamW parameter groups (no training here)."""

from __future__ import annotations

import math

import pytest
import yaml

from blip2kit.core.config import ConfigError, JobConfig, config_from_dict, dump_config, load_config
from blip2kit.core.training.engine import deepspeed_config, learning_rate, parameter_groups
from blip2kit.core.training.examples import EXAMPLES

MINIMAL = {"model": "vit_tiny+qformer_tiny", "output_dir": "runs/x",
           "data": {"train": [{"format": "jsonl", "path": "captions.jsonl"}]}}


def test_defaults_are_the_papers_recipe():
    config = config_from_dict(MINIMAL)
    assert config.optimizer.betas == (0.9, 0.98)
    assert config.optimizer.weight_decay == 0.05
    assert config.train.lr == 1e-4 and config.train.warmup_steps == 2000
    assert config.frozen_llm_dropout == "as_released"
    # Every field of every section is described (the schema is the documentation).
    schema = JobConfig.model_json_schema()
    for name, section in [("JobConfig", schema), *schema["$defs"].items()]:
        for field, spec in section.get("properties", {}).items():
            assert spec.get("description"), f"{name}.{field} has no description"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"train": {"learning_rate": 1e-4}}, "train.learning_rate: unknown field"),
        ({"train": {"lr": -1}}, "train.lr: Input should be greater than 0 (got -1)"),
        ({"deepspeed": {"zero_stage": 4}}, "deepspeed.zero_stage"),
        ({"deepspeed": {"offload_params": True}}, "set deepspeed.zero_stage=3"),
        ({"data": {"train": [{"format": "csv", "path": "x"}]}}, "data.train.0.format"),
        ({"precision": "int8"}, "precision"),
        ({"train": {"lr": 1e-5, "min_lr": 1e-4}}, "set train.min_lr <= train.lr"),
    ],
)
def test_config_errors_name_the_field_and_the_fix(change, expected):
    raw = {**MINIMAL, **change}
    with pytest.raises(ConfigError) as caught:
        config_from_dict(raw, "job.yaml")
    message = str(caught.value)
    assert expected in message
    assert message.startswith("invalid config job.yaml")


def test_unknown_field_lists_the_known_ones_and_missing_fields_say_how_to_set_them():
    with pytest.raises(ConfigError) as caught:
        config_from_dict({"model": "vit_tiny+qformer_tiny", "train": {"steps": 3}})
    message = str(caught.value)
    assert "train.steps: unknown field" in message and "max_steps" in message
    assert "output_dir: required; set it in the file or with --set output_dir=..." in message
    assert "data: required" in message


def test_set_reaches_any_field_with_yaml_values(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    config = load_config(path, [
        "train.lr=3e-5",  # YAML 1.1 would read this as a string
        "train.max_steps=7",
        "deepspeed.zero_stage=3",
        "data.train.0.image_root=images",
        "model_overrides.bridge.tokenizer=vocab/",
        "optimizer.betas=[0.9, 0.999]",
        "init_from=runs/stage1",
    ])
    assert config.train.lr == 3e-5 and config.train.max_steps == 7
    assert config.deepspeed.zero_stage == 3
    assert config.data.train[0].image_root == "images"
    assert config.model_overrides == {"bridge": {"tokenizer": "vocab/"}}
    assert config.optimizer.betas == (0.9, 0.999)
    assert config.init_from == "runs/stage1"
    with pytest.raises(ConfigError, match="data.train.5 indexes a list of 1 items"):
        load_config(path, ["data.train.5.path=x"])
    with pytest.raises(ConfigError, match="write it as key=value"):
        load_config(path, ["train.lr"])


def test_resolved_config_round_trips_through_yaml():
    config = config_from_dict({**MINIMAL, "train": {"lr": 2e-4, "grad_clip": 1.0}})
    assert config_from_dict(yaml.safe_load(dump_config(config))) == config


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_examples_are_valid_configs(stage):
    config = config_from_dict(yaml.safe_load(EXAMPLES[stage]))
    assert ("+opt_tiny" in config.model) == (stage == "stage2")


def test_learning_rate_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    schedule = {"lr": 1e-4, "min_lr": 1e-5, "warmup_steps": 4, "max_steps": 14}
    assert learning_rate(0, **schedule) == pytest.approx(0.25e-4)
    assert learning_rate(3, **schedule) == pytest.approx(1e-4)
    # Half way through the decay: the mean of peak and floor; at the end: the floor.
    assert learning_rate(9, **schedule) == pytest.approx(5.5e-5)
    assert learning_rate(14, **schedule) == pytest.approx(1e-5)
    assert learning_rate(6, **schedule) == pytest.approx(1e-5 + 9e-5 * 0.5 * (1 + math.cos(math.pi * 0.2)))


def test_parameter_groups_hold_only_trainable_parameters_and_skip_decay_on_biases_and_norms():
    from blip2kit.core.build import build_model

    model = build_model("vit_tiny+qformer_tiny")
    decayed, undecayed = parameter_groups(model, 0.05)
    assert decayed["weight_decay"] == 0.05 and undecayed["weight_decay"] == 0.0
    named = dict(model.named_parameters())
    by_id = {id(p): name for name, p in named.items()}
    decayed_names = {by_id[id(p)] for p in decayed["params"]}
    undecayed_names = {by_id[id(p)] for p in undecayed["params"]}
    assert decayed_names | undecayed_names == {name for name, p in named.items() if p.requires_grad}
    assert not any(name.startswith("vision.") for name in decayed_names | undecayed_names)
    assert all(named[name].dim() >= 2 and not name.endswith(".bias") for name in decayed_names)
    assert {"bridge.temp"} <= undecayed_names  # 0-dim
    assert any(name.endswith("norm.weight") for name in undecayed_names)


def test_deepspeed_config_is_fp32_with_the_global_batch():
    config = config_from_dict({**MINIMAL, "train": {"batch_size": 3, "grad_accum": 2, "grad_clip": 1.0},
                               "deepspeed": {"zero_stage": 3, "offload_optimizer": True}})
    ds = deepspeed_config(config, world_size=4)
    assert ds["train_batch_size"] == 24 and ds["gradient_accumulation_steps"] == 2
    assert ds["gradient_clipping"] == 1.0
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert "bf16" not in ds and "fp16" not in ds  # the model applies its own precision policy
