"""Every registered built-in card is checked against the component it builds (timm's habit of
parametrizing the suite over the registry): on the meta device, the declared width and parameter
count must be exactly what the factory builds, and every named model must resolve."""

from __future__ import annotations

import pytest

from blip2kit.core import build_component, count_parameters
from blip2kit.registry import load_registry

BUILTINS = load_registry(autoload=False)
COMPONENT_CARDS = [card for kind in ("vision", "bridge", "language") for card in BUILTINS.cards(kind)]
MODEL_CARDS = BUILTINS.cards("model")


@pytest.mark.parametrize("card", COMPONENT_CARDS, ids=lambda card: f"{card.kind}-{card.name}")
def test_card_matches_what_it_builds(card) -> None:
    assert card.distribution == "blip2kit"
    assert card.width is not None and card.params is not None, "built-in cards declare width and params"
    assert card.description, "built-in cards say what they are"
    component = build_component(card, device="meta")
    assert all(p.device.type == "meta" for p in component.parameters())
    assert count_parameters(component).total == card.params
    width = {"vision": "width", "bridge": "hidden_size", "language": "hidden_size"}[card.kind]
    assert getattr(component, width) == card.width
    if card.kind == "vision":
        assert card.preprocessing is not None
        assert card.preprocessing.image_size == component.image_size


@pytest.mark.parametrize("card", MODEL_CARDS, ids=lambda card: card.name)
def test_named_model_resolves(card) -> None:
    composition = BUILTINS.resolve(card.name)
    assert composition.model_card == card
    assert card.weights or card.lavis_weights, "a named model says where its weights come from"


def test_builtin_registry_loads_cleanly() -> None:
    assert BUILTINS.load_errors == []
