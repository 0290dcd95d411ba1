"""The registry: every component card and named model, filled by plugins through pluggy.

``get_registry()`` loads the ``blip2kit`` entry-point group once per process. Each plugin is loaded
and called on its own: one that fails to import, implements an unknown hook or raises while
registering (any exception, ``SystemExit`` included; ``KeyboardInterrupt`` still stops the program)
is recorded in ``registry.load_errors`` with its distribution name, and the rest load.

Precedence does not depend on the order in which Python finds distributions: blip2kit's own
plugins always register first, then third-party plugins sorted by (distribution, entry-point
name), then plugins passed in process. So a third-party plugin that takes a built-in name without
``replace=True`` is the one refused, never the built-in. Registration is all or nothing per plugin:
when a plugin fails halfway, none of its cards stay registered.

Environment:

- ``BLIP2KIT_DISABLE_PLUGIN_AUTOLOAD=1``: load only the built-in plugins of blip2kit itself.
- ``BLIP2KIT_BLOCK_PLUGINS=a,b``: skip the plugins with these entry-point or distribution names.
"""

from __future__ import annotations

import difflib
import os
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import pluggy

from blip2kit.registry.cards import KIND_LABELS, ComponentCard, ModelCard
from blip2kit.registry.errors import DuplicateNameError, MalformedNameError, UnknownNameError
from blip2kit.registry.hookspecs import PROJECT, Blip2kitSpec

ENTRY_POINT_GROUP = "blip2kit"
BUILTIN_DISTRIBUTION = "blip2kit"
IN_PROCESS_DISTRIBUTION = "(registered in process)"  # plugins passed to load_registry(extra_plugins=)
DISABLE_AUTOLOAD_ENV = "BLIP2KIT_DISABLE_PLUGIN_AUTOLOAD"
BLOCK_PLUGINS_ENV = "BLIP2KIT_BLOCK_PLUGINS"

SLOTS = ("vision", "bridge", "language")
_ADDERS = {
    "vision": "add_vision_encoder",
    "bridge": "add_bridge",
    "language": "add_language_model",
    "model": "add_model",
}


@dataclass(frozen=True)
class PluginLoadError:
    """A plugin that could not be loaded or failed while registering."""

    plugin: str
    distribution: str
    error: str

    def __str__(self) -> str:
        return f"plugin {self.plugin!r} from distribution {self.distribution!r}: {self.error}"

    def as_dict(self) -> dict[str, str]:
        return {"plugin": self.plugin, "distribution": self.distribution, "error": self.error}


@dataclass(frozen=True)
class Composition:
    """A resolved composed name: the cards for each slot (language is None for stage-1 models)."""

    name: str
    vision: ComponentCard
    bridge: ComponentCard
    language: ComponentCard | None
    overrides: dict[str, dict[str, Any]]
    model_card: ModelCard | None = None

    @property
    def stage(self) -> int:
        """1 for vision+bridge (representation learning), 2 for vision+bridge+language."""
        return 1 if self.language is None else 2


