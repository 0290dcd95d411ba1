"""Component and model cards: the typed, frozen records a plugin hands to the registry.

A card describes a component without importing its code: the factory is a dotted path that is
imported only when the component is built, so listing every registered name stays instant. In a
notebook or a test the factory (and the config class) may be the object itself instead.
"""

from __future__ import annotations

import importlib
import re
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

ComponentKind = Literal["vision", "bridge", "language"]

# What each kind is called in messages and which slot of "vision+bridge+language" it fills.
KIND_LABELS: dict[str, str] = {
    "vision": "vision encoder",
    "bridge": "bridge",
    "language": "language model",
    "model": "model",
}

_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_FACTORY_PATTERN = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def _valid_name(value: str) -> str:
    if not _NAME_PATTERN.match(value) or "+" in value:
        raise ValueError(
            f"card name {value!r} is not valid: use letters, digits, '_', '.', '-' and no '+' "
            "('+' joins the parts of a composed name)"
        )
    return value


class Preprocessing(BaseModel):
    """How pixels must be prepared for the weights a card names (the CLIP recipe by default)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    image_size: int = Field(224, description="square input side in pixels")
    mean: tuple[float, float, float] = Field(
        (0.48145466, 0.4578275, 0.40821073), description="per-channel mean after scaling to [0, 1]"
    )
    std: tuple[float, float, float] = Field(
        (0.26862954, 0.26130258, 0.27577711), description="per-channel std after scaling to [0, 1]"
    )
    interpolation: Literal["bicubic", "bilinear", "nearest"] = Field(
        "bicubic", description="resize filter"
    )


class CheckpointFormats(BaseModel):
    """What a component declares so checkpoints without ``blip2kit.json`` can be routed to it.

    A Hugging Face ``Blip2*`` config.json holds sub-configs (``vision_config``, ``qformer_config``,
    ``text_config``) tagged by ``model_type``; a LAVIS file holds a projection under a prefix.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    hf_model_types: tuple[str, ...] = Field(
        (), description="model_type values of HF Blip2 sub-configs this component is built from, "
        "e.g. ('opt',) for text_config, ('blip_2_vision_model',) for vision_config"
    )
    hf_config_reader: str | None = Field(
        None, description="'module:callable' called as reader(sub_config, blip2_config) -> "
        "(card name, config overrides): the card to build and its settings, with the defaults of "
        "the sub-config's transformers class for omitted fields; raises for settings it cannot honour"
    )
    lavis_projection_prefix: str | None = Field(
        None, description="language models: the projection's key prefix in LAVIS files, e.g. 'opt_proj.'"
    )

    def load_reader(self) -> Callable[..., Any]:
        """Import the ``hf_config_reader`` callable."""
        if self.hf_config_reader is None:
            raise ValueError("this card declares no hf_config_reader")
        module_name, _, attribute = self.hf_config_reader.partition(":")
        target: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
        return target


