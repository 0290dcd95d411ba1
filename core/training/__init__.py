"""Training through DeepSpeed ZeRO: the engine, the loop, crash-safe checkpoints and exact resume.

``latest_checkpoint(run_dir)`` finds a run's newest complete ``model/`` directory; ``train`` (in
``blip2kit.core.training.loop``) is imported on first use, so importing this package is cheap.
"""

from __future__ import annotations

from typing import Any

from blip2kit.core.training.checkpoints import complete_checkpoints, latest_checkpoint


def train(*args: Any, **kwargs: Any) -> Any:
    """Run a job on this rank: see ``blip2kit.core.training.loop.train``."""
    from blip2kit.core.training.loop import train as run

    return run(*args, **kwargs)


__all__ = ["complete_checkpoints", "latest_checkpoint", "train"]
