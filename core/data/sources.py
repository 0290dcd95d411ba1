"""Training data sources in their public formats, read into one list of images with their captions.

Formats (``DataSourceConfig.format``):

- ``coco``: COCO caption JSON, ``{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}``;
- ``lavis_json``: LAVIS-style JSON list of ``{"image", "caption": str | [str], "image_id"?}``;
- ``jsonl``: one ``{"image", "caption": str | [str], "image_id"?}`` object per line;
- ``folder``: images with a sidecar ``.txt`` of the same stem holding one caption per line;
- ``webdataset``: tar shards, streamed (see ``blip2kit.core.data.webdataset``).

Records naming the same image are merged, so every image is one sample whose captions are sampled
once per epoch. Image paths are relative to ``image_root`` or else to the annotation file's folder.
A broken annotation file (invalid JSON, a missing key, a wrong type) is an ``AnnotationError``
naming the file, the record and the key; a broken *image* is only found when it is read, and the
loader skips it as a bad sample.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "AnnotationError",
    "DataSourceConfig",
    "IMAGE_SUFFIXES",
    "Sample",
    "read_indexed_source",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
DataFormat = Literal["coco", "lavis_json", "jsonl", "folder", "webdataset"]


class AnnotationError(ValueError):
    """An annotation file that cannot be used: unreadable, invalid JSON, missing keys, wrong types."""


class DataSourceConfig(BaseModel):
    """One training data source: its format, where it is, and where its images are."""

    model_config = ConfigDict(extra="forbid")

    format: DataFormat = Field(
        description="File format: coco (caption JSON with images + annotations), lavis_json (a JSON "
        "list of {image, caption}), jsonl ({image, caption} per line), folder (images with sidecar "
        ".txt captions, one per line) or webdataset (tar shards of .jpg/.png + .txt/.json members)."
    )
    path: str | list[str] = Field(
        description="The annotation file (coco, lavis_json, jsonl), the image folder (folder), or "
        "the shards (webdataset: a brace pattern like 'shards-{000..003}.tar', a glob, or a list)."
    )
    image_root: str | None = Field(
        default=None,
        description="Folder that image paths in the annotations are relative to; default: the "
        "annotation file's folder. Not used by folder and webdataset sources.",
    )

    @field_validator("path")
    @classmethod
    def _path_not_empty(cls, value: str | list[str]) -> str | list[str]:
        if not value:
            raise ValueError("path is empty; give the annotation file, image folder or shard pattern")
        return value

    def describe(self) -> str:
        """How errors and summaries name this source, e.g. "coco source 'data/captions.json'"."""
        return f"{self.format} source {self.path!r}"


@dataclass
class Sample:
    """One image of an indexed source and every caption it has (not yet normalised)."""

    image: Path  # resolved image file
    captions: list[str]
    image_id: Any  # the dataset's id when it has one, else the image path relative to its root
    where: str  # how logs name it: "<annotation file> record 12" or the image path
    sidecar: Path | None = field(default=None)  # folder format: the caption file


def read_indexed_source(source: DataSourceConfig) -> list[Sample]:
    """Every image of a non-streamed source with its captions, in file order."""
    if source.format == "webdataset":
        raise ValueError("webdataset sources are streamed; use blip2kit.core.data.webdataset")
    if not isinstance(source.path, str):
        raise AnnotationError(
            f"{source.format} source: path must be one file or folder, got a list {source.path!r}; "
            "only webdataset sources take a list of shards"
        )
    path = Path(source.path)
    if source.format == "folder":
        return _read_folder(path)
    if not path.is_file():
        raise AnnotationError(
            f"annotation file {str(path)!r} of the {source.format} source does not exist; check data path"
        )
    root = Path(source.image_root) if source.image_root is not None else path.parent
    if source.image_root is not None and not root.is_dir():
        raise AnnotationError(f"image_root {source.image_root!r} of {source.describe()} is not a folder")
    if source.format == "coco":
        return _read_coco(path, root)
    if source.format == "lavis_json":
        records = _load_json(path)
        if not isinstance(records, list):
            raise AnnotationError(
                f"{path}: a lavis_json file must hold a JSON list of {{image, caption}} records, "
                f"got a {type(records).__name__}; use format 'coco' for COCO caption files"
            )
        return _merge_records(path, root, enumerate(records))
    return _merge_records(path, root, _jsonl_records(path))


# -- readers -------------------------------------------------------------------------------------


def _load_json(path: Path) -> Any:
    try:
        with path.open("r", encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise AnnotationError(
            f"{path} is not valid JSON (line {error.lineno}, column {error.colno}): {error.msg}"
        ) from error
    except (OSError, UnicodeDecodeError) as error:
        raise AnnotationError(f"{path} cannot be read: {error}") from error


def _jsonl_records(path: Path) -> Any:
    """(record index, record) per non-blank line; the index is the 0-based line number."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise AnnotationError(f"{path} cannot be read: {error}") from error
    for number, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as error:
            raise AnnotationError(
                f"{path} line {number + 1} is not valid JSON (column {error.colno}): {error.msg}"
            ) from error