class ComponentCard(BaseModel):
    """One registered component: a vision encoder, a bridge or a language model."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(description="the name used in composed names, e.g. 'vit_g'")
    kind: ComponentKind = Field(description="which slot of vision+bridge+language it fills")
    factory: str | Callable[..., Any] = Field(
        description="'module.path:callable' (or, in process, the callable itself) called as "
        "factory(config, device=...) -> component"
    )
    config: dict[str, Any] = Field(
        default_factory=dict, description="default configuration passed to the factory"
    )
    config_class: str | type[BaseModel] | None = Field(
        None,
        description="'module.path:Class' (or the class) of a pydantic model that validates the "
        "config before anything is built (extra='forbid' and constraints); the factory then gets "
        "its validated fields as a dict. None: the config is passed as is",
    )
    width: int | None = Field(
        None,
        description="output feature width: vision feature width, bridge hidden size, LLM hidden size",
    )
    params: int | None = Field(
        None,
        description="parameter count of the default configuration (the test suite checks it "
        "against a meta-device build)",
    )
    weights: str | None = Field(
        None, description="where pretrained weights come from: a hub id, a tag or a URL"
    )
    preprocessing: Preprocessing | None = Field(
        None, description="image preprocessing that belongs to the weights (vision encoders)"
    )
    provenance: str = Field("", description="paper or upstream implementation this follows")
    description: str = Field("", description="one line for `blip2kit list`")
    distribution: str | None = Field(
        None, description="the installed distribution that registered it (filled in at loading)"
    )
    formats: CheckpointFormats = Field(
        default_factory=CheckpointFormats,
        description="how HF and LAVIS checkpoints without blip2kit.json are routed to this component",
    )
    recipe: str | None = Field(
        None,
        description="'module.path' of a recipe that makes this component's weights offline, as "
        "`blip2kit demo` uses for its frozen towers: the module offers RecipeSettings, FAST, "
        "make_towers, packaged_seed, made_tower_settings and llm_vqa_bounds "
        "(the built-in shapes towers' recipe is the example); None for components with released weights",
    )

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        return _valid_name(value)

    @field_validator("factory")
    @classmethod
    def _check_factory(cls, value: str | Callable[..., Any]) -> str | Callable[..., Any]:
        if isinstance(value, str) and not _FACTORY_PATTERN.match(value):
            raise ValueError(
                f"factory {value!r} must be a dotted path 'package.module:callable' or a callable"
            )
        return value

    @field_validator("config_class")
    @classmethod
    def _check_config_class(cls, value: str | type[BaseModel] | None) -> str | type[BaseModel] | None:
        if isinstance(value, str) and not _FACTORY_PATTERN.match(value):
            raise ValueError(
                f"config_class {value!r} must be a dotted path 'package.module:Class' or the class"
            )
        return value

    @property
    def factory_path(self) -> str:
        """The factory as 'module:qualname', also when the card holds the callable itself."""
        return _dotted_path(self.factory)

    def load_factory(self) -> Callable[..., Any]:
        """Import and return the factory callable; the error names the card when it fails."""
        return self._import(self.factory, "factory")

    def load_config_class(self) -> type[BaseModel] | None:
        """Import and return the config class (None when the card has none)."""
        if self.config_class is None:
            return None
        config_class = self._import(self.config_class, "config_class")
        if not (isinstance(config_class, type) and issubclass(config_class, BaseModel)):
            raise TypeError(
                f"{KIND_LABELS[self.kind]} {self.name!r} (from {self.distribution or 'unknown'}) "
                f"names config_class {_dotted_path(self.config_class)!r}, which is not a pydantic "
                "BaseModel subclass"
            )
        return config_class

    def _import(self, target: Any, field: str) -> Any:
        if not isinstance(target, str):
            return target
        module_name, _, attribute = target.partition(":")
        try:
            found: Any = importlib.import_module(module_name)
            for part in attribute.split("."):
                found = getattr(found, part)
        except (ImportError, AttributeError) as error:
            raise ImportError(
                f"{KIND_LABELS[self.kind]} {self.name!r} (from {self.distribution or 'unknown'}) "
                f"names {field} {target!r}, which cannot be imported: {error}"
            ) from error
        return found


def _dotted_path(target: Any) -> str:
    if isinstance(target, str):
        return target
    module = getattr(target, "__module__", None) or "?"
    return f"{module}:{getattr(target, '__qualname__', type(target).__name__)}"


class ModelCard(BaseModel):
    """A named full model, e.g. 'blip2-opt-2.7b': a composition plus the weights released for it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(description="the checkpoint's name, e.g. 'blip2-opt-2.7b'")
    composition: str = Field(description="the composed name it builds, e.g. 'vit_g+qformer+opt_2.7b'")
    overrides: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="per-slot config overrides, e.g. {'vision': {'image_size': 364}}",
    )
    weights: str | None = Field(None, description="Hugging Face hub id of the released weights")
    lavis_weights: str | None = Field(None, description="URL of the LAVIS .pth with the same weights")
    provenance: str = Field("", description="where the weights come from")
    description: str = Field("", description="one line for `blip2kit list`")
    distribution: str | None = Field(None, description="the distribution that registered it")

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        return _valid_name(value)

    @field_validator("overrides")
    @classmethod
    def _check_override_slots(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        unknown = set(value) - {"vision", "bridge", "language"}
        if unknown:
            raise ValueError(
                f"overrides name unknown slots {sorted(unknown)}; use 'vision', 'bridge', 'language'"
            )
        return value

    @property
    def kind(self) -> str:
        return "model"
