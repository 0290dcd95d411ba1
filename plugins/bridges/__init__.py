"""Built-in bridges (registered through the `blip2kit` entry point `bridges`)."""

from blip2kit.registry import Registry, hookimpl


@hookimpl
def blip2kit_register(registry: Registry) -> None:
    """Cards for qformer and qformer_tiny (added as the Q-Former lands)."""
