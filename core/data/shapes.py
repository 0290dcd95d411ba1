"""The synthetic shapes world: a small grounded world where BLIP-2's recipe can be shown offline.

Each scene is a small RGB image (64 px by default) of one to three shapes on a textured, noisy
background. Every shape has a shape, a colour, a size and a horizontal slot (left, middle, right);
within a scene all shapes and all colours differ, so "the red shape" and "the circle" name one
object. Scenes come with paraphrased captions that each describe the whole scene, and with VQA
questions (colour, shape, count, relative position, yes/no) carrying ten answers each.

Everything is deterministic by seed. Train, val and test scenes are disjoint by composition (no
test scene has the same set of objects as a train scene), and ``HELD_OUT`` (shape, colour) pairs
appear only in test scenes: a compositional split.

``write_world(out_dir, seed=...)`` writes the world in the public formats the evaluation code
reads: COCO-style captions, VQAv2-style questions and annotations, a Karpathy-style
``dataset_coco.json``, LAVIS-style caption json, and PNG images. ``blip2kit demo world`` runs it.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {  # name -> RGB
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (150, 60, 190),
    "orange": (240, 130, 30),
}
SIZES = ("small", "large")
RADIUS_SHARE = {"small": 0.09, "large": 0.15}  # a shape's radius as a share of the image side (+-8%)
SLOTS = ("left", "middle", "right")
# (shape, colour) pairs that only test scenes hold: the model must compose attributes it saw apart.
HELD_OUT = (("triangle", "green"), ("circle", "purple"), ("square", "orange"), ("diamond", "yellow"))
NUMBER_WORDS = ("zero", "one", "two", "three")
SPLITS = ("train", "val", "test")
DEFAULT_SIZES = {"train": 2000, "val": 200, "test": 300}
ANSWERS_PER_QUESTION = 10  # as VQAv2: ten human answers per question


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    colour: str
    size: str
    slot: str
    # Where it is drawn: centre in pixels (slot centre plus jitter) and radius.
    x: float
    y: float
    radius: float

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass
class Scene:
    image_id: int
    split: str
    file_name: str  # relative to the world's images/ folder, e.g. "train/000017.png"
    objects: list[ShapeObject]  # left to right
    texture_seed: int
    captions: list[str] = field(default_factory=list)
    questions: list[dict[str, Any]] = field(default_factory=list)  # {"question", "answer", "question_type", "answer_type"}

    @property
    def composition(self) -> tuple[tuple[str, str, str, str], ...]:
        """What the scene shows, without pixels: the key that makes splits disjoint."""
        return tuple((o.shape, o.colour, o.size, o.slot) for o in self.objects)

    def as_dict(self) -> dict[str, Any]:
        record = asdict(self)
        record["objects"] = [asdict(o) for o in self.objects]
        return record


# -- scenes ------------------------------------------------------------------------------------


def _sample_objects(rng: random.Random, image_size: int, allow_held_out: bool) -> list[ShapeObject]:
    count = rng.choice((1, 2, 2, 3, 3))
    slots = sorted(rng.sample(range(len(SLOTS)), count))
    shapes = rng.sample(SHAPES, count)
    colours = rng.sample(sorted(COLOURS), count)
    slot_width = image_size / len(SLOTS)
    objects = []
    for slot, shape, colour in zip(slots, shapes, colours):
        size = rng.choice(SIZES)
        radius = image_size * RADIUS_SHARE[size] * rng.uniform(0.92, 1.08)
        jitter = slot_width / 2 - radius - 1  # keep the shape inside its slot
        x = slot_width * (slot + 0.5) + rng.uniform(-max(jitter, 0), max(jitter, 0)) * 0.5
        y = rng.uniform(radius + 2, image_size - radius - 2)
        objects.append(ShapeObject(shape, colour, size, SLOTS[slot], x, y, radius))
    if not allow_held_out and any((o.shape, o.colour) in HELD_OUT for o in objects):
        return _sample_objects(rng, image_size, allow_held_out)
    return objects


def _has_held_out(objects: list[ShapeObject]) -> bool:
    return any((o.shape, o.colour) in HELD_OUT for o in objects)


def make_scenes(seed: int = 0, sizes: dict[str, int] | None = None, image_size: int = 64) -> list[Scene]:
    """Scenes of every split with captions and questions; deterministic in ``seed``.

    Train and val never hold a ``HELD_OUT`` pair; half of the test scenes hold one. No val or test
    scene repeats the composition of a scene in an earlier split.
    """
    sizes = {**DEFAULT_SIZES, **(sizes or {})}
    unknown = set(sizes) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split(s) {sorted(unknown)} in sizes; use {list(SPLITS)}")
    rng = random.Random(f"shapes-world-{seed}")
    scenes: list[Scene] = []
    seen: set[tuple] = set()
    image_id = 0
    for split in SPLITS:
        held_out_wanted = split == "test"
        split_seen: set[tuple] = set()
        for index in range(sizes[split]):
            for _attempt in range(1000):
                # Test alternates scenes with and without a held-out pair.
                allow = held_out_wanted
                objects = _sample_objects(rng, image_size, allow_held_out=allow)
                if held_out_wanted and (index % 2 == 0) != _has_held_out(objects):
                    continue
                key = tuple((o.shape, o.colour, o.size, o.slot) for o in objects)
                if key not in seen:  # compositions repeat within a split, never across splits
                    break
            else:
                raise RuntimeError(
                    f"could not draw {sizes[split]} {split} scenes disjoint from earlier splits; "
                    "ask for fewer scenes"
                )
            split_seen.add(key)
            scene = Scene(
                image_id=image_id,
                split=split,
                file_name=f"{split}/{image_id:06d}.png",
                objects=objects,
                texture_seed=rng.randrange(2**31),
            )
            scene.captions = captions_for(scene.objects, rng)
            scene.questions = questions_for(scene.objects, rng)
            scenes.append(scene)
            image_id += 1
        seen |= split_seen
    return scenes


def sample_text_scene(rng: random.Random, exclude: set[tuple], image_size: int = 64,
                      allow_held_out: bool = False, rendered: bool = False) -> Scene:
    """A scene drawn by the world's own sampler: for pretraining the towers on far more compositions
    than the train split holds. It never holds a composition in ``exclude`` (pass every val and test
    composition), and a ``HELD_OUT`` pair only with ``allow_held_out`` (words about a purple circle
    are fine for a text-only LLM, which never sees an image; an image of one is not). With
    ``rendered`` it also draws a ``texture_seed`` from ``rng``, for ``render``; without, the seed
    is 0 and ``rng`` advances only by the words."""
    for _attempt in range(1000):
        objects = _sample_objects(rng, image_size, allow_held_out=allow_held_out)
        if tuple((o.shape, o.colour, o.size, o.slot) for o in objects) not in exclude:
            break
    else:
        raise RuntimeError("could not draw a composition outside `exclude`; exclude fewer compositions")
    texture_seed = rng.randrange(2**31) if rendered else 0
    scene = Scene(image_id=-1, split="text", file_name="", objects=objects, texture_seed=texture_seed)
    scene.captions = captions_for(objects, rng)
    scene.questions = questions_for(objects, rng)
    return scene


# -- rendering ---------------------------------------------------------------------------------


def _polygon(obj: ShapeObject) -> list[tuple[float, float]]:
    r, x, y = obj.radius, obj.x, obj.y
    if obj.shape == "square":
        s = r * 0.85
        return [(x - s, y - s), (x + s, y - s), (x + s, y + s), (x - s, y + s)]
    if obj.shape == "triangle":
        return [(x + r * math.cos(a), y + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if obj.shape == "diamond":
        return [(x, y - r), (x + r * 0.8, y), (x, y + r), (x - r * 0.8, y)]
    raise ValueError(f"no polygon for shape {obj.shape!r}")


def render(scene: Scene, image_size: int = 64) -> Image.Image:
    """The scene's RGB image: a smooth random texture plus pixel noise, shapes drawn left to right."""
    rng = np.random.default_rng(scene.texture_seed)
    # Background: a coarse random grid upsampled (soft blotches) around a random grey-ish tone.
    base = rng.uniform(90, 170, size=3)
    coarse = rng.normal(0, 25, size=(4, 4, 3))
    blotches = np.asarray(
        Image.fromarray(np.clip(coarse + 128, 0, 255).astype(np.uint8)).resize(
            (image_size, image_size), Image.BICUBIC
        ),
        dtype=np.float32,
    ) - 128
    background = np.clip(base + blotches + rng.normal(0, 8, size=(image_size, image_size, 3)), 0, 255)
    image = Image.fromarray(background.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        tint = np.clip(np.array(COLOURS[obj.colour]) + rng.normal(0, 12, size=3), 0, 255)
        fill = tuple(int(c) for c in tint)
        if obj.shape == "circle":
            draw.ellipse([obj.x - obj.radius, obj.y - obj.radius, obj.x + obj.radius, obj.y + obj.radius], fill=fill)
        else:
            draw.polygon(_polygon(obj), fill=fill)
    # Sensor noise over the whole picture, shapes included.
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, 6, size=(image_size, image_size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


# -- language ----------------------------------------------------------------------------------

_SLOT_PHRASES = {
    "left": ("on the left", "at the left"),
    "middle": ("in the middle", "in the centre"),
    "right": ("on the right", "at the right"),
}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def captions_for(objects: list[ShapeObject], rng: random.Random, count: int = 5) -> list[str]:
    """``count`` paraphrases, each naming every shape's size, colour, shape and slot."""
    n = len(objects)
    noun = "shape" if n == 1 else "shapes"

    def placed(o: ShapeObject, variant: int) -> str:
        return f"{_article(o.size)} {o.size} {o.colour} {o.shape} {_SLOT_PHRASES[o.slot][variant]}"

    templates = [
        lambda: _join([placed(o, 0) for o in objects]),
        lambda: "there is " + _join([placed(o, 1) for o in objects]),
        lambda: f"{NUMBER_WORDS[n]} {noun} on a noisy background: " + _join([placed(o, 0) for o in objects]),
        lambda: "from left to right: " + _join([f"{_article(o.size)} {o.size} {o.colour} {o.shape}" for o in objects])
        + (f" {_SLOT_PHRASES[objects[0].slot][0]}" if n == 1 else ""),
        lambda: f"a picture of {NUMBER_WORDS[n]} {noun}, " + _join(
            [f"{_article(o.colour)} {o.colour} {o.shape} that is {o.size} {_SLOT_PHRASES[o.slot][0]}" for o in objects]
        ),
        lambda: _join([f"{o.size} {o.colour} {o.shape} {_SLOT_PHRASES[o.slot][1]}" for o in objects]),
    ]
    chosen = [templates[0]] + rng.sample(templates[1:], count - 1)
    return [make() for make in chosen]


def questions_for(objects: list[ShapeObject], rng: random.Random) -> list[dict[str, Any]]:
    """One question of each type that the scene supports (relative position needs two shapes).

    Counts are answered in digits, as VQAv2 annotators' answers are stored: the official
    evaluation maps a predicted "two" to "2" but leaves unanimous ground truth untouched."""
    questions = []

    def ask(question: str, answer: str, question_type: str, answer_type: str) -> None:
        questions.append({"question": question, "answer": answer, "question_type": question_type, "answer_type": answer_type})

    target = rng.choice(objects)
    ask(f"what color is the {target.shape}?", target.colour, "what color is the", "other")
    target = rng.choice(objects)
    ask(f"what shape is the {target.colour} object?", target.shape, "what shape is the", "other")
    if rng.random() < 0.5:
        ask("how many shapes are there?", str(len(objects)), "how many", "number")
    else:
        size = rng.choice(SIZES)
        ask(f"how many {size} shapes are there?", str(sum(o.size == size for o in objects)), "how many", "number")
    if len(objects) >= 2:
        first, second = rng.sample(objects, 2)
        side = "left" if SLOTS.index(first.slot) < SLOTS.index(second.slot) else "right"
        ask(f"is the {first.name} to the left or to the right of the {second.name}?", side, "is the", "other")
    if rng.random() < 0.5:  # yes: an object that is there; no: a combination that is not
        target = rng.choice(objects)
        ask(f"is there a {target.name}?", "yes", "is there a", "yes/no")
    else:
        present = {(o.shape, o.colour) for o in objects}
        absent = [(s, c) for s in SHAPES for c in COLOURS if (s, c) not in present]
        shape, colour = rng.choice(absent)
        ask(f"is there a {colour} {shape}?", "no", "is there a", "yes/no")
    return questions


# -- files -------------------------------------------------------------------------------------


def _write_json(path: Path, payload: Any, indent: int | None = None) -> None:
    """Compact by default: the annotation files are read by programs and hold thousands of records."""
    from blip2kit.core.checkpoints.atomic import atomic_write_json

    atomic_write_json(path, payload, indent=indent)


def coco_captions(scenes: list[Scene], image_size: int) -> dict[str, Any]:
    """COCO ``captions_*.json``: images with ids and file names, one annotation per caption."""
    images = [
        {"id": s.image_id, "file_name": s.file_name, "width": image_size, "height": image_size, "license": 0}
        for s in scenes
    ]
    annotations = []
    for scene in scenes:
        for caption in scene.captions:
            annotations.append({"id": len(annotations), "image_id": scene.image_id, "caption": caption})
    return {
        "info": {"description": "blip2kit synthetic shapes world", "version": "1.0"},
        "licenses": [{"id": 0, "name": "generated"}],
        "images": images,
        "annotations": annotations,
    }


def vqa_files(scenes: list[Scene], subtype: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """VQAv2 questions and annotations files; question ids are image_id * 10 + index."""
    questions, annotations = [], []
    for scene in scenes:
        for index, record in enumerate(scene.questions):
            question_id = scene.image_id * 10 + index
            questions.append({"image_id": scene.image_id, "question": record["question"], "question_id": question_id})
            annotations.append(
                {
                    "question_id": question_id,
                    "image_id": scene.image_id,
                    "question_type": record["question_type"],
                    "answer_type": record["answer_type"],
                    "multiple_choice_answer": record["answer"],
                    # The world has one true answer; all ten "annotators" give it.
                    "answers": [
                        {"answer": record["answer"], "answer_confidence": "yes", "answer_id": i + 1}
                        for i in range(ANSWERS_PER_QUESTION)
                    ],
                }
            )
    common = {"info": {"description": "blip2kit synthetic shapes world"}, "license": {"name": "generated"},
              "data_subtype": subtype, "task_type": "Open-Ended", "data_type": "shapes"}
    return {**common, "questions": questions}, {**common, "annotations": annotations}


def karpathy_split(scenes: list[Scene]) -> dict[str, Any]:
    """Karpathy ``dataset_coco.json``: every image with its split and tokenised sentences."""
    images = []
    sentence_id = 0
    for scene in scenes:
        sentences = []
        for caption in scene.captions:
            tokens = caption.replace(",", " ").replace(":", " ").split()
            sentences.append({"tokens": tokens, "raw": caption, "imgid": scene.image_id, "sentid": sentence_id})
            sentence_id += 1
        folder, name = scene.file_name.split("/")
        images.append(
            {
                "filepath": folder,
                "filename": name,
                "imgid": scene.image_id,
                "split": scene.split,
                "cocoid": scene.image_id,
                "sentids": [s["sentid"] for s in sentences],
                "sentences": sentences,
            }
        )
    return {"images": images, "dataset": "coco"}


def lavis_captions(scenes: list[Scene], split: str) -> list[dict[str, Any]]:
    """LAVIS ``coco_karpathy_*.json``: train has one record per caption, val/test one per image."""
    if split == "train":
        return [
            {"image": s.file_name, "caption": caption, "image_id": str(s.image_id)}
            for s in scenes
            for caption in s.captions
        ]
    return [{"image": s.file_name, "caption": list(s.captions), "image_id": s.image_id} for s in scenes]


def write_world(
    out_dir: str | Path,
    *,
    seed: int = 0,
    sizes: dict[str, int] | None = None,
    image_size: int = 64,
    progress: bool = True,
) -> dict[str, Any]:
    """Write the world under ``out_dir`` and return its manifest (also written as world.json).

    Layout::

        images/{train,val,test}/NNNNNN.png        the scenes (image_root for every file below)
        annotations/captions_{split}.json         COCO captions
        annotations/vqa_{split}_questions.json    VQAv2 questions
        annotations/vqa_{split}_annotations.json  VQAv2 annotations (ten answers each)
        annotations/coco_karpathy_{split}.json    LAVIS caption json
        dataset_coco.json                         Karpathy splits, for retrieval
        scenes.json                               ground truth of every scene
        world.json                                seed, sizes, held-out pairs, file list
    """
    from tqdm import tqdm

    from blip2kit.core.checkpoints.atomic import atomic_write_file

    out = Path(out_dir)
    scenes = make_scenes(seed, sizes, image_size)
    for scene in tqdm(scenes, desc="rendering scenes", unit="image", disable=not progress):
        path = out / "images" / scene.file_name
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write_file(path) as handle:
            render(scene, image_size).save(handle, format="PNG")
    by_split = {split: [s for s in scenes if s.split == split] for split in SPLITS}
    files: dict[str, dict[str, str]] = {}
    for split, split_scenes in by_split.items():
        questions, annotations = vqa_files(split_scenes, f"shapes_{split}")
        names = {
            "captions": f"annotations/captions_{split}.json",
            "vqa_questions": f"annotations/vqa_{split}_questions.json",
            "vqa_annotations": f"annotations/vqa_{split}_annotations.json",
            "lavis_captions": f"annotations/coco_karpathy_{split}.json",
        }
        _write_json(out / names["captions"], coco_captions(split_scenes, image_size))
        _write_json(out / names["vqa_questions"], questions)
        _write_json(out / names["vqa_annotations"], annotations)
        _write_json(out / names["lavis_captions"], lavis_captions(split_scenes, split))
        files[split] = names
    _write_json(out / "dataset_coco.json", karpathy_split(scenes))
    _write_json(out / "scenes.json", [s.as_dict() for s in scenes])
    manifest = {
        "world": "shapes",
        "seed": seed,
        "image_size": image_size,
        "sizes": {split: len(v) for split, v in by_split.items()},
        "held_out": [list(pair) for pair in HELD_OUT],
        "image_root": "images",
        "karpathy": "dataset_coco.json",
        "scenes": "scenes.json",
        "files": files,
    }
    _write_json(out / "world.json", manifest, indent=2)
    return manifest


def read_scenes(world_dir: str | Path) -> list[Scene]:
    """Scenes back from a written world's scenes.json."""
    import json

    path = Path(world_dir) / "scenes.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; write the world first with `blip2kit demo world --out DIR`")
    scenes = []
    for record in json.loads(path.read_text()):
        objects = [ShapeObject(**o) for o in record.pop("objects")]
        scenes.append(Scene(objects=objects, **record))
    return scenes


def answer_distribution(scenes: list[Scene]) -> dict[str, Counter]:
    """Answer counts per question type (how the world's answers are spread)."""
    counts: dict[str, Counter] = {}
    for scene in scenes:
        for record in scene.questions:
            counts.setdefault(record["question_type"], Counter())[record["answer"]] += 1
    return counts


__all__ = [
    "COLOURS", "HELD_OUT", "RADIUS_SHARE", "SHAPES", "SIZES", "SLOTS", "SPLITS", "Scene", "ShapeObject",
    "answer_distribution", "captions_for", "karpathy_split", "make_scenes", "questions_for",
    "read_scenes", "render", "sample_text_scene", "write_world",
]
