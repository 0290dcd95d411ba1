"""Registry precedence and plugin loading (issue 8 item 5): blip2kit's own plugins register first
whatever the entry-point order, a third party shadowing a built-in is the one refused (named, with
the setting that allows it), registration is all or nothing per plugin, BaseExceptions from a
plugin are reported, load problems reach `list --json`, and cards take callable factories.

Installed distributions are faked: ``_entry_points`` is replaced by entry points whose ``dist``
names the distribution, in the order a test picks.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

import blip2kit.registry.registry as registry_module
from blip2kit.core import build_model
from blip2kit.core.cli import main
from blip2kit.registry import ComponentCard, ModelCard, Registry, hookimpl, load_registry
from doubles import DoublesPlugin, PatchVision


class FakeDistribution:
    def __init__(self, name: str) -> None:
        self.metadata = {"Name": name}


class FakeEntryPoint:
    """What importlib.metadata gives for one `[project.entry-points.blip2kit]` line."""

    def __init__(self, name: str, distribution: str, plugin: Any) -> None:
        self.name, self.dist, self._plugin = name, FakeDistribution(distribution), plugin

    def load(self) -> Any:
        if isinstance(self._plugin, BaseException):
            raise self._plugin
        if callable(self._plugin) and not hasattr(self._plugin, "blip2kit_register"):
            return self._plugin()  # a module whose import runs code
        return self._plugin


def builtin_entry_points() -> list[Any]:
    return [ep for ep in registry_module._entry_points() if registry_module._distribution_of(ep) == "blip2kit"]


def use_entry_points(monkeypatch: pytest.MonkeyPatch, entry_points: list[Any]) -> None:
    monkeypatch.setattr(registry_module, "_entry_points", lambda: list(entry_points))


def vision_card(name: str, **fields: Any) -> ComponentCard:
    return ComponentCard(name=name, kind="vision", factory="doubles:build_patch_vision",
                         config={"width": 16, "image_size": 32, "patch_size": 8}, width=16, **fields)


class TakesVitG:
    """A third-party plugin that registers its own encoder, then one called like the built-in."""

    def __init__(self, replace: bool = False) -> None:
        self.replace = replace

    @hookimpl
    def blip2kit_register(self, registry: Registry) -> None:
        registry.add_vision_encoder(vision_card("acme_vit"))
        registry.add_vision_encoder(vision_card("vit_g"), replace=self.replace)


@pytest.mark.parametrize("third_party_first", [True, False], ids=["third-party-found-first", "built-ins-found-first"])
def test_builtins_win_whatever_the_entry_point_order(monkeypatch: pytest.MonkeyPatch, third_party_first: bool) -> None:
    builtins = builtin_entry_points()
    intruder = FakeEntryPoint("acme", "acme-vision", TakesVitG())
    use_entry_points(monkeypatch, [intruder, *builtins] if third_party_first else [*builtins, intruder])

    with pytest.warns(RuntimeWarning, match="acme-vision"):
        registry = load_registry()

    # The built-in keeps its name and every other built-in card is there.
    assert registry.get("vision", "vit_g").distribution == "blip2kit"
    assert {"vit_l", "vit_tiny", "qformer", "opt_2.7b", "flant5_xl"} <= {card.name for card in registry.cards()}
    assert {name for name, dist in registry.plugins.items() if dist == "blip2kit"} == {
        "vision", "bridges", "language", "models", "shapes"}
    # The intruder is the one refused, by distribution, with the settings that would change that.
    [problem] = registry.load_errors
    assert (problem.plugin, problem.distribution) == ("acme", "acme-vision")
    assert "vision encoder 'vit_g' is already registered by blip2kit" in problem.error
    assert "acme-vision may not shadow it" in problem.error
    assert "replace=True" in problem.error
    assert "BLIP2KIT_BLOCK_PLUGINS=acme-vision" in problem.error
    # All or nothing: its first card, registered before the refusal, is gone too.
    assert "acme_vit" not in registry.names("vision")


def test_replace_true_lets_a_third_party_take_a_builtin_name(monkeypatch: pytest.MonkeyPatch) -> None:
    # Found first, it still registers after the built-ins, so its replacement is the one that stays.
    use_entry_points(monkeypatch, [FakeEntryPoint("acme", "acme-vision", TakesVitG(replace=True)), *builtin_entry_points()])
    registry = load_registry()
    assert registry.load_errors == []
    assert registry.get("vision", "vit_g").distribution == "acme-vision"
    assert registry.get("vision", "vit_l").distribution == "blip2kit"


def test_third_parties_register_in_a_fixed_order(monkeypatch: pytest.MonkeyPatch) -> None:
    class Claims:
        @hookimpl
        def blip2kit_register(self, registry: Registry) -> None:
            registry.add_vision_encoder(vision_card("shared_name"))

    for order in ([("b", "beta-dist"), ("a", "alpha-dist")], [("a", "alpha-dist"), ("b", "beta-dist")]):
        use_entry_points(monkeypatch, [FakeEntryPoint(name, dist, Claims()) for name, dist in order])
        with pytest.warns(RuntimeWarning):
            registry = load_registry()
        assert registry.get("vision", "shared_name").distribution == "alpha-dist"
        assert [problem.distribution for problem in registry.load_errors] == ["beta-dist"]


def test_a_plugin_failing_halfway_leaves_none_of_its_cards() -> None:
    class Halfway:
        @hookimpl
        def blip2kit_register(self, registry: Registry) -> None:
            registry.add_vision_encoder(vision_card("early_vit"))
            registry.add_model(ModelCard(name="early-model", composition="early_vit+double_bridge"))
            raise RuntimeError("index file missing")

    with pytest.warns(RuntimeWarning, match="index file missing"):
        registry = load_registry(extra_plugins=[("halfway", Halfway()), ("doubles", DoublesPlugin())])
    assert "early_vit" not in registry.names("vision")
    assert "early-model" not in registry.names("model")
    assert "halfway" not in registry.plugins
    assert "double_vision" in registry.names("vision")  # the next plugin still loads


@pytest.mark.parametrize("stage", ["import", "register"])
def test_sys_exit_from_a_plugin_is_reported_not_fatal(monkeypatch: pytest.MonkeyPatch, stage: str) -> None:
    class ExitsWhileRegistering:
        @hookimpl
        def blip2kit_register(self, registry: Registry) -> None:
            registry.add_vision_encoder(vision_card("exiting_vit"))
            raise SystemExit(3)

    plugin: Any = SystemExit("cannot run without a licence key") if stage == "import" else ExitsWhileRegistering()
    use_entry_points(monkeypatch, [*builtin_entry_points(), FakeEntryPoint("exiter", "exiting-dist", plugin)])
    with pytest.warns(RuntimeWarning, match="exiting-dist"):
        registry = load_registry()
    [problem] = registry.load_errors
    assert problem.distribution == "exiting-dist"
    assert "SystemExit" in problem.error and "sys.exit" in problem.error
    assert f"while {'importing' if stage == 'import' else 'registering'}" in problem.error
    assert "exiting_vit" not in registry.names("vision")
    assert "vit_g" in registry.names("vision")


def test_keyboard_interrupt_while_loading_a_plugin_still_stops(monkeypatch: pytest.MonkeyPatch) -> None:
    use_entry_points(monkeypatch, [FakeEntryPoint("slow", "slow-dist", KeyboardInterrupt())])
    with pytest.raises(KeyboardInterrupt):
        load_registry()


def test_list_json_reports_load_problems(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    use_entry_points(monkeypatch, [*builtin_entry_points(), FakeEntryPoint("broken", "broken-dist", ImportError("no CUDA toolkit"))])
    with pytest.warns(RuntimeWarning):
        registry = load_registry()
    monkeypatch.setattr(registry_module, "_REGISTRY", registry)
    assert main(["list", "--json"]) == 0
    captured = capsys.readouterr()
    listing = json.loads(captured.out)
    assert listing["problems"] == [
        {"plugin": "broken", "distribution": "broken-dist", "error": "ImportError: no CUDA toolkit"}
    ]
    assert {"vit_g", "qformer", "blip2-opt-2.7b"} <= {record["name"] for record in listing["components"]}
    assert "broken-dist" in captured.err  # the table form warns on stderr too


def test_cards_accept_a_callable_factory_in_process(registry: Registry, capsys: pytest.CaptureFixture[str]) -> None:
    calls = []

    def build_notebook_vision(config: dict, device: Any = None) -> PatchVision:
        calls.append(dict(config))
        return PatchVision(**config)

    registry.add_vision_encoder(
        ComponentCard(name="notebook_vit", kind="vision", factory=build_notebook_vision,
                      config={"width": 16, "image_size": 32, "patch_size": 8}, width=16)
    )
    model = build_model("notebook_vit+double_bridge", vision={"image_size": 16})
    assert isinstance(model.vision, PatchVision) and model.vision.image_size == 16
    assert calls == [{"width": 16, "image_size": 16, "patch_size": 8}]
    # Listed under its importable-looking path rather than a repr.
    assert main(["list", "--json", "--kind", "vision"]) == 0
    records = {r["name"]: r for r in json.loads(capsys.readouterr().out)["components"]}
    assert records["notebook_vit"]["factory"].endswith(":test_cards_accept_a_callable_factory_in_process.<locals>.build_notebook_vision")


def test_a_factory_that_is_neither_path_nor_callable_is_refused() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="dotted path"):
        ComponentCard(name="v", kind="vision", factory="not a path")
    with pytest.raises(ValidationError):
        ComponentCard(name="v", kind="vision", factory=42)  # type: ignore[arg-type]
