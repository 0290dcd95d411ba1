"""Tiny evaluation datasets written in the real public formats (VQAv2, GQA, Karpathy, COCO/NoCaps
captions), with small PNG images under their official file names. No download."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image

COCO_IDS = (42, 73, 139, 285)
QUESTIONS = (
    (42, 4200, "What color is the circle?", "red", "what color", "other"),
    (42, 4201, "Is there a cat?", "no", "is there a", "yes/no"),
    (73, 7300, "How many cats are there?", "2", "how many", "number"),
    (139, 13900, "What is on the couch?", "cats", "what is on the", "other"),
    (285, 28500, "What shape is it?", "triangle", "what shape", "other"),
)


def write_image(path: Path, seed: int, size: int = 40) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (size, size), ((seed * 37) % 256, (seed * 91) % 256, (seed * 53) % 256))
    image.putpixel((seed % size, (seed * 7) % size), (255, 255, 255))
    image.save(path)
    return path


def write_coco_images(root: Path, subtype: str = "val2014") -> Path:
    """COCO_val2014_000000000042.jpg ... (PNG bytes; PIL reads by content)."""
    for image_id in COCO_IDS:
        write_image(root / f"COCO_{subtype}_{image_id:012d}.jpg", image_id)
    return root


def write_vqa(directory: Path, subtype: str = "val2014") -> tuple[Path, Path]:
    """VQAv2-format questions and annotations files (OK-VQA uses the same format)."""
    questions = {
        "info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": subtype, "license": {},
        "questions": [{"image_id": image, "question": question, "question_id": qid}
                      for image, qid, question, *_ in QUESTIONS],
    }
    annotations = {
        "info": {}, "data_type": "mscoco", "data_subtype": subtype, "license": {},
        "annotations": [
            {"question_type": qtype, "multiple_choice_answer": answer, "image_id": image,
             "answer_type": atype, "question_id": qid,
             "answers": [{"answer": answer if n < 7 else "blue", "answer_confidence": "yes",
                          "answer_id": n + 1} for n in range(10)]}
            for image, qid, _, answer, qtype, atype in QUESTIONS
        ],
    }
    question_path, annotation_path = directory / "questions.json", directory / "annotations.json"
    question_path.write_text(json.dumps(questions))
    annotation_path.write_text(json.dumps(annotations))
    return question_path, annotation_path


def write_gqa(directory: Path, images: Path) -> Path:
    """GQA balanced questions: {question_id: {"imageId", "question", "answer", "types", ...}}."""
    records: dict[str, Any] = {}
    for number, (image, qid, question, answer, *_) in enumerate(QUESTIONS):
        image_id = f"n{image}"
        write_image(images / f"{image_id}.jpg", image)
        records[str(qid) + "0"] = {
            "semantic": [], "entailed": [], "equivalent": [], "question": question, "imageId": image_id,
            "isBalanced": True, "groups": {"global": None, "local": "c"}, "answer": answer,
            "semanticStr": "", "annotations": {}, "fullAnswer": answer,
            "types": {"structural": "query" if number % 2 else "verify", "semantic": "attr",
                      "detailed": "color"},
        }
    path = directory / "testdev_balanced_questions.json"
    path.write_text(json.dumps(records))
    return path


def karpathy_record(image_id: int, split: str, sentences: list[str], folder: str | None = "val2014") -> dict[str, Any]:
    record: dict[str, Any] = {
        "filename": f"COCO_val2014_{image_id:012d}.jpg", "imgid": image_id, "split": split,
        "sentids": list(range(len(sentences))), "cocoid": image_id,
        "sentences": [{"tokens": s.lower().split(), "raw": s, "imgid": image_id, "sentid": n}
                      for n, s in enumerate(sentences)],
    }
    if folder is not None:
        record["filepath"] = folder
    return record


def write_karpathy(directory: Path, images: Path) -> Path:
    """dataset_coco.json: three test images (two captions each) and one train image."""
    for image_id in COCO_IDS:
        write_image(images / "val2014" / f"COCO_val2014_{image_id:012d}.jpg", image_id)
    captions = {
        42: ["A red circle on a blue square.", "a red circle"],
        73: ["Two cats laying on a couch.", "two cats on a couch"],
        139: ["A man riding a horse on the beach.", "a horse on a beach"],
        285: ["A green triangle above a circle.", "a green triangle"],
    }
    records = [karpathy_record(image_id, "train" if image_id == 285 else "test", sentences)
               for image_id, sentences in captions.items()]
    path = directory / "dataset_coco.json"
    path.write_text(json.dumps({"images": records, "dataset": "coco"}))
    return path


def write_nocaps(directory: Path, images: Path) -> Path:
    """nocaps_val_4500_captions.json layout: COCO-style images (with domain) and annotations."""
    domains = ("in-domain", "near-domain", "out-domain", "near-domain")
    image_records, annotations = [], []
    for number, domain in enumerate(domains):
        name = f"{number:016x}.jpg"
        write_image(images / name, number + 5)
        image_records.append({"id": number, "file_name": name, "open_images_id": f"{number:016x}",
                              "domain": domain, "height": 40, "width": 40, "coco_url": ""})
        for caption in ("a photo of a thing", f"a {domain} object on a table"):
            annotations.append({"image_id": number, "caption": caption, "id": len(annotations)})
    path = directory / "nocaps_val_4500_captions.json"
    path.write_text(json.dumps({"licenses": [], "info": {}, "images": image_records,
                                "annotations": annotations}))
    return path


__all__ = ["COCO_IDS", "QUESTIONS", "karpathy_record", "write_coco_images", "write_gqa", "write_image",
           "write_karpathy", "write_nocaps", "write_vqa"]
