"""Readers for the public evaluation formats: VQAv2 / OK-VQA, GQA, COCO Karpathy and COCO-style
captions, NoCaps, and COCO / Flickr30k Karpathy retrieval.

Each reader returns plain records (no images are opened here) and the raw records the official
metrics need. A malformed file is reported with the file, the record and the key that is wrong.
Imports no torch.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class DatasetFormatError(ValueError):
    """An evaluation file that does not have the public format it was read as."""


@dataclass(frozen=True)
class VQASample:
    question_id: Any
    image: Path
    question: str


@dataclass
class VQADataset:
    """Questions to answer, plus the raw records the official metric reads."""

    samples: list[VQASample]
    questions: list[dict[str, Any]]  # VQAv2 question records (GQA: with question_id added)
    annotations: list[dict[str, Any]] = field(default_factory=list)  # VQAv2 annotation records


@dataclass(frozen=True)
class CaptionSample:
    image_id: Any
    image: Path


@dataclass
class CaptionDataset:
    samples: list[CaptionSample]
    references: dict[Any, list[str]]  # image_id -> reference captions
    domains: dict[Any, str] = field(default_factory=dict)  # NoCaps: image_id -> in/near/out-domain


@dataclass
class RetrievalDataset:
    """Karpathy-split retrieval: every image against every caption."""

    image_ids: list[Any]
    images: list[Path]
    texts: list[str]
    img2txt: list[list[int]]  # image index -> indices of its captions in ``texts``
    txt2img: list[int]  # caption index -> index of its image


# -- helpers --------------------------------------------------------------------------------------


def read_json(path: str | Path, what: str) -> Any:
    """Parse a JSON file; a missing or broken file is an error naming it and ``what`` it should be."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {str(path)!r} does not exist")
    try:
        with path.open("rb") as handle:
            return json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DatasetFormatError(f"{path}: not valid JSON ({error}); expected the {what} file") from error


def _field(record: Any, key: str, where: str, kinds: type | tuple[type, ...] | None = None) -> Any:
    """``record[key]``, or an error naming the file and record, the key and what was there."""
    if not isinstance(record, Mapping):
        raise DatasetFormatError(f"{where}: expected an object with {key!r}, got {type(record).__name__}")
    if key not in record:
        keys = ", ".join(sorted(map(str, record))) or "none"
        raise DatasetFormatError(f"{where}: missing key {key!r} (keys present: {keys})")
    value = record[key]
    # bool is an int to isinstance; an id or count of true/false is a mistake in the file.
    if kinds is not None and (not isinstance(value, kinds) or isinstance(value, bool)):
        expected = kinds.__name__ if isinstance(kinds, type) else " or ".join(k.__name__ for k in kinds)
        raise DatasetFormatError(f"{where}: key {key!r} should be {expected}, got {value!r}")
    return value


def _list(container: Any, key: str, path: Path) -> list[Any]:
    return _field(container, key, f"{path}", list)


