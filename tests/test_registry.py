"""Registry behaviour: names, cards, duplicates, unknown names, loading and blocking plugins."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from blip2kit.registry import (
    ComponentCard,
    DuplicateNameError,
    MalformedNameError,
    ModelCard,
    Registry,
    UnknownNameError,
    hookimpl,
    load_registry,
)
from doubles import DoublesPlugin


def card(name: str, kind: str = "vision", **fields: object) -> ComponentCard:
    return ComponentCard(name=name, kind=kind, factory="doubles:build_patch_vision", **fields)


def test_registry_import_pulls_in_no_torch() -> None:
    code = "import sys, blip2kit.registry as r; r.get_registry(); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_cards_are_frozen_and_strict() -> None:
    vision = card("v1", width=8)
    with pytest.raises(ValidationError):
        vision.name = "other"  # type: ignore[misc]
    with pytest.raises(ValidationError, match="extra"):
        ComponentCard(name="v", kind="vision", factory="a:b", colour="red")  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="dotted path"):
        ComponentCard(name="v", kind="vision", factory="no_colon")
    with pytest.raises(ValidationError, match="no '\\+'"):
        ComponentCard(name="a+b", kind="vision", factory="a:b")
    with pytest.raises(ValidationError, match="unknown slots"):
        ModelCard(name="m", composition="a+b", overrides={"decoder": {}})


def test_factory_is_imported_lazily_and_errors_name_the_card() -> None:
    broken = ComponentCard(name="ghost", kind="bridge", factory="no_such_module:build", distribution="ghostpkg")
    with pytest.raises(ImportError, match="bridge 'ghost' \\(from ghostpkg\\) names factory"):
        broken.load_factory()


def test_duplicates_are_refused_unless_replaced_on_purpose() -> None:
    registry = Registry()
    with registry.providing("first-dist"):
        registry.add_vision_encoder(card("enc", width=8))
    with pytest.raises(DuplicateNameError, match="already registered by first-dist"):
        registry.add_vision_encoder(card("enc", width=9))
    registry.add_vision_encoder(card("enc", width=9), replace=True)
    assert registry.get("vision", "enc").width == 9
    # the same name may be used by a different kind
    registry.add_bridge(card("enc", kind="bridge"))


def test_cards_must_be_added_to_their_own_kind() -> None:
    registry = Registry()
    with pytest.raises(ValueError, match="call add_bridge"):
        registry.add_vision_encoder(card("b", kind="bridge"))
    with pytest.raises(TypeError, match="expects a ModelCard"):
        registry.add_model(card("m"))  # type: ignore[arg-type]


def test_unknown_name_names_the_slot_and_close_matches(registry: Registry) -> None:
    with pytest.raises(UnknownNameError) as error:
        registry.resolve("double_vision+double_bridge+double_lmm")
    message = str(error.value)
    assert "unknown language model 'double_lmm'" in message
    assert "part 3 of vision+bridge+language" in message
    assert "'double_lm'" in message
    assert "blip2kit list" in message


def test_wrong_slot_is_explained(registry: Registry) -> None:
    with pytest.raises(UnknownNameError, match="registered as a language model, not a vision encoder"):
        registry.resolve("double_lm+double_bridge")


def test_malformed_names(registry: Registry) -> None:
    for name in ["", "a+b+c+d", "double_vision++double_lm", "double_vision"]:
        with pytest.raises(MalformedNameError):
            registry.resolve(name)
    with pytest.raises(UnknownNameError, match="unknown model 'blip3'"):
        registry.resolve("blip3")


def test_two_and_three_part_names_resolve(registry: Registry) -> None:
    stage1 = registry.resolve("double_vision+double_bridge")
    assert (stage1.stage, stage1.vision.name, stage1.bridge.name, stage1.language) == (
        1, "double_vision", "double_bridge", None
    )
    stage2 = registry.resolve(" double_vision + double_bridge + double_lm ")
    assert stage2.stage == 2 and stage2.language is not None and stage2.language.name == "double_lm"


def test_named_models_resolve_to_their_composition(registry: Registry) -> None:
    registry.add_model(
        ModelCard(
            name="double-coco",
            composition="double_vision+double_bridge+double_lm",
            overrides={"vision": {"image_size": 64}},
        )
    )
    resolved = registry.resolve("double-coco")
    assert resolved.language is not None and resolved.language.name == "double_lm"
    assert resolved.overrides == {"vision": {"image_size": 64}}
    assert resolved.model_card is not None and resolved.model_card.name == "double-coco"


def test_builtins_load_through_the_entry_point_group() -> None:
    registry = load_registry()
    builtins = ("vision", "bridges", "language", "models")
    assert set(builtins) <= set(registry.plugins)
    assert all(registry.plugins[name] == "blip2kit" for name in builtins)
    assert registry.load_errors == []


def test_misspelled_hook_fails_loudly_without_taking_others_down() -> None:
    class Misspelled:
        @hookimpl
        def blip2kit_regster(self, registry: Registry) -> None:  # typo on purpose
            raise AssertionError("never called")

    with pytest.warns(RuntimeWarning, match="misspelled"):
        registry = load_registry(extra_plugins=[("misspelled", Misspelled()), ("doubles", DoublesPlugin())])
    assert [problem.plugin for problem in registry.load_errors] == ["misspelled"]
    assert "blip2kit_regster" in registry.load_errors[0].error
    assert "double_vision" in registry.names("vision")


def test_plugin_raising_while_registering_is_reported() -> None:
    class Raising:
        @hookimpl
        def blip2kit_register(self, registry: Registry) -> None:
            raise RuntimeError("weights index missing")

    with pytest.warns(RuntimeWarning, match="weights index missing"):
        registry = load_registry(extra_plugins=[("raising", Raising()), ("doubles", DoublesPlugin())])
    assert registry.load_errors[0].plugin == "raising"
    assert "double_bridge" in registry.names("bridge")


def test_block_list_skips_named_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BLIP2KIT_BLOCK_PLUGINS", "language, nothing-else")
    registry = load_registry()
    assert "language" not in registry.plugins
    assert "vision" in registry.plugins
