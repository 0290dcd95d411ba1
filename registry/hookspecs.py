"""The pluggy hook specifications of blip2kit (project marker "blip2kit").

A plugin is a module (or object) with functions marked by ``hookimpl``, registered through the
``blip2kit`` entry-point group of its distribution::

    [project.entry-points.blip2kit]
    my_encoder = "my_package.blip2kit_plugin"

Built-in components are registered exactly the same way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from blip2kit.registry.registry import Registry

PROJECT = "blip2kit"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class Blip2kitSpec:
    """Hooks a blip2kit plugin may implement."""

    @hookspec
    def blip2kit_register(self, registry: Registry) -> None:
        """Add this plugin's components and named models to ``registry``.

        :param registry: the registry being built. Call ``registry.add_vision_encoder(card)``,
            ``add_bridge(card)``, ``add_language_model(card)`` or ``add_model(card)`` with
            :class:`~blip2kit.registry.cards.ComponentCard` / ``ModelCard`` instances. Cards name
            their factory (and ``config_class``) as a dotted path; do not import model code here,
            so that listing stays fast. blip2kit's own plugins are called first; a card taking a
            name already registered is refused unless added with ``replace=True``. If this hook
            raises (``SystemExit`` included), none of its cards stay and the failure is reported
            in ``registry.load_errors``.
        :return: nothing; every implementation is called.
        """