def _strings(value: Any, where: str, key: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise DatasetFormatError(f"{where}: key {key!r} should be a list of strings, got {value!r}")
    return value


# -- VQA ------------------------------------------------------------------------------------------


def coco_image_path(images: Path, image_id: int, subtype: str | None) -> Path:
    """COCO file of ``image_id``: ``COCO_val2014_000000000042.jpg`` (2014 names), else
    ``000000000042.jpg`` (2017 names), whichever exists; the 2014 name when neither does."""
    candidates = []
    if subtype:
        candidates.append(images / f"COCO_{subtype}_{image_id:012d}.jpg")
    candidates.append(images / f"{image_id:012d}.jpg")
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    return candidates[0]


def read_vqa(
    questions_path: str | Path, annotations_path: str | Path | None, images: str | Path
) -> VQADataset:
    """VQAv2 or OK-VQA: ``{"data_subtype", "questions": [{"image_id", "question", "question_id"}]}``
    and ``{"annotations": [{"question_id", "answers": [{"answer"}], ...}]}``.

    Without annotations (a test-dev submission) only predictions are made.
    """
    questions_path, images = Path(questions_path), Path(images)
    document = read_json(questions_path, "VQA questions")
    questions = _list(document, "questions", questions_path)
    subtype = document.get("data_subtype") if isinstance(document, Mapping) else None
    samples = []
    for index, record in enumerate(questions):
        where = f"{questions_path}: questions[{index}]"
        image_id = _field(record, "image_id", where, int)
        question = _field(record, "question", where, str)
        question_id = _field(record, "question_id", where, (int, str))
        samples.append(VQASample(question_id, coco_image_path(images, image_id, subtype), question))
    _check_unique([s.question_id for s in samples], questions_path, "question_id")

    annotations: list[dict[str, Any]] = []
    if annotations_path is not None:
        annotations_path = Path(annotations_path)
        annotations = _list(read_json(annotations_path, "VQA annotations"), "annotations", annotations_path)
        for index, record in enumerate(annotations):
            where = f"{annotations_path}: annotations[{index}]"
            _field(record, "question_id", where, (int, str))
            answers = _field(record, "answers", where, list)
            for number, answer in enumerate(answers):
                _field(answer, "answer", f"{where}.answers[{number}]", str)
        known = {record["question_id"] for record in annotations}
        unanswered = [s.question_id for s in samples if s.question_id not in known]
        if unanswered:
            raise DatasetFormatError(
                f"{annotations_path}: no annotation for {len(unanswered)} question(s) of "
                f"{questions_path}, e.g. question_id {unanswered[0]!r}; are they the same split?"
            )
    return VQADataset(samples, questions, annotations)


def read_gqa(questions_path: str | Path, images: str | Path) -> VQADataset:
    """GQA balanced questions: ``{question_id: {"imageId", "question", "answer", ...}}``; images
    are ``<imageId>.jpg``. ``questions`` holds the records with their ``question_id`` added."""
    questions_path, images = Path(questions_path), Path(images)
    document = read_json(questions_path, "GQA questions")
    if not isinstance(document, Mapping):
        raise DatasetFormatError(
            f"{questions_path}: a GQA questions file maps question ids to records; got a "
            f"{type(document).__name__}"
        )
    samples, questions = [], []
    for question_id, record in document.items():
        where = f"{questions_path}: question {question_id!r}"
        image_id = _field(record, "imageId", where, str)
        question = _field(record, "question", where, str)
        samples.append(VQASample(question_id, images / f"{image_id}.jpg", question))
        # The whole record (answer, types) for the metric; test splits have no "answer".
        questions.append({**record, "question_id": question_id, "answer": record.get("answer")})
    return VQADataset(samples, questions)


# -- captions -------------------------------------------------------------------------------------


def read_captions(path: str | Path, images: str | Path, *, split: str = "test") -> CaptionDataset:
    """Karpathy ``dataset_coco.json`` (``{"images": [{"filename", "split", "sentences"}]}``, the
    ``split`` images) or a COCO-style annotation file (``{"images", "annotations"}``, all images;
    NoCaps' files are of this kind and add each image's ``domain``)."""
    path, images = Path(path), Path(images)
    document = read_json(path, "captions")
    if isinstance(document, Mapping) and "annotations" in document:
        return _read_coco_captions(document, path, images)
    entries = _karpathy_entries(document, path, images, split)
    samples = [CaptionSample(image_id, image) for image_id, image, _ in entries]
    return CaptionDataset(samples, {image_id: sentences for image_id, _, sentences in entries})


def _read_coco_captions(document: Mapping[str, Any], path: Path, images: Path) -> CaptionDataset:
    samples, domains = [], {}
    for index, record in enumerate(_list(document, "images", path)):
        where = f"{path}: images[{index}]"
        image_id = _field(record, "id", where, (int, str))
        samples.append(CaptionSample(image_id, images / _field(record, "file_name", where, str)))
        if "domain" in record:
            domains[image_id] = str(record["domain"])
    _check_unique([s.image_id for s in samples], path, "images[].id")
    references: dict[Any, list[str]] = {sample.image_id: [] for sample in samples}
    for index, record in enumerate(_list(document, "annotations", path)):
        where = f"{path}: annotations[{index}]"
        image_id = _field(record, "image_id", where, (int, str))
        caption = _field(record, "caption", where, str)
        if image_id not in references:
            raise DatasetFormatError(f"{where}: image_id {image_id!r} is not among the file's images")
        references[image_id].append(caption)
    # NoCaps' test split ships no captions: then only predictions are made.
    return CaptionDataset(samples, references, domains)


def _karpathy_entries(
    document: Any, path: Path, images: Path, split: str
) -> list[tuple[Any, Path, list[str]]]:
    """(image_id, image path, raw sentences) of the ``split`` images of a Karpathy file.

    The image id is COCO's ``cocoid`` where present (what COCO submissions use), else the file
    name without extension (Flickr30k). ``restval`` counts as ``train``.
    """
    records = _list(document, "images", path)
    splits = {_field(record, "split", f"{path}: images[{index}]", str) for index, record in enumerate(records)}
    if split not in splits:
        raise DatasetFormatError(
            f"{path}: no image in split {split!r}; the file has splits {sorted(splits)}"
        )
    entries = []
    for index, record in enumerate(records):
        if record["split"] != split:
            continue
        where = f"{path}: images[{index}]"
        filename = _field(record, "filename", where, str)
        folder = record.get("filepath") or ""
        sentences = _field(record, "sentences", where, list)
        raws = [_field(sentence, "raw", f"{where}.sentences[{number}]", str)
                for number, sentence in enumerate(sentences)]
        if not raws:
            raise DatasetFormatError(f"{where}: key 'sentences' is empty; every image needs captions")
        image_id = record["cocoid"] if "cocoid" in record else Path(filename).stem
        entries.append((image_id, images / folder / filename, raws))
    _check_unique([entry[0] for entry in entries], path, "image id")
    return entries


# -- retrieval ------------------------------------------------------------------------------------


def read_retrieval(path: str | Path, images: str | Path, *, split: str = "test") -> RetrievalDataset:
    """COCO or Flickr30k Karpathy retrieval: a Karpathy ``dataset_*.json`` (the ``split`` images),
    or LAVIS' ``*_karpathy_test.json`` (``[{"image": relative path, "caption": [...]}]``)."""
    path, images = Path(path), Path(images)
    document = read_json(path, "retrieval")
    if isinstance(document, list):
        entries = []
        for index, record in enumerate(document):
            where = f"{path}: [{index}]"
            relative = _field(record, "image", where, str)
            captions = _strings(_field(record, "caption", where), where, "caption")
            entries.append((relative, images / relative, captions))
    else:
        entries = _karpathy_entries(document, path, images, split)
    dataset = RetrievalDataset([], [], [], [], [])
    for image_index, (image_id, image, captions) in enumerate(entries):
        dataset.image_ids.append(image_id)
        dataset.images.append(image)
        dataset.img2txt.append([])
        for caption in captions:
            dataset.img2txt[-1].append(len(dataset.texts))
            dataset.txt2img.append(image_index)
            dataset.texts.append(caption)
    if not dataset.images:
        raise DatasetFormatError(f"{path}: holds no images")
    return dataset


def _check_unique(ids: Sequence[Any], path: Path, key: str) -> None:
    seen: set[Any] = set()
    for value in ids:
        if value in seen:
            raise DatasetFormatError(f"{path}: {key} {value!r} appears more than once")
        seen.add(value)


__all__ = [
    "CaptionDataset",
    "CaptionSample",
    "DatasetFormatError",
    "RetrievalDataset",
    "VQADataset",
    "VQASample",
    "coco_image_path",
    "read_captions",
    "read_gqa",
    "read_json",
    "read_retrieval",
    "read_vqa",
]
