"""Checks at the model's boundary: devices and the inputs of ``Blip2``'s public methods.

Each check raises ``InputError`` / ``DeviceError`` (ValueErrors) whose message names the argument,
what it got and the fix, so a wrong input never runs into a silent wrong answer or a traceback
from deep inside torch or transformers.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from blip2kit.core.errors import DeviceError, InputError
from blip2kit.core.interfaces import BEAM_CONVENTIONS, BEAM_SEARCH_ENGINES, GenerationOptions, VisionEncoder

TRANSFORM_FIX = (
    "turn images into pixels with the encoder's own transform: "
    "transform = model.vision.transform(); pixels = torch.stack([transform(image) for image in images])"
)

# -- devices ---------------------------------------------------------------------------------------


def check_device(device: torch.device | str | None) -> None:
    """Refuse a device string torch does not parse, or one this machine does not have."""
    if device is None:
        return
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise DeviceError(
            f"device={device!r} is not a device: {error}. Use 'cpu', 'cuda', 'cuda:0' or 'meta'"
        ) from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            why = (
                "this torch build has no CUDA support"
                if torch.version.cuda is None
                else "torch.cuda.is_available() is False (no GPU visible, or a driver problem)"
            )
            raise DeviceError(f"device={device!r} asks for a CUDA GPU, but {why}; use device='cpu'")
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise DeviceError(
                f"device={device!r} asks for GPU {parsed.index}, but this machine has {count} "
                f"(cuda:0 .. cuda:{count - 1})"
            )
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"device={device!r} asks for Apple MPS, which is not available here; use 'cpu'")


# -- pixels ----------------------------------------------------------------------------------------


def check_pixels(
    pixels: Any, vision: VisionEncoder, *, name: str = "pixels", values: bool = True
) -> Tensor:
    """``pixels`` must be a float tensor [B, 3, S, S] at the encoder's size, normalised.

    With ``values``, pixels beyond what the encoder's normalisation can produce (raw 0-255
    values) and NaN/inf are refused; that reads the values once (a device sync). Returns the
    tensor unchanged.
    """
    if not isinstance(pixels, Tensor):
        kind = f"{type(pixels).__module__}.{type(pixels).__name__}".removeprefix("builtins.")
        raise InputError(f"{name} must be a torch.Tensor [B, 3, S, S], got a {kind}; {TRANSFORM_FIX}")
    size = vision.image_size
    shape = list(pixels.shape)
    if not pixels.is_floating_point():
        raw = " (raw 0-255 values?)" if pixels.dtype == torch.uint8 else ""
        raise InputError(
            f"{name} have dtype {pixels.dtype}{raw}, but the encoder reads normalised float pixels; "
            f"{TRANSFORM_FIX}"
        )
    if pixels.dim() == 3 and shape[0] == 3:
        raise InputError(
            f"{name} have shape {shape}, one image without a batch dimension; the encoder reads "
            f"[B, 3, {size}, {size}]: use {name}.unsqueeze(0)"
        )
    if pixels.dim() != 4:
        raise InputError(f"{name} must have 4 dimensions [B, 3, {size}, {size}], got shape {shape}")
    if shape[0] == 0:
        raise InputError(f"{name} hold no images (batch size 0, shape {shape})")
    if shape[1] != 3:
        hint = (
            f"; these look channels-last [B, S, S, 3]: use {name}.permute(0, 3, 1, 2)"
            if shape[3] == 3
            else "; convert the images to RGB (the encoder's transform does)"
        )
        raise InputError(
            f"{name} have {shape[1]} channels (dimension 1 of shape {shape}), the encoder reads 3 "
            f"(RGB) as [B, 3, {size}, {size}]{hint}"
        )
    if shape[2:] != [size, size]:
        raise InputError(
            f"{name} are {shape[2]}x{shape[3]} but the vision encoder reads {size}x{size} (its "
            f"image_size); resize with the encoder's transform: model.vision.transform(), or "
            f"build the model with vision={{'image_size': {shape[2]}}} if that size fits it"
        )
    if values and pixels.device.type != "meta":
        _check_pixel_values(pixels, vision, name)
    return pixels


def _check_pixel_values(pixels: Tensor, vision: VisionEncoder, name: str) -> None:
    # Normalised pixels lie within (0 - mean) / std .. (1 - mean) / std (about -1.8 .. 2.2 for
    # CLIP's statistics). The limit is four times that and at least 10: room for resampling
    # overshoot and for standard-normal test pixels, while raw 0-255 images (all but nearly black
    # ones reach 10) are caught.
    mean = getattr(vision, "mean", None) or (0.5, 0.5, 0.5)
    std = getattr(vision, "std", None) or (0.5, 0.5, 0.5)
    bound = max(max(m, 1 - m) / s for m, s in zip(mean, std))
    low, high = torch.aminmax(pixels.detach().float())
    low, high = low.item(), high.item()  # one look at the values; NaN makes both NaN
    if not (low == low and high == high) or abs(low) == float("inf") or abs(high) == float("inf"):
        raise InputError(f"{name} hold NaN or infinite values; check how the images were loaded")
    if max(abs(low), abs(high)) > max(4 * bound, 10.0):
        raise InputError(
            f"{name} values reach {max(abs(low), abs(high)):.4g}, but normalised pixels stay within "
            f"±{bound:.2f} for this encoder's mean/std: these look like raw 0-255 (or unnormalised) "
            f"values; {TRANSFORM_FIX}"
        )


# -- text ------------------------------------------------------------------------------------------


def check_texts(texts: Any, batch: int, *, name: str) -> list[str]:
    """A list of strings, one per image. A single string is refused: iterating it would give
    one character per image."""
    if isinstance(texts, str):
        raise InputError(
            f"{name} must be a list of strings, one per image, got a single string {_short(texts)}; "
            f"pass [{_short(texts)}]" + (f" * {batch}" if batch > 1 else "")
        )
    if not isinstance(texts, (list, tuple)):
        raise InputError(f"{name} must be a list of strings, one per image, got {type(texts).__name__}")
    texts = list(texts)
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise InputError(f"{name}[{index}] is {type(text).__name__} {text!r}; every entry must be a string")
    if len(texts) != batch:
        raise InputError(f"got {len(texts)} {name} for {batch} images; give exactly one per image")
    return texts


def broadcast_texts(texts: Any, batch: int, *, name: str) -> list[str]:
    """One string for every image, or a list with one per image (prompts, questions)."""
    if isinstance(texts, str):
        return [texts] * batch
    return check_texts(texts, batch, name=name)


def check_answer_prompt(prompt: Any) -> str:
    """``answer``'s prompt must hold exactly one '{}', where the question goes."""
    if not isinstance(prompt, str):
        raise InputError(f"prompt must be a string with '{{}}' where the question goes, got {type(prompt).__name__}")
    try:
        filled = prompt.format("\0")
    except (IndexError, KeyError, ValueError) as error:
        raise InputError(
            f"prompt {prompt!r} cannot take the question ({type(error).__name__}: {error}); use "
            "exactly one '{}' and double any other braces ('{{' / '}}')"
        ) from None
    if filled.count("\0") != 1:
        raise InputError(
            f"prompt {prompt!r} must contain '{{}}' exactly once, where the question goes "
            "(e.g. 'Question: {} Short answer:'); without it the question would be dropped"
        )
    return prompt