class Registry:
    """Cards by kind and name. Plugins add to it; the rest of blip2kit looks names up in it."""

    def __init__(self) -> None:
        self._cards: dict[str, dict[str, ComponentCard | ModelCard]] = {
            kind: {} for kind in (*SLOTS, "model")
        }
        self.load_errors: list[PluginLoadError] = []
        self.plugins: dict[str, str] = {}  # plugin name -> distribution
        self._current_distribution: str | None = None

    # -- adding (called from plugins' blip2kit_register hooks) --------------------------------

    def add_vision_encoder(self, card: ComponentCard, *, replace: bool = False) -> None:
        """Register a vision encoder card; a taken name raises DuplicateNameError unless ``replace``.

        The card's factory may be a dotted path or, in process (notebooks, tests), the callable.
        """
        self._add("vision", card, replace)

    def add_bridge(self, card: ComponentCard, *, replace: bool = False) -> None:
        """Register a bridge card (same rules as ``add_vision_encoder``)."""
        self._add("bridge", card, replace)

    def add_language_model(self, card: ComponentCard, *, replace: bool = False) -> None:
        """Register a language model card (same rules as ``add_vision_encoder``)."""
        self._add("language", card, replace)

    def add_model(self, card: ModelCard, *, replace: bool = False) -> None:
        """Register a named model (a composition plus its released weights)."""
        self._add("model", card, replace)

    def _add(self, kind: str, card: ComponentCard | ModelCard, replace: bool) -> None:
        """Add ``card`` under ``kind``; a taken name is refused unless ``replace``."""
        expected = ModelCard if kind == "model" else ComponentCard
        if not isinstance(card, expected):
            raise TypeError(
                f"{_ADDERS[kind]}() expects a {expected.__name__}, "
                f"got {type(card).__name__}"
            )
        if kind != "model" and card.kind != kind:
            raise ValueError(
                f"card {card.name!r} has kind {card.kind!r} but was added as a {KIND_LABELS[kind]}; "
                f"call {_ADDERS[card.kind]}()"
            )
        if card.distribution is None and self._current_distribution is not None:
            card = card.model_copy(update={"distribution": self._current_distribution})
        existing = self._cards[kind].get(card.name)
        if existing is not None and not replace:
            newcomer = card.distribution or "this plugin"
            message = (
                f"{KIND_LABELS[kind]} {card.name!r} is already registered by "
                f"{existing.distribution or 'an unknown distribution'}; {newcomer} may not shadow "
                f"it. Pick another name, or pass replace=True to {_ADDERS[kind]}() to override it "
                "on purpose."
            )
            if card.distribution not in (None, BUILTIN_DISTRIBUTION, IN_PROCESS_DISTRIBUTION):
                message += (
                    f" To run without {newcomer}'s plugins, set "
                    f"{BLOCK_PLUGINS_ENV}={card.distribution}."
                )
            raise DuplicateNameError(message)
        self._cards[kind][card.name] = card

    @contextmanager
    def all_or_nothing(self) -> Iterator[None]:
        """Within this block, an exception undoes every card added in it (one plugin's cards)."""
        saved = {kind: dict(cards) for kind, cards in self._cards.items()}
        try:
            yield
        except BaseException:
            self._cards = saved
            raise

    @contextmanager
    def providing(self, distribution: str) -> Iterator[None]:
        """Within this block, cards without a distribution are stamped with ``distribution``."""
        previous, self._current_distribution = self._current_distribution, distribution
        try:
            yield
        finally:
            self._current_distribution = previous

    # -- looking up ---------------------------------------------------------------------------

    def names(self, kind: str) -> list[str]:
        return sorted(self._cards[kind])

    def cards(self, kind: str | None = None) -> list[ComponentCard | ModelCard]:
        kinds = (*SLOTS, "model") if kind is None else (kind,)
        return [self._cards[k][name] for k in kinds for name in sorted(self._cards[k])]

    def get(self, kind: str, name: str, *, within: str | None = None) -> ComponentCard | ModelCard:
        """The card of ``kind`` called ``name``; an unknown name raises UnknownNameError."""
        card = self._cards[kind].get(name)
        if card is None:
            raise UnknownNameError(self._unknown_message(kind, name, within))
        return card

    def _unknown_message(self, kind: str, name: str, within: str | None) -> str:
        label = KIND_LABELS[kind]
        where = f" in {within!r}" if within else ""
        message = f"unknown {label} {name!r}{where}."
        if kind in SLOTS and within:
            message += f" The {label} is part {SLOTS.index(kind) + 1} of vision+bridge+language."
        others = [k for k in (*SLOTS, "model") if k != kind and name in self._cards[k]]
        if others:
            message += f" {name!r} is registered as a {KIND_LABELS[others[0]]}, not a {label}."
        matches = difflib.get_close_matches(name, self._cards[kind], n=3, cutoff=0.5)
        if matches:
            message += f" Did you mean {', '.join(repr(m) for m in matches)}?"
        elif self._cards[kind]:
            message += f" Known {label}s: {', '.join(sorted(self._cards[kind]))}."
        else:
            message += f" No {label} is registered at all."
        message += " Run `blip2kit list` to see every registered name."
        if self.load_errors:
            message += " Some plugins failed to load: " + "; ".join(map(str, self.load_errors))
        return message

    def resolve(self, name: str) -> Composition:
        """Resolve 'vision+bridge', 'vision+bridge+language' or a named model like 'blip2-opt-2.7b'."""
        if not isinstance(name, str) or not name.strip():
            raise MalformedNameError(
                f"a model name must be a non-empty string like 'vit_g+qformer+opt_2.7b', got {name!r}"
            )
        name = name.strip()
        if "+" not in name:
            if name in self._cards["model"]:
                model_card = self._cards["model"][name]
                composition = self.resolve(model_card.composition)
                return Composition(
                    name=name,
                    vision=composition.vision,
                    bridge=composition.bridge,
                    language=composition.language,
                    overrides=dict(model_card.overrides),
                    model_card=model_card,
                )
            found = [k for k in SLOTS if name in self._cards[k]]
            if found:
                raise MalformedNameError(
                    f"{name!r} is a single {KIND_LABELS[found[0]]}; a model is composed as "
                    "'vision+bridge' (stage 1) or 'vision+bridge+language' (stage 2), e.g. "
                    "'vit_g+qformer+opt_2.7b'. Run `blip2kit list` for the names."
                )
            raise UnknownNameError(self._unknown_message("model", name, None))
        parts = [part.strip() for part in name.split("+")]
        if len(parts) not in (2, 3) or not all(parts):
            raise MalformedNameError(
                f"{name!r} has {len(parts)} part(s); a composed name is 'vision+bridge' or "
                "'vision+bridge+language', each part a registered name (see `blip2kit list`)"
            )
        cards = [self.get(kind, part, within=name) for kind, part in zip(SLOTS, parts)]
        return Composition(
            name=name,
            vision=cards[0],  # type: ignore[arg-type]
            bridge=cards[1],  # type: ignore[arg-type]
            language=cards[2] if len(cards) == 3 else None,  # type: ignore[arg-type]
            overrides={},
        )


