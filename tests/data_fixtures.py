"""Tiny datasets written in each real public format, for the data and feature-cache tests."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def tiny_image(index: int, size: int = 20) -> Image.Image:
    """A distinct small RGB image per index (a colour gradient plus a bright square)."""
    rng = np.random.default_rng(index)
    pixels = rng.integers(0, 255, size=(size, size + 4, 3), dtype=np.uint8)
    return Image.fromarray(pixels, mode="RGB")


def write_images(folder: Path, count: int, suffix: str = ".png") -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for index in range(count):
        name = f"img{index:03d}{suffix}"
        tiny_image(index).save(folder / name)
        names.append(name)
    return names


def captions_for(index: int) -> list[str]:
    return [f"A photo of thing {index}.", f"Thing number {index}, again!"]


def write_coco(root: Path, count: int) -> Path:
    names = write_images(root / "images", count)
    images = [{"id": 100 + i, "file_name": f"images/{name}", "width": 24, "height": 20} for i, name in enumerate(names)]
    annotations = [{"id": 10 * i + j, "image_id": 100 + i, "caption": caption}
                   for i in range(count) for j, caption in enumerate(captions_for(i))]
    path = root / "captions_train.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path


def write_lavis_json(root: Path, count: int) -> Path:
    names = write_images(root / "images", count)
    # LAVIS's coco_karpathy_train.json: one record per caption, the image repeated.
    records = [{"image": f"images/{name}", "caption": caption, "image_id": f"coco_{i}"}
               for i, name in enumerate(names) for caption in captions_for(i)]
    path = root / "train.json"
    path.write_text(json.dumps(records))
    return path


def write_jsonl(root: Path, count: int, image_root: Path | None = None) -> Path:
    folder = image_root if image_root is not None else root / "images"
    names = write_images(folder, count)
    root.mkdir(parents=True, exist_ok=True)
    path = root / "train.jsonl"
    with path.open("w") as handle:
        for i, name in enumerate(names):
            handle.write(json.dumps({"image": name if image_root else f"images/{name}",
                                     "caption": captions_for(i)}) + "\n")
    return path


def write_folder(root: Path, count: int) -> Path:
    folder = root / "folder"
    names = write_images(folder, count, suffix=".jpg")
    for i, name in enumerate(names):
        (folder / name).with_suffix(".txt").write_text("\n".join(captions_for(i)) + "\n")
    return folder


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def image_bytes(index: int, format: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    tiny_image(index).save(buffer, format=format)
    return buffer.getvalue()


def write_shards(root: Path, count: int, per_shard: int = 4) -> str:
    """Shards 'shards-000.tar'...; members '<key>.jpg' + '<key>.txt' (even) or '.json' (odd)."""
    root.mkdir(parents=True, exist_ok=True)
    shard_count = (count + per_shard - 1) // per_shard
    for shard in range(shard_count):
        with tarfile.open(root / f"shards-{shard:03d}.tar", "w") as tar:
            for i in range(shard * per_shard, min(count, (shard + 1) * per_shard)):
                key = f"sample{i:05d}"
                if i % 2:
                    _add_member(tar, f"{key}.png", image_bytes(i, "PNG"))
                    _add_member(tar, f"{key}.json", json.dumps({"caption": captions_for(i), "image_id": i}).encode())
                else:
                    _add_member(tar, f"{key}.jpg", image_bytes(i))
                    _add_member(tar, f"{key}.txt", "\n".join(captions_for(i)).encode())
    return str(root / f"shards-{{000..{shard_count - 1:03d}}}.tar")