def _short(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


# -- generation options ----------------------------------------------------------------------------

_INTEGER_OPTIONS = {  # name -> smallest allowed value
    "num_beams": 1,
    "max_new_tokens": 1,
    "min_new_tokens": 0,
    "num_return_sequences": 1,
}
_POSITIVE_FLOATS = ("temperature", "repetition_penalty")


def generation_options(defaults: Mapping[str, Any], options: Mapping[str, Any]) -> GenerationOptions:
    """``options`` over the task's ``defaults``, each named and checked, as GenerationOptions."""
    known = [field.name for field in dataclasses.fields(GenerationOptions)]
    for key in options:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise InputError(
                f"unknown generation option {key!r}{hint}; the options are {', '.join(known)}"
            )
    merged = {**defaults, **options}
    for key, smallest in _INTEGER_OPTIONS.items():
        value = merged.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"generation option {key} must be an integer >= {smallest}, got {value!r}")
        if value < smallest:
            raise InputError(f"generation option {key}={value} is not allowed; use an integer >= {smallest}")
    for key in ("do_sample",):
        if key in merged and not isinstance(merged[key], bool):
            raise InputError(f"generation option {key} must be True or False, got {merged[key]!r}")
    for key in (*_POSITIVE_FLOATS, "top_p", "length_penalty"):
        value = merged.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise InputError(f"generation option {key} must be a number, got {value!r}")
    for key in _POSITIVE_FLOATS:
        if key in merged and not merged[key] > 0:
            raise InputError(f"generation option {key}={merged[key]} is not allowed; use a number > 0")
    if "top_p" in merged and not 0 < merged["top_p"] <= 1:
        raise InputError(f"generation option top_p={merged['top_p']} is not allowed; use 0 < top_p <= 1")
    for key, choices in (("beam_convention", BEAM_CONVENTIONS), ("beam_search", BEAM_SEARCH_ENGINES)):
        if key in merged and merged[key] not in choices:
            raise InputError(
                f"generation option {key}={merged[key]!r} is not known; use one of "
                f"{', '.join(repr(choice) for choice in choices)}"
            )
    result = GenerationOptions(**merged)
    if result.num_beams > 1 and result.beam_convention == "lavis":
        if result.beam_search == "transformers":
            raise InputError(
                "generation option beam_convention='lavis' needs beam_search='blip2kit': transformers' "
                "own generate scores beams only its current way (beam_convention='transformers')"
            )
        if result.do_sample:
            raise InputError(
                "generation option beam_convention='lavis' is for beam search without sampling; "
                "set do_sample=False, or num_beams=1 to sample"
            )
    if result.min_new_tokens > result.max_new_tokens:
        raise InputError(
            f"generation option min_new_tokens={result.min_new_tokens} is more than "
            f"max_new_tokens={result.max_new_tokens}; lower min_new_tokens or raise max_new_tokens"
        )
    if not result.do_sample and result.num_return_sequences > result.num_beams:
        raise InputError(
            f"generation option num_return_sequences={result.num_return_sequences} is more than "
            f"num_beams={result.num_beams}: beam search returns at most num_beams sequences per "
            "image; raise num_beams or set do_sample=True"
        )
    return result


__all__ = [
    "TRANSFORM_FIX",
    "broadcast_texts",
    "check_answer_prompt",
    "check_device",
    "check_pixels",
    "check_texts",
    "generation_options",
]
