"""The synthetic shapes world: deterministic, disjoint, compositional, not degenerate, and written in
files that the public readers (pycocotools, the VQAv2 evaluation, Karpathy splits) accept."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from blip2kit.core.cli import main as cli_main
from blip2kit.core.data import shapes
from blip2kit.core.data.images import load_image

SMALL = {"train": 300, "val": 40, "test": 60}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("world")
    shapes.write_world(out, seed=5, sizes={"train": 8, "val": 3, "test": 4}, progress=False)
    return out


def test_same_seed_same_world_other_seed_other_world() -> None:
    first = [s.as_dict() for s in shapes.make_scenes(seed=3, sizes=SMALL)]
    again = [s.as_dict() for s in shapes.make_scenes(seed=3, sizes=SMALL)]
    other = [s.as_dict() for s in shapes.make_scenes(seed=4, sizes=SMALL)]
    assert first == again
    assert first != other
    scene = shapes.make_scenes(seed=3, sizes=SMALL)[0]
    assert shapes.render(scene).tobytes() == shapes.render(scene).tobytes()


def test_splits_are_disjoint_and_held_out_pairs_only_in_test() -> None:
    scenes = shapes.make_scenes(seed=1, sizes=SMALL)
    by_split = {split: [s for s in scenes if s.split == split] for split in shapes.SPLITS}
    assert {split: len(v) for split, v in by_split.items()} == SMALL
    train_keys = {s.composition for s in by_split["train"]}
    val_keys = {s.composition for s in by_split["val"]}
    assert not train_keys & val_keys
    assert not train_keys & {s.composition for s in by_split["test"]}
    assert not val_keys & {s.composition for s in by_split["test"]}
    assert len({s.image_id for s in scenes}) == len(scenes)

    def pairs(split: str) -> set[tuple[str, str]]:
        return {(o.shape, o.colour) for s in by_split[split] for o in s.objects}

    held_out = set(shapes.HELD_OUT)
    assert not pairs("train") & held_out and not pairs("val") & held_out
    assert pairs("test") & held_out == held_out  # every held-out pair is tested
    # ... while each of their attributes is seen in training, in other combinations.
    assert {shape for shape, _ in held_out} <= {shape for shape, _ in pairs("train")}
    assert {colour for _, colour in held_out} <= {colour for _, colour in pairs("train")}


def test_answers_are_spread_and_questions_are_answerable() -> None:
    scenes = shapes.make_scenes(seed=2, sizes=SMALL)
    distribution = shapes.answer_distribution([s for s in scenes if s.split == "train"])
    assert set(distribution) == {"what color is the", "what shape is the", "how many", "is the", "is there a"}
    for question_type, counts in distribution.items():
        top_share = counts.most_common(1)[0][1] / sum(counts.values())
        assert len(counts) >= 2 and top_share < 0.55, (question_type, counts)
    yes_no = distribution["is there a"]
    assert 0.4 < yes_no["yes"] / (yes_no["yes"] + yes_no["no"]) < 0.6

    # The answers follow from the scene (checked by hand-coded rules, not by the generator's own).
    for scene in scenes[:100]:
        names = {o.name for o in scene.objects}
        for record in scene.questions:
            question, answer = record["question"], record["answer"]
            if question.startswith("what color is the "):
                (obj,) = [o for o in scene.objects if o.shape == question[len("what color is the "):-1]]
                assert answer == obj.colour
            elif question.startswith("is there a "):
                assert answer == ("yes" if question[len("is there a "):-1] in names else "no")
            elif " to the left or to the right of " in question:
                first, second = question[len("is the "):-1].split(" to the left or to the right of the ")
                xs = {o.name: o.x for o in scene.objects}
                assert answer == ("left" if xs[first] < xs[second] else "right")
        for caption in scene.captions:  # every paraphrase names every object
            assert all(f"{o.colour} {o.shape}" in caption for o in scene.objects), caption


def test_files_open_with_the_public_readers(world: Path) -> None:
    from pycocotools.coco import COCO

    from blip2kit.core.evaluation import evaluate_vqa

    manifest = json.loads((world / "world.json").read_text())
    scenes = shapes.read_scenes(world)
    assert manifest["sizes"] == {"train": 8, "val": 3, "test": 4}
    for split in shapes.SPLITS:
        files = manifest["files"][split]
        coco = COCO(str(world / files["captions"]))
        split_scenes = [s for s in scenes if s.split == split]
        assert sorted(coco.getImgIds()) == [s.image_id for s in split_scenes]
        for scene in split_scenes:
            captions = [a["caption"] for a in coco.loadAnns(coco.getAnnIds(imgIds=scene.image_id))]
            assert captions == scene.captions
            image = load_image(world / "images" / coco.loadImgs(scene.image_id)[0]["file_name"])
            assert image.size == (64, 64) and image.mode == "RGB"

        questions = json.loads((world / files["vqa_questions"]).read_text())["questions"]
        annotations = json.loads((world / files["vqa_annotations"]).read_text())["annotations"]
        assert all(len(a["answers"]) == 10 for a in annotations)
        truth = {a["question_id"]: a["multiple_choice_answer"] for a in annotations}
        assert evaluate_vqa(truth, questions, annotations)["accuracy"] == 100.0  # percent
        wrong = {qid: "banana" for qid in truth}
        assert evaluate_vqa(wrong, questions, annotations)["accuracy"] == 0

        lavis = json.loads((world / files["lavis_captions"]).read_text())
        assert len(lavis) == (5 * len(split_scenes) if split == "train" else len(split_scenes))

    karpathy = json.loads((world / "dataset_coco.json").read_text())
    assert Counter(image["split"] for image in karpathy["images"]) == Counter(manifest["sizes"])
    for image in karpathy["images"]:
        assert (world / "images" / image["filepath"] / image["filename"]).is_file()
        assert len(image["sentences"]) == 5 and image["sentids"] == [s["sentid"] for s in image["sentences"]]


def test_demo_world_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "w"
    assert cli_main(["demo", "world", "--out", str(out), "--train", "3", "--val", "1", "--test", "2"]) == 0
    assert "3 train, 1 val, 2 test" in capsys.readouterr().out
    assert len(list((out / "images").rglob("*.png"))) == 6
    # A second run refuses to write over the world, naming the flag that allows it.
    assert cli_main(["demo", "world", "--out", str(out), "--train", "3"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli_main(["demo", "world", "--out", str(tmp_path / "x"), "--train", "0"]) == 2
    assert "--train must be at least 1" in capsys.readouterr().err


def test_text_scenes_come_from_the_sampler_but_never_from_held_out_or_excluded_compositions() -> None:
    import random

    scenes = shapes.make_scenes(seed=1, sizes=SMALL)
    unseen = {s.composition for s in scenes if s.split in ("val", "test")}
    # Also exclude every one-shape composition: a fifth of the sampler's draws, so a broken
    # exclusion cannot pass unnoticed.
    one_shape = {((shape, colour, size, slot),) for shape in shapes.SHAPES for colour in shapes.COLOURS
                 for size in shapes.SIZES for slot in shapes.SLOTS}
    rng = random.Random("text-scenes")
    drawn = [shapes.sample_text_scene(rng, unseen | one_shape) for _ in range(1500)]
    again = shapes.sample_text_scene(random.Random("text-scenes"), unseen | one_shape)
    assert again.captions == drawn[0].captions and again.questions == drawn[0].questions

    assert not {s.composition for s in drawn} & (unseen | one_shape)
    assert not {(o.shape, o.colour) for s in drawn for o in s.objects} & set(shapes.HELD_OUT)
    assert len({s.composition for s in drawn}) > 1000  # far more compositions than a train split
    for scene in drawn[:50]:
        # The first caption, written out by hand from the objects, left to right.
        slots = {"left": "on the left", "middle": "in the middle", "right": "on the right"}
        parts = [f"a {o.size} {o.colour} {o.shape} {slots[o.slot]}" for o in scene.objects]
        expected = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        assert scene.captions[0] == expected
        assert {q["question_type"] for q in scene.questions} >= {"what color is the", "how many", "is there a"}