def _field(path: Path, index: int, record: Any, key: str, types: tuple[type, ...], label: str) -> Any:
    """``record[key]``, checked; the error names the file, the record and the key."""
    where = f"{path} record {index}"
    if not isinstance(record, dict):
        raise AnnotationError(f"{where} must be a JSON object, got {type(record).__name__}: {record!r:.80}")
    if key not in record:
        raise AnnotationError(f"{where} has no {key!r} key (it has {sorted(record)}); every record needs one")
    value = record[key]
    if not isinstance(value, types) or isinstance(value, bool):
        raise AnnotationError(f"{where} key {key!r} must be {label}, got {type(value).__name__}: {value!r:.80}")
    return value


def _captions_of(path: Path, index: int, record: dict[str, Any]) -> list[str]:
    caption = _field(path, index, record, "caption", (str, list), "a string or a list of strings")
    captions = [caption] if isinstance(caption, str) else caption
    for position, text in enumerate(captions):
        if not isinstance(text, str):
            raise AnnotationError(
                f"{path} record {index} key 'caption' item {position} must be a string, "
                f"got {type(text).__name__}: {text!r:.80}"
            )
    return list(captions)


def _merge_records(path: Path, root: Path, records: Any) -> list[Sample]:
    """LAVIS / JSONL records (one per caption or per image) merged into one sample per image."""
    by_image: dict[str, Sample] = {}
    for index, record in records:
        image = _field(path, index, record, "image", (str,), "a string (an image path)")
        captions = _captions_of(path, index, record)
        image_id = record.get("image_id", image)
        if image_id is not None and not isinstance(image_id, (str, int)):
            raise AnnotationError(
                f"{path} record {index} key 'image_id' must be a string or an integer, "
                f"got {type(image_id).__name__}"
            )
        sample = by_image.get(image)
        if sample is None:
            by_image[image] = Sample(root / image, captions, image_id, f"{path} record {index} ({image})")
        else:
            sample.captions.extend(captions)
    return list(by_image.values())


def _read_coco(path: Path, root: Path) -> list[Sample]:
    data = _load_json(path)
    if not isinstance(data, dict):
        raise AnnotationError(
            f"{path}: a coco caption file must be a JSON object with 'images' and 'annotations', "
            f"got a {type(data).__name__}; use format 'lavis_json' for a list of records"
        )
    for key in ("images", "annotations"):
        if not isinstance(data.get(key), list):
            raise AnnotationError(
                f"{path}: key {key!r} must be a list (a COCO caption file has 'images' and "
                f"'annotations'), got {type(data.get(key)).__name__}"
            )
    samples: dict[Any, Sample] = {}
    for index, record in enumerate(data["images"]):
        where = f"{path} images[{index}]"
        image_id = _field(Path(f"{path} images"), index, record, "id", (int, str), "an integer or string id")
        file_name = _field(Path(f"{path} images"), index, record, "file_name", (str,), "a string")
        if image_id in samples:
            raise AnnotationError(f"{where}: image id {image_id!r} appears twice in 'images'")
        samples[image_id] = Sample(root / file_name, [], image_id, f"{path} image {image_id} ({file_name})")
    for index, record in enumerate(data["annotations"]):
        label = Path(f"{path} annotations")
        image_id = _field(label, index, record, "image_id", (int, str), "an integer or string id")
        caption = _field(label, index, record, "caption", (str,), "a string")
        if image_id not in samples:
            raise AnnotationError(
                f"{path} annotations record {index}: image_id {image_id!r} is not in 'images'; "
                "every annotation must name a listed image"
            )
        samples[image_id].captions.append(caption)
    return list(samples.values())


def _read_folder(folder: Path) -> list[Sample]:
    if not folder.is_dir():
        raise AnnotationError(f"image folder {str(folder)!r} of the folder source does not exist")
    samples = []
    for image in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        sidecar = image.with_suffix(".txt")
        captions: list[str] = []
        if sidecar.is_file():
            try:
                captions = sidecar.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as error:
                raise AnnotationError(f"caption file {sidecar} cannot be read: {error}") from error
        relative = image.relative_to(folder).as_posix()
        samples.append(Sample(image, captions, relative, str(image), sidecar=sidecar))
    if not samples:
        raise AnnotationError(
            f"image folder {str(folder)!r} holds no images ({', '.join(IMAGE_SUFFIXES)}); check the path"
        )
    return samples
