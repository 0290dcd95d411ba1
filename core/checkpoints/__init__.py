"""Reading and writing BLIP-2 checkpoints: blip2kit's own format, Hugging Face ``Blip2*``
directories and LAVIS ``.pth`` files (BLIP2_REFERENCE.md section 7).

Split by concern, each module importing only those before it:

- ``reading``: safe tensor reading (safetensors, ``torch.load(weights_only=True)``), the one error
  type ``CheckpointError`` and key-naming helpers; imports no model code, so plugins may use it.
- ``atomic``: the one crash-safe writer (temporary directory beside the target, fsync, swap).
- ``loading``: routing keys to the model's parts and the one strict check (``check_state``).
- ``native``: the ``blip2kit`` format and the ``blip2kit.json`` written beside every save.
- ``hf`` and ``lavis``: the two external formats.
- ``pretrained``: ``from_pretrained`` / ``save_pretrained``, which route between them.

Names are re-exported here and imported on first use, so importing this package (as plugins do
for ``read_state``) pulls in no model code.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from blip2kit.core.checkpoints.reading import (
    CheckpointError,
    detect_format,
    non_finite_keys,
    preview_keys,
    read_state,
    shape_mismatches,
)

_LAZY = {
    "HF_IGNORED_KEYS": "loading",
    "LoadReport": "loading",
    "check_state": "loading",
    "convert_state": "loading",
    "export_state": "loading",
    "load_stage1_bridge": "loading",
    "load_state": "loading",
    "load_weights": "loading",
    "DESCRIPTION_FILE": "native",
    "hf_config_of": "hf",
    "image_token_index": "hf",
    "model_from_hf_config": "hf",
    "LAVIS_FILE": "lavis",
    "composition_of_lavis_state": "lavis",
    "from_pretrained": "pretrained",
    "latest_checkpoint": "pretrained",
    "save_pretrained": "pretrained",
}

if TYPE_CHECKING:
    from blip2kit.core.checkpoints.hf import hf_config_of, image_token_index, model_from_hf_config
    from blip2kit.core.checkpoints.lavis import LAVIS_FILE, composition_of_lavis_state
    from blip2kit.core.checkpoints.loading import (
        HF_IGNORED_KEYS,
        LoadReport,
        check_state,
        convert_state,
        export_state,
        load_stage1_bridge,
        load_state,
        load_weights,
    )
    from blip2kit.core.checkpoints.native import DESCRIPTION_FILE
    from blip2kit.core.checkpoints.pretrained import from_pretrained, latest_checkpoint, save_pretrained


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'blip2kit.core.checkpoints' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"blip2kit.core.checkpoints.{_LAZY[name]}"), name)
    globals()[name] = value
    return value


__all__ = sorted([*_LAZY, "CheckpointError", "detect_format", "non_finite_keys", "preview_keys",
                  "read_state", "shape_mismatches"])
