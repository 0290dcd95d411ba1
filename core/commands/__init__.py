"""The ``blip2kit`` subcommands beyond ``list`` and ``plan``, one module per family.

Each module has ``register(commands)`` and is named in ``blip2kit.core.cli.COMMAND_MODULES``.
Handlers import torch and model code inside themselves, so building the parser stays cheap.
"""
