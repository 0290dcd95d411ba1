"""Errors raised while registering or resolving names."""

from __future__ import annotations


class RegistryError(Exception):
    """Base class for registry problems."""


class UnknownNameError(RegistryError, KeyError):
    """A name that no plugin registered; the message names the slot and close matches."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


class DuplicateNameError(RegistryError):
    """A second card with a name already taken in the same kind."""


class MalformedNameError(RegistryError, ValueError):
    """A composed name with the wrong number of parts or an empty part."""
