"""load_image: modes PIL would clip, EXIF orientation, and files that are not images."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from blip2kit.core.data.images import ImageError, load_image


def test_16bit_image_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 32768], [65535, 16384]], dtype=np.uint16)
    path = tmp_path / "depth.png"
    Image.fromarray(values).save(path)
    rgb = np.asarray(load_image(path))
    assert rgb.shape == (2, 2, 3)
    # Hand-computed: v / 65535 * 255, rounded.
    assert rgb[..., 0].tolist() == [[0, 128], [255, 64]]


def test_float_image_in_unit_range_maps_by_255():
    image = Image.fromarray(np.array([[0.0, 0.5], [1.0, 0.25]], dtype=np.float32), mode="F")
    assert np.asarray(load_image(image))[..., 1].tolist() == [[0, 128], [255, 64]]


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (4, 2), (10, 20, 30))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif)
    assert load_image(path).size == (2, 4)


@pytest.mark.parametrize(
    "content, message",
    [(b"", "not an image"), (b"not an image at all", "not an image"), (None, "does not exist")],
)
def test_bad_files_name_the_file(tmp_path, content, message):
    path = tmp_path / "bad.jpg"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ImageError, match=message) as raised:
        load_image(path)
    assert "bad.jpg" in str(raised.value)


def test_truncated_png_is_reported(tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buffer, format="PNG")
    with pytest.raises(ImageError, match="cannot be decoded|not an image"):
        load_image(buffer.getvalue()[:60], name="shard-0.tar/000.png")


def test_empty_image_is_refused():
    with pytest.raises(ImageError, match="empty"):
        load_image(Image.new("RGB", (0, 0)))
