"""``device_map``: spreading a loaded model over devices for inference, as transformers users know it.

A device map is "auto", one device for everything ("cpu", "cuda:1", 0), or a dict from module
names of the composed model ("vision", "bridge", "projection", "language", or deeper names such as
"language.model.model.decoder.layers.11") to devices. ``from_pretrained`` resolves the map on the
empty (meta) model, loads each tensor straight onto its device, then hands the model to
accelerate's ``dispatch_model``, whose hooks move activations between devices. With a GPU in the
map, modules mapped to "cpu" keep their weights in CPU memory and run on the GPU (accelerate's
CPU offload), as in transformers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Union

import torch
from torch import nn

from blip2kit.core.errors import DeviceError
from blip2kit.core.validation import check_device

DeviceMap = Union[str, int, torch.device, Mapping[str, Union[str, int, torch.device]]]


def _device_name(device: str | int | torch.device, where: str) -> str:
    """A map value as accelerate takes it ('cpu', 'cuda:N'), checked against this machine."""
    if isinstance(device, bool):
        raise DeviceError(f"{where} = {device!r} is not a device; use 'cpu', a GPU index (0) or 'cuda:N'")
    if isinstance(device, int):
        device = f"cuda:{device}"
    text = str(device)
    if text == "disk":
        raise DeviceError(f"{where} = 'disk': offloading weights to disk is not supported; use 'cpu' "
                          "(CPU memory) for what does not fit on the GPUs")
    try:
        parsed = torch.device(text)
    except (RuntimeError, TypeError):
        raise DeviceError(f"{where} = {device!r} is not a device; use 'cpu', a GPU index (0) or 'cuda:N'") from None
    if parsed.type not in ("cpu", "cuda"):
        raise DeviceError(f"{where} = {device!r}: device_map places modules on 'cpu' or CUDA GPUs only")
    if parsed.type == "cuda" and parsed.index is None:
        parsed = torch.device("cuda", 0)
    try:
        check_device(parsed)
    except DeviceError as error:
        raise DeviceError(f"{where}: {error}") from None
    return str(parsed)


def no_split_module_classes(model: nn.Module) -> list[str]:
    """Class names of modules "auto" must keep on one device: each component's declaration
    (``Component.no_split_modules``) and transformers' ``_no_split_modules`` of models inside."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "no_split_modules", None) or ())
        names.update(getattr(module, "_no_split_modules", None) or ())
    return sorted(names)


def resolve_device_map(model: nn.Module, device_map: DeviceMap) -> dict[str, str]:
    """A checked {module name: device} covering every parameter and buffer of ``model``.

    Works on a model whose parameters are still on the meta device (their dtypes already final),
    so "auto" sizes the parts as they will be loaded.
    """
    if isinstance(device_map, str) and device_map == "auto":
        from accelerate import infer_auto_device_map
        from accelerate.utils import get_balanced_memory

        no_split = no_split_module_classes(model)
        max_memory = get_balanced_memory(model, no_split_module_classes=no_split)
        inferred = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split)
        return {name: _device_name(device, f"device_map['{name}'] (auto)") for name, device in inferred.items()}
    if not isinstance(device_map, Mapping):
        return {"": _device_name(device_map, "device_map")}

    modules = dict(model.named_modules())
    resolved: dict[str, str] = {}
    for name, device in device_map.items():
        if not isinstance(name, str) or name not in modules:
            top = [child for child, _ in model.named_children()]
            raise DeviceError(
                f"device_map names {name!r}, which is not a module of this model; its parts are "
                f"{top} (deeper names work too, e.g. 'language.model' or 'vision.vit.blocks.0'; "
                "'' is the whole model)"
            )
        resolved[name] = _device_name(device, f"device_map[{name!r}]")
    tensors = [name for name, _ in (*model.named_parameters(), *model.named_buffers())]
    left_out = sorted({name.rsplit(".", 1)[0] for name in tensors if device_for(resolved, name) is None})
    if left_out:
        raise DeviceError(
            f"device_map gives no device to {left_out[:6]}{' ...' if len(left_out) > 6 else ''}; map "
            "every part of the model (or add '' for everything not named)"
        )
    return resolved


def device_for(device_map: Mapping[str, str], tensor_name: str) -> str | None:
    """The device of the longest module name in ``device_map`` that contains ``tensor_name``."""
    best: tuple[int, str] | None = None
    for name, device in device_map.items():
        if name == "" or tensor_name == name or tensor_name.startswith(name + "."):
            if best is None or len(name) > best[0]:
                best = (len(name), device)
    return None if best is None else best[1]


def main_device(device_map: DeviceMap | None, device: torch.device | str | None) -> torch.device:
    """Where the model runs: ``device``, else the first GPU a device map names, else the CPU."""
    if device is not None:
        return torch.device(device)
    values = device_map.values() if isinstance(device_map, Mapping) else [device_map]
    for value in values:
        if isinstance(value, int) and not isinstance(value, bool):
            return torch.device("cuda", value)
        if str(value).startswith("cuda"):
            return torch.device(str(value))
    if device_map == "auto" and torch.cuda.is_available():
        return torch.device("cuda", 0)
    return torch.device("cpu")


def dispatch(model: nn.Module, device_map: Mapping[str, str]) -> nn.Module:
    """Place ``model`` as ``device_map`` says (accelerate's hooks carry activations across devices)."""
    from accelerate import dispatch_model

    dispatched = dispatch_model(model, device_map=dict(device_map))
    dispatched.device_map = dict(device_map)
    return dispatched


__all__ = ["DeviceMap", "device_for", "dispatch", "main_device", "no_split_module_classes",
           "resolve_device_map"]