# -- loading ----------------------------------------------------------------------------------


def _blocked_names() -> set[str]:
    raw = os.environ.get(BLOCK_PLUGINS_ENV, "")
    return {part.strip() for part in raw.split(",") if part.strip()}


def _distribution_of(entry_point: metadata.EntryPoint) -> str:
    dist = getattr(entry_point, "dist", None)
    return dist.metadata["Name"] if dist is not None else "unknown"


def _entry_points() -> list[metadata.EntryPoint]:
    # One entry point per (distribution, name): an editable install can expose the same one twice.
    seen: set[tuple[str, str]] = set()
    unique = []
    for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP):
        key = (_distribution_of(entry_point), entry_point.name)
        if key not in seen:
            seen.add(key)
            unique.append(entry_point)
    return unique


def load_registry(
    *, extra_plugins: Iterable[tuple[str, object]] = (), autoload: bool | None = None
) -> Registry:
    """Build a fresh registry from the entry points (and ``extra_plugins``: (name, plugin) pairs).

    ``autoload=False`` (or BLIP2KIT_DISABLE_PLUGIN_AUTOLOAD=1) loads only blip2kit's own plugins.
    """
    if autoload is None:
        autoload = os.environ.get(DISABLE_AUTOLOAD_ENV, "").strip().lower() not in {"1", "true", "yes"}
    blocked = _blocked_names()
    registry = Registry()
    manager = pluggy.PluginManager(PROJECT)
    manager.add_hookspecs(Blip2kitSpec)

    candidates: list[tuple[str, str, Any]] = []  # (plugin name, distribution, loader)
    for entry_point in _entry_points():
        distribution = _distribution_of(entry_point)
        if not autoload and distribution != BUILTIN_DISTRIBUTION:
            continue
        if entry_point.name in blocked or distribution in blocked:
            continue
        candidates.append((entry_point.name, distribution, entry_point.load))
    # blip2kit's own plugins first, whatever order the entry points were found in.
    candidates.sort(
        key=lambda candidate: (candidate[1] != BUILTIN_DISTRIBUTION, candidate[1], candidate[0])
    )
    for plugin_name, plugin in extra_plugins:
        candidates.append((plugin_name, IN_PROCESS_DISTRIBUTION, lambda plugin=plugin: plugin))

    for plugin_name, distribution, load in candidates:
        try:
            plugin = load()
            manager.register(plugin, name=f"{distribution}:{plugin_name}")
            manager.check_pending()
        except BaseException as error:  # a broken plugin must not take the others down
            _drop(manager, f"{distribution}:{plugin_name}")
            _record(registry, plugin_name, distribution, "importing", error)
            continue
        others = [p for p in manager.get_plugins() if p is not plugin]
        call_only_this = manager.subset_hook_caller("blip2kit_register", remove_plugins=others)
        try:
            with registry.providing(distribution), registry.all_or_nothing():
                call_only_this(registry=registry)
        except BaseException as error:
            _drop(manager, f"{distribution}:{plugin_name}")
            _record(registry, plugin_name, distribution, "registering", error)
            continue
        registry.plugins[plugin_name] = distribution

    for problem in registry.load_errors:
        warnings.warn(f"blip2kit could not load {problem}", RuntimeWarning, stacklevel=2)
    return registry


def _record(
    registry: Registry, plugin_name: str, distribution: str, stage: str, error: BaseException
) -> None:
    """Note a plugin that failed while ``stage``; Ctrl-C is the user's, so it goes on up."""
    if isinstance(error, KeyboardInterrupt):
        raise error
    if isinstance(error, SystemExit):
        reason = f"SystemExit({error.code!r}) while {stage} (the plugin called sys.exit)"
    else:
        reason = f"{type(error).__name__}: {error}"
    registry.load_errors.append(PluginLoadError(plugin_name, distribution, reason))


def _drop(manager: pluggy.PluginManager, name: str) -> None:
    plugin = manager.get_plugin(name)
    if plugin is not None:
        manager.unregister(plugin)


_REGISTRY: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, loaded on first use."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = load_registry()
    return _REGISTRY


def reset_registry() -> None:
    """Forget the process-wide registry so the next ``get_registry()`` loads plugins again."""
    global _REGISTRY
    _REGISTRY = None
