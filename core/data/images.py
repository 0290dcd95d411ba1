"""Reading images as people hand them over: any file PIL opens, EXIF-rotated, in 8-bit RGB.

Every image blip2kit reads (training data, evaluation sets, the commands) comes through
``load_image``, so a corrupt, empty or unsupported image fails the same way everywhere: with an
``ImageError`` naming the file, which data loaders count and skip.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["ImageError", "load_image", "to_rgb"]


class ImageError(ValueError):
    """An image that cannot be read or used: missing, truncated, corrupt, empty or of no known mode."""


def _scale_to_8bit(image: Image.Image) -> Image.Image:
    """16-bit (I;16, I) and float (F) images scaled to 0-255 by their range, not clipped.

    PIL's own ``convert("RGB")`` clips such images to 0/255 and so turns most of them white.
    Integer images map by their bit depth (a 12-bit scan in a 16-bit container keeps its
    contrast relative to 65535); float images in [0, 1] map by 255, any other range by min/max.
    """
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        low, high = float(values.min()), float(values.max())
        if low >= 0.0 and high <= 1.0:
            scaled = values * 255.0
        elif high > low:
            scaled = (values - low) / (high - low) * 255.0
        else:
            scaled = np.zeros_like(values)
    else:
        full_scale = 65535.0 if values.max() <= 65535 and values.min() >= 0 else float(values.max())
        scaled = values / max(full_scale, 1.0) * 255.0
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def to_rgb(image: Image.Image, where: str = "image") -> Image.Image:
    """``image`` as 8-bit RGB with its EXIF orientation applied; ``where`` names it in errors."""
    if image.width == 0 or image.height == 0:
        raise ImageError(f"{where} is empty ({image.width}x{image.height} pixels)")
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        image = _scale_to_8bit(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent pixels become white, as browsers and LAVIS' PIL pipeline show them.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as error:
        raise ImageError(f"{where} has mode {image.mode!r}, which cannot be converted to RGB: {error}") from error


def load_image(source: str | os.PathLike[str] | bytes | Image.Image, *, name: str | None = None) -> Image.Image:
    """An image file (path or bytes) or a PIL image as 8-bit RGB; ``ImageError`` names what was wrong.

    ``name`` is how errors refer to bytes (for example a webdataset member name).
    """
    if isinstance(source, Image.Image):
        return to_rgb(source, name or "image")
    if isinstance(source, bytes):
        where = name or "image bytes"
        stream: io.BytesIO | Path = io.BytesIO(source)
    else:
        path = Path(source)
        where = name or str(path)
        if not path.exists():
            raise ImageError(f"image {where!r} does not exist; check the path (and image_root)")
        if not path.is_file():
            raise ImageError(f"image {where!r} is not a file")
        stream = path
    try:
        with Image.open(stream) as opened:
            opened.load()  # decode now, so truncation is found here and not in a transform
            return to_rgb(opened, repr(where))
    except ImageError:
        raise
    except UnidentifiedImageError as error:
        raise ImageError(f"image {where!r} is not an image PIL can read (unknown or corrupt format)") from error
    except (OSError, ValueError, SyntaxError) as error:
        raise ImageError(f"image {where!r} cannot be decoded (truncated or corrupt): {error}") from error
