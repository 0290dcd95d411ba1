"""Typed component configs (issue 8 item 7): every built-in card's config is a pydantic model that
refuses bad values before anything is built, with a message naming the component, the field and
what is allowed; third parties may declare a config class or keep plain dicts; dtype and device are
checked before building."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from pydantic import Field

from blip2kit.core import build_component, build_model
from blip2kit.core.configs import ComponentConfig, validate_component_config
from blip2kit.core.errors import ComponentConfigError, DeviceError
from blip2kit.registry import ComponentCard, Registry, load_registry
from doubles import PatchVision

BUILTINS = load_registry(autoload=False)
COMPONENT_CARDS = [card for kind in ("vision", "bridge", "language") for card in BUILTINS.cards(kind)]


@pytest.mark.parametrize("card", COMPONENT_CARDS, ids=lambda card: card.name)
def test_every_builtin_card_declares_a_config_class_its_defaults_satisfy(card: ComponentCard) -> None:
    # A key added to a card's config without a field in its class fails here, by name.
    config_class = card.load_config_class()
    assert config_class is not None and issubclass(config_class, ComponentConfig)
    assert config_class.model_config["extra"] == "forbid"
    assert config_class.model_validate(card.config).model_dump() == card.config


def builtin(kind: str, name: str) -> ComponentCard:
    return BUILTINS.get(kind, name)  # type: ignore[return-value]


# (card, override, what the message must say): one row per class of bad value.
BAD_CONFIGS = [
    (("vision", "vit_tiny"), {"width": "64"}, ["vision encoder 'vit_tiny'", "'width'", "'64' (str)", "valid integer", "positive multiple of num_heads"]),
    (("vision", "vit_tiny"), {"depth": 0}, ["'depth' = 0", "greater than 0"]),
    (("vision", "vit_tiny"), {"num_heads": 5}, ["num_heads 5 does not divide width 64", "1, 2, 4, 8"]),
    (("vision", "vit_tiny"), {"image_size": 100}, ["image_size 100 is not a multiple of patch_size 14", "98 or 112"]),
    (("vision", "vit_tiny"), {"grad_checkpointing": 1}, ["'grad_checkpointing' = 1", "valid boolean"]),
    (("vision", "vit_l_tiny"), {"image_size": 120}, ["vision encoder 'vit_l_tiny'", "image_size 120 is not a multiple of patch_size 14"]),
    (("vision", "vit_l_tiny"), {"vision_cfg": {"width": 64, "head_width": 24}}, ["vision_cfg.head_width 24 does not divide vision_cfg.width 64"]),
    (("bridge", "qformer_tiny"), {"dropout": 1.0}, ["bridge 'qformer_tiny'", "'dropout' = 1.0", "[0, 1)"]),
    (("bridge", "qformer_tiny"), {"dropout": -0.1}, ["'dropout' = -0.1", "[0, 1)"]),
    (("bridge", "qformer_tiny"), {"num_heads": 5}, ["num_heads 5 does not divide hidden_size 32", "1, 2, 4, 8, 16, 32"]),
    (("bridge", "qformer_tiny"), {"num_queries": 0}, ["'num_queries' = 0", "positive integer"]),
    (("bridge", "qformer_tiny"), {"hidden_size": 32.0}, ["'hidden_size' = 32.0 (float)", "valid integer"]),
    (("language", "opt_tiny"), {"num_attention_heads": 3}, ["language model 'opt_tiny'", "num_attention_heads 3 does not divide hidden_size 64"]),
    (("language", "opt_tiny"), {"max_text_length": 0}, ["'max_text_length' = 0", "greater than 0"]),
    (("language", "opt_tiny"), {"prompt": None}, ["'prompt' = None", "valid string"]),
    (("language", "flant5_tiny"), {"dense_act_fn": "gelu_fancy"}, ["language model 'flant5_tiny'", "dense_act_fn 'gelu_fancy' is not known", "gelu_new"]),
    (("language", "flant5_tiny"), {"feed_forward_proj": "gated-nope"}, ["feed_forward_proj 'gated-nope'", "'gated-' + one"]),
    (("language", "flant5_tiny"), {"num_heads": -4}, ["'num_heads' = -4", "greater than 0"]),
]


@pytest.mark.parametrize(("slot", "override", "expected"), BAD_CONFIGS,
                         ids=[f"{slot[1]}-{next(iter(override))}" for slot, override, _ in BAD_CONFIGS])
def test_bad_config_values_are_refused_naming_component_field_and_allowed_values(
    slot: tuple[str, str], override: dict[str, Any], expected: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    card = builtin(*slot)
    monkeypatch.setattr(ComponentCard, "load_factory", lambda self: pytest.fail("built before validating"))
    with pytest.raises(ComponentConfigError) as error:
        build_component(card, override)
    message = str(error.value)
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"


def test_overrides_through_build_model_are_checked_before_building(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ComponentConfigError, match="bridge 'qformer_tiny'.*'num_layers' = 0"):
        build_model("vit_tiny+qformer_tiny+opt_tiny", bridge={"num_layers": 0})


def test_unknown_fields_name_the_close_match() -> None:
    card = ComponentCard(name="typed", kind="vision", factory="doubles:build_patch_vision",
                         config_class=PatchConfig, config={"width": 16})
    # (build_component's override merge refuses unknown keys first; the class says the same.)
    with pytest.raises(ComponentConfigError, match=r"unknown field 'widht' \(did you mean 'width'\?\)"):
        validate_component_config(card, {"widht": 16})


class PatchConfig(ComponentConfig):
    """A third party's typed config for the PatchVision double."""

    width: int = Field(16, gt=0, description="a positive even integer")
    image_size: int = Field(32, gt=0, description="a multiple of patch_size")
    patch_size: int = Field(8, gt=0, description="a positive integer")


