"""Typed component configs: the base class built-in (and third-party) config models derive from,
and the check ``build_component`` runs before anything is built.

A card names its config class (``ComponentCard.config_class``); ``validate_component_config``
validates the merged config against it and turns pydantic's report into one message that names
the component, each bad field, its value and what is allowed. Cards without a config class keep
plain-dict configs, passed to the factory as they are.

Imports no torch, so config classes can live beside plugins' cards.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from blip2kit.core.errors import ComponentConfigError
from blip2kit.registry import ComponentCard
from blip2kit.registry.cards import KIND_LABELS


class ComponentConfig(BaseModel):
    """Base of component config models: unknown keys refused, no silent coercion ("64" or True
    for an int is an error, an int for a float is fine)."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True)


def divisors(number: int, limit: int = 8) -> str:
    """The divisors of ``number`` for a message, e.g. '1, 2, 4, 8, 16, 32, 64'."""
    found = [d for d in range(1, number + 1) if number % d == 0]
    shown = found if len(found) <= limit else found[: limit // 2] + ["..."] + found[-limit // 2:]
    return ", ".join(map(str, shown))


def validate_component_config(card: ComponentCard, config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` checked against the card's config class; the validated fields as a dict.

    Without a config class the config is returned unchanged. Raises ComponentConfigError.
    """
    config_class = card.load_config_class()
    if config_class is None:
        return dict(config)
    try:
        validated = config_class.model_validate(dict(config))
    except ValidationError as error:
        raise ComponentConfigError(describe_config_error(card, config_class, error)) from None
    return validated.model_dump()


def describe_config_error(
    card: ComponentCard, config_class: type[BaseModel], error: ValidationError
) -> str:
    """One message for every problem pydantic found, each naming its field and what is allowed."""
    fields = sorted(config_class.model_fields)
    problems = []
    for item in error.errors(include_url=False):
        location = ".".join(str(part) for part in item["loc"])
        if item["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(item["loc"][-1]), fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"unknown field {location!r}{hint}; the fields are {', '.join(fields)}")
            continue
        message = str(item["msg"]).removeprefix("Value error, ")
        if not location:  # a check across fields: its message names them
            problems.append(message)
            continue
        value = item.get("input")
        problems.append(
            f"field {location!r} = {value!r} ({type(value).__name__}): {message}"
            + _allowed_hint(config_class, item)
        )
    label = f"{KIND_LABELS[card.kind]} {card.name!r}"
    if card.distribution:
        label += f" (from {card.distribution})"
    return f"{label} config is not valid: " + "; ".join(problems)


def _allowed_hint(config_class: type[BaseModel], item: Mapping[str, Any]) -> str:
    """The field's description, which says what values it takes, when pydantic's message alone
    does not (e.g. "Input should be a valid integer")."""
    field = config_class.model_fields.get(str(item["loc"][0]))
    if field is None or not field.description:
        return ""
    return f" [{item['loc'][0]}: {field.description}]"


__all__ = ["ComponentConfig", "describe_config_error", "divisors", "validate_component_config"]
