"""Built-in vision encoders (registered through the `blip2kit` entry point `vision`)."""

from blip2kit.registry import Registry, hookimpl


@hookimpl
def blip2kit_register(registry: Registry) -> None:
    """Cards for vit_l, vit_g and vit_tiny (added as each encoder lands)."""