def test_third_party_cards_declare_their_own_config_class(registry: Registry) -> None:
    registry.add_vision_encoder(
        ComponentCard(name="typed_vit", kind="vision", factory="doubles:build_patch_vision",
                      config_class=PatchConfig, config={"width": 16, "image_size": 32, "patch_size": 8},
                      width=16, distribution="acme-vision")
    )
    model = build_model("typed_vit+double_bridge")
    assert isinstance(model.vision, PatchVision)
    with pytest.raises(ComponentConfigError, match=r"vision encoder 'typed_vit' \(from acme-vision\).*'width' = -1"):
        build_model("typed_vit+double_bridge", vision={"width": -1})


def test_config_class_by_dotted_path_must_be_a_pydantic_model() -> None:
    card = ComponentCard(name="odd", kind="vision", factory="doubles:build_patch_vision",
                         config_class="doubles:PatchVision", config={})
    with pytest.raises(TypeError, match="config_class 'doubles:PatchVision', which is not a pydantic BaseModel"):
        build_component(card)


def test_plain_dict_configs_still_work_for_third_parties(registry: Registry) -> None:
    card = registry.get("vision", "double_vision")
    assert card.config_class is None
    assert build_component(card, {"image_size": 16}).image_size == 16


def test_unknown_dtype_is_refused_before_building(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ComponentCard, "load_factory", lambda self: pytest.fail("built before checking"))
    with pytest.raises(DeviceError, match="unknown dtype 'fp8'.*bf16"):
        build_model("vit_tiny+qformer_tiny+opt_tiny", dtype="fp8")
    with pytest.raises(DeviceError, match="torch.int8 is not a floating-point dtype"):
        build_model("vit_tiny+qformer_tiny+opt_tiny", dtype=torch.int8)


def test_devices_that_do_not_exist_here_are_refused_before_building(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ComponentCard, "load_factory", lambda self: pytest.fail("built before checking"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="device='cuda' asks for a CUDA GPU, but .*use device='cpu'"):
        build_model("vit_tiny+qformer_tiny+opt_tiny", device="cuda")
    with pytest.raises(DeviceError, match="device='gpu' is not a device.*'cuda:0'"):
        build_model("vit_tiny+qformer_tiny+opt_tiny", device="gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(DeviceError, match="asks for GPU 3, but this machine has 2"):
        build_component(BUILTINS.get("vision", "vit_tiny"), device="cuda:3")  # type: ignore[arg-type]
