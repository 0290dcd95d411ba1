"""Composition by name, width checks, overrides, the freeze policy and the parameter summary."""

from __future__ import annotations

import pytest
import torch

from blip2kit.core import Blip2, WidthMismatchError, build_model, count_parameters
from blip2kit.core.build import ConfigOverrideError
from blip2kit.registry import Registry


def test_three_part_name_builds_a_stage2_model(registry: Registry) -> None:
    model = build_model("double_vision+double_bridge+double_lm")
    assert isinstance(model, Blip2) and model.stage == 2
    assert model.projection is not None
    assert (model.projection.in_features, model.projection.out_features) == (12, 10)
    assert model.bridge.text_head is None  # the stage-2 view drops stage-1-only parts


def test_two_part_name_builds_a_stage1_model(registry: Registry) -> None:
    model = build_model("double_vision+double_bridge")
    assert model.stage == 1 and model.language is None and model.projection is None
    assert model.bridge.text_head is not None
    with pytest.raises(RuntimeError, match="stage-1 model"):
        model.soft_prompt(torch.randn(1, 3, 32, 32))


def test_bridge_follows_the_encoder_width(registry: Registry) -> None:
    model = build_model("double_vision_wide+double_bridge+double_lm")
    assert model.vision.width == 24 and model.bridge.input_width == 24


def test_width_mismatch_names_both_components_and_numbers(registry: Registry) -> None:
    with pytest.raises(WidthMismatchError) as error:
        build_model("double_vision_wide+double_bridge", bridge={"encoder_width": 16})
    message = str(error.value)
    for fragment in ("'double_vision_wide'", "width 24", "'double_bridge'", "input width 16"):
        assert fragment in message


def test_unknown_override_keys_are_refused(registry: Registry) -> None:
    with pytest.raises(ConfigOverrideError, match="no config key\\(s\\) \\['depth'\\]"):
        build_model("double_vision+double_bridge", vision={"depth": 3})
    with pytest.raises(ConfigOverrideError, match="has no language model"):
        build_model("double_vision+double_bridge", language={"hidden_size": 4})


def test_factory_returning_the_wrong_type_is_reported(registry: Registry) -> None:
    with pytest.raises(TypeError, match="returned Linear, which is not a blip2kit LanguageModel"):
        build_model("double_vision+double_bridge+not_a_component")


def test_frozen_towers_stay_frozen_through_train(registry: Registry) -> None:
    model = build_model("double_vision+double_bridge+double_lm", frozen_llm_dropout="off")
    model.train()
    assert model.bridge.training and model.projection.training
    assert not model.vision.training and not model.language.training
    assert not any(module.training for module in model.vision.modules())
    assert not any(p.requires_grad for p in model.vision.parameters())
    assert not any(p.requires_grad for p in model.language.parameters())
    assert all(p.requires_grad for p in model.bridge.parameters())


def test_unfrozen_tower_trains_when_asked(registry: Registry) -> None:
    model = build_model("double_vision+double_bridge+double_lm", freeze_vision=False)
    model.train()
    assert model.vision.training
    assert all(p.requires_grad for p in model.vision.parameters())


def test_gradients_reach_only_trainable_parts(registry: Registry) -> None:
    model = build_model("double_vision+double_bridge+double_lm")
    model.train()
    losses = model(torch.randn(2, 3, 32, 32), ["a cat", "red dog"])
    losses["loss"].backward()
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert parameter.grad is not None, name
        else:
            assert parameter.grad is None, name
    assert model.bridge.queries.grad.abs().sum() > 0


def test_meta_device_builds_without_memory(registry: Registry) -> None:
    model = build_model("double_vision+double_bridge+double_lm", device="meta")
    assert all(p.device.type == "meta" for p in model.parameters())
    counts = count_parameters(model)
    assert counts.total == count_parameters(build_model("double_vision+double_bridge+double_lm")).total


def test_parameter_summary_adds_up(registry: Registry) -> None:
    model = build_model("double_vision+double_bridge+double_lm")
    summary = model.parameter_summary()
    parts = ["vision", "bridge", "projection", "language"]
    assert sum(summary[p].total for p in parts) == summary["total"].total
    assert summary["total"].trainable == summary["bridge"].trainable + summary["projection"].trainable
    assert summary["projection"].total == 12 * 10 + 10
    assert "trainable" in model.format_parameter_summary()


def test_dtype_casts_frozen_towers_only(registry: Registry) -> None:
    model = build_model("double_vision+double_bridge+double_lm", dtype="bf16")
    assert next(model.vision.parameters()).dtype == torch.bfloat16
    assert next(model.language.parameters()).dtype == torch.bfloat16
    assert next(model.bridge.parameters()).dtype == torch.float32
    with pytest.raises(ValueError, match="unknown dtype"):
        build_model("double_vision+double_bridge", dtype="fp12")


def test_generate_takes_one_prompt_per_image(registry: Registry) -> None:
    model = build_model("double_vision+double_bridge+double_lm")
    pixels = torch.randn(2, 3, 32, 32)
    answers = model.generate(pixels, "photo of")
    assert len(answers) == 2 and all(a.startswith("photo of ") for a in answers)
    with pytest.raises(ValueError, match="3 prompts for 2 images"):
        model.generate(pixels, ["a", "b", "c"])
