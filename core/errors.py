"""The errors blip2kit raises for bad input, and which of them the command line reports in one line.

Raise a subclass of :class:`Blip2kitError` (or a ``ValueError``) with a message that names the
argument, field, file or key and the fix; ``blip2kit`` prints it as one line on stderr and exits
with code 2 (``--debug`` shows the traceback). ``ImageError`` and ``CheckpointError`` are
``ValueError`` subclasses, so commands that meet them need no handling of their own.
"""

from __future__ import annotations

from blip2kit.registry.errors import Blip2kitError, RegistryError


class InputError(Blip2kitError, ValueError):
    """An argument of a public method that is not what it must be (pixels, captions, options)."""


class ComponentConfigError(Blip2kitError, ValueError):
    """A component config value outside what the component allows; names component and field."""


class DeviceError(Blip2kitError, ValueError):
    """A device that does not exist here, or a dtype blip2kit does not know."""


# What the command line turns into one line and exit code 2. OSError covers missing files,
# permissions and a full disk; anything else is a bug and keeps its traceback.
HANDLED_ERRORS: tuple[type[BaseException], ...] = (Blip2kitError, ValueError, OSError)

__all__ = [
    "Blip2kitError",
    "ComponentConfigError",
    "DeviceError",
    "HANDLED_ERRORS",
    "InputError",
    "RegistryError",
]
