"""Errors raised while registering or resolving names, and blip2kit's base error class."""

from __future__ import annotations


class Blip2kitError(Exception):
    """Base class of blip2kit's own errors: a problem the user can fix, explained in the message.

    The command line prints these (and ValueErrors, which blip2kit raises for bad input) as one
    line and exits with code 2. It lives here because the registry is the bottom layer: core and
    plugins import it from ``blip2kit.core.errors``.
    """


class RegistryError(Blip2kitError):
    """Base class for registry problems."""


class UnknownNameError(RegistryError, KeyError):
    """A name that no plugin registered; the message names the slot and close matches."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


class DuplicateNameError(RegistryError):
    """A second card with a name already taken in the same kind."""


class MalformedNameError(RegistryError, ValueError):
    """A composed name with the wrong number of parts or an empty part."""
