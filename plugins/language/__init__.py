"""Built-in language models (registered through the `blip2kit` entry point `language`)."""

from blip2kit.registry import Registry, hookimpl


@hookimpl
def blip2kit_register(registry: Registry) -> None:
    """Cards for OPT and FlanT5 and the named BLIP-2 checkpoints (added as they land)."""
