"""The shapes world's frozen towers: the recipe runs in a fast mode and its files load into the
cards; the shipped towers build by name, stay frozen, and the text-only LLM answers from a
description."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import safetensors.torch
import torch

from blip2kit.core import build_model
from blip2kit.plugins.shapes.recipe import FAST, answer_from_descriptions, make_towers
from blip2kit.plugins.shapes.towers import ASSETS, OPT_DIRECTORY, VIT_WEIGHTS

SHIPPED = (ASSETS / VIT_WEIGHTS).is_file() and (ASSETS / OPT_DIRECTORY / "model.safetensors").is_file()


@pytest.mark.slow
def test_recipe_fast_mode_makes_towers_that_load_into_the_cards(tmp_path: Path) -> None:
    report = make_towers(tmp_path, settings=FAST, progress=False)
    assert json.loads((tmp_path / "towers.json").read_text()) == json.loads(json.dumps(report))
    assert report["vision"]["steps"] == FAST.vision_steps and report["language"]["steps"] == FAST.language_steps
    assert 0.0 <= report["llm_vqa_floor"] <= 1.0 and 0.0 <= report["llm_vqa_ceiling"] <= 1.0
    assert report["timings"]["total_seconds"] > 0

    model = build_model(
        "shapes_vit+qformer_tiny+shapes_opt",
        vision={"pretrained": str(tmp_path / VIT_WEIGHTS)},
        language={"pretrained": str(tmp_path / OPT_DIRECTORY), "tokenizer": str(tmp_path / OPT_DIRECTORY)},
    )
    # The encoder holds exactly the recipe's weights (the pretraining-only last block dropped).
    written = safetensors.torch.load_file(tmp_path / VIT_WEIGHTS)
    assert set(written) == set(model.vision.state_dict())
    for key, value in model.vision.state_dict().items():
        torch.testing.assert_close(value, written[key], rtol=0, atol=0)

    tokenizer = model.language.tokenizer
    assert tokenizer("\n", add_special_tokens=False).input_ids == [model.language.newline_token_id]
    assert tokenizer("a red circle").input_ids[0] == tokenizer.bos_token_id  # BOS first, as OPT
    pixels = torch.randn(2, 3, 64, 64)
    loss = model(pixels, ["a small red circle on the left", "a large blue square in the middle"])["loss"]
    assert torch.isfinite(loss)


@pytest.mark.skipif(not SHIPPED, reason="the packaged towers are made by `blip2kit demo towers`")
def test_shipped_towers_build_by_name_frozen_and_never_flip() -> None:
    model = build_model("shapes_vit+qformer_tiny+shapes_opt")
    assert model.vision.image_size == 64 and model.vision.num_tokens == 65  # patch 8: 8 x 8 patches + CLS
    assert not any(p.requires_grad for p in model.vision.parameters())
    assert not any(p.requires_grad for p in model.language.parameters())
    assert any(p.requires_grad for p in model.bridge.parameters())
    # Left and right are answers in this world: the training transform must not mirror images.
    names = [type(step).__name__ for step in model.vision.transform(train=True).transforms]
    assert "RandomHorizontalFlip" not in names and "RandomResizedCrop" not in names


@pytest.mark.skipif(not SHIPPED, reason="the packaged towers are made by `blip2kit demo towers`")
def test_shipped_llm_answers_from_a_description() -> None:
    model = build_model("vit_tiny+qformer_tiny+shapes_opt")
    # Hand-written one-shape scenes in the world's caption style: the answer must be read from the
    # description (the same question gets a different answer when the description changes).
    cases = [
        ("a small green circle in the middle", "what color is the circle?", "green"),
        ("a large yellow circle on the right", "what color is the circle?", "yellow"),
        ("a large purple diamond on the left", "what shape is the purple object?", "diamond"),
    ]
    answers = answer_from_descriptions(model.language, [d for d, _, _ in cases], [q for _, q, _ in cases])
    assert answers == [expected for _, _, expected in cases]


def test_shapes_vit_honours_the_eva_settings_its_card_declares() -> None:
    """shapes_vit builds through the EVA factory, so hidden_act is not silently ignored."""
    from blip2kit.core.build import build_component
    from blip2kit.registry import get_registry

    encoder = build_component(get_registry().get("vision", "shapes_vit"), {"hidden_act": "quick_gelu"}, device="meta")
    activations = [type(module).__name__ for name, module in encoder.named_modules() if name.endswith("mlp.act")]
    assert activations and set(activations) == {"QuickGELU"}
    assert encoder.transform(train=True) is not None  # still the shapes subclass (no flip, no crop)


def test_language_pretraining_text_balances_question_types_and_never_describes_val_or_test() -> None:
    import random
    from collections import Counter

    from blip2kit.core.data import shapes
    from blip2kit.plugins.language.hf_base import VQA_PROMPT
    from blip2kit.plugins.shapes.recipe import QUESTION_TYPES, RecipeSettings, language_batch_examples, language_scenes

    scenes = shapes.make_scenes(seed=0, sizes={"train": 200, "val": 100, "test": 100})
    settings = RecipeSettings(language_batch=3000, vqa_share=0.75)
    rng = random.Random(0)
    examples = language_batch_examples(language_scenes(scenes, settings, rng), rng, settings)

    # Every caption names each shape's slot except "from left to right: ..." of two shapes (three
    # slot pairs read the same), so those may coincide without the composition being seen.
    unseen_captions = {c for s in scenes if s.split in ("val", "test") for c in s.captions
                       if not c.startswith("from left to right:")}
    assert len(unseen_captions) > 600
    assert not {description for description, _ in examples} & unseen_captions
    question_sequences = [segments for _, segments in examples if segments[0][0]]
    assert abs(len(question_sequences) / len(examples) - 0.75) < 0.03
    # A question sequence asks `questions_per_description` questions; a paraphrase is one segment.
    assert {len(segments) for segments in question_sequences} == {settings.questions_per_description}
    assert all(len(segments) == 1 for _, segments in examples if not segments[0][0])
    questions = [segments[0][0] for segments in question_sequences]  # the balanced first questions
    # Each question type a fifth of the questions (the prompt names the type's words).
    def type_of(prompt: str) -> str:
        question = prompt[len(VQA_PROMPT.split("{}")[0]):].lower()
        return next(t for t in sorted(QUESTION_TYPES, key=len, reverse=True) if question.startswith(t))

    counts = Counter(type_of(p) for p in questions)
    assert set(counts) == set(QUESTION_TYPES)
    for question_type in QUESTION_TYPES:
        assert abs(counts[question_type] / len(questions) - 0.2) < 0.03, counts


def test_llm_descriptions_take_the_canonical_caption_and_the_paraphrases_after_bos_every_template() -> None:
    import random

    from blip2kit.core.data import shapes
    from blip2kit.plugins.shapes.recipe import RecipeSettings, language_examples

    scene = next(s for s in shapes.make_scenes(seed=0, sizes={"train": 20, "val": 2, "test": 2}) if len(s.objects) == 3)
    rng = random.Random(0)
    canonical = [language_examples(scene, rng, 0.0, description="canonical") for _ in range(60)]
    assert {description for description, _ in canonical} == {scene.captions[0]}
    assert RecipeSettings().description == "paraphrase"  # the shipped tower's (see its comment)
    # What follows BOS still copies any of the five captions: stage 2 trains on all of them.
    assert {segments[0][1] for _, segments in canonical} == set(scene.captions)
    paraphrased = {language_examples(scene, rng, 0.0, description="paraphrase")[0] for _ in range(60)}
    assert paraphrased == set(scene.captions)


@pytest.mark.parametrize("held_out_pairs", [True, False])
def test_llm_text_names_held_out_pairs_only_when_asked_and_never_a_val_or_test_scene(held_out_pairs: bool) -> None:
    import itertools
    import random

    from blip2kit.core.data import shapes
    from blip2kit.plugins.shapes.recipe import RecipeSettings, language_scenes

    scenes = shapes.make_scenes(seed=0, sizes={"train": 200, "val": 100, "test": 100})
    unseen = {s.composition for s in scenes if s.split in ("val", "test")}
    drawn = list(itertools.islice(language_scenes(scenes, RecipeSettings(), random.Random(0), held_out_pairs), 2000))
    assert not {s.composition for s in drawn} & unseen
    named = {(o.shape, o.colour) for s in drawn for o in s.objects} & set(shapes.HELD_OUT)
    assert named == (set(shapes.HELD_OUT) if held_out_pairs else set())


def test_language_batch_scores_only_the_answers_of_every_question_and_a_paraphrase_whole() -> None:
    from blip2kit.plugins.shapes import SHAPES_OPT_CONFIG
    from blip2kit.plugins.shapes.recipe import _language_batch
    from blip2kit.plugins.shapes.towers import build_shapes_opt

    tokenizer = build_shapes_opt(dict(SHAPES_OPT_CONFIG)).tokenizer
    description = "a small yellow square on the left"
    examples = [
        (description, [("Question: how many shapes are there? Short answer:", " 1"),
                       ("Question: what color is the square? Short answer:", " yellow")]),
        (description, [("", "there is a small yellow square at the left")]),
    ]
    batch = _language_batch(examples, tokenizer)
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
    real = batch["attention_mask"].bool()
    assert decode(batch["input_ids"][0][real[0]]) == (
        description + "</s>Question: how many shapes are there? Short answer: 1\n"
        "Question: what color is the square? Short answer: yellow\n"
    )
    scored = [decode(row[row != -100]) for row in batch["labels"]]
    assert scored == [" 1\n yellow\n", "</s>there is a small yellow square at the left\n"]


def test_demo_finds_the_towers_recipe_through_the_card_and_names_a_card_without_one(monkeypatch) -> None:
    import blip2kit.registry as registry_module
    from blip2kit.core import demo
    from blip2kit.plugins.shapes import recipe
    from blip2kit.registry import ComponentCard, Registry

    assert demo.towers_recipe() is recipe  # the shapes cards name it; core names no plugin module
    assert recipe.packaged_seed() == 0  # the shipped towers were made on the world of seed 0

    bare = Registry()
    bare.add_vision_encoder(ComponentCard(name=demo.VISION, kind="vision", factory="a.b:c", width=64))
    monkeypatch.setattr(registry_module, "get_registry", lambda: bare)
    with pytest.raises(ValueError, match=r"'shapes_vit' declares no recipe \(ComponentCard.recipe\)"):
        demo.towers_recipe()


def test_reading_batch_perturbs_only_the_description_by_merging_noise_and_scale() -> None:
    """Phase 2's batch: unperturbed rows are the token batch exactly; a perturbed description is
    its runs of neighbouring token embeddings summed (checked by hand at zero noise and scale 1),
    and the text after it and the labels are the token batch's."""
    from dataclasses import replace

    from blip2kit.plugins.shapes import SHAPES_OPT_CONFIG
    from blip2kit.plugins.shapes.recipe import RecipeSettings, _language_batch, _reading_batch
    from blip2kit.plugins.shapes.towers import build_shapes_opt

    tokenizer = build_shapes_opt(dict(SHAPES_OPT_CONFIG)).tokenizer
    embed = torch.nn.Embedding(len(tokenizer), 8)
    description = "a small yellow square on the left"
    examples = [(description, [("Question: how many shapes are there? Short answer:", " 1")]),
                (description, [("", "there is a small yellow square at the left")])]
    tokens = _language_batch(examples, tokenizer)
    prefix_length = len(tokenizer(description, add_special_tokens=False).input_ids)
    assert prefix_length >= 4

    clean = _reading_batch(examples, tokenizer, embed, replace(RecipeSettings(), reading_share=0.0), torch.Generator())
    real = tokens["attention_mask"].bool()  # padding is masked out and unscored: zeros there
    assert torch.equal(clean["inputs_embeds"][real], embed(tokens["input_ids"])[real])
    assert torch.equal(clean["labels"], tokens["labels"]) and torch.equal(clean["attention_mask"], tokens["attention_mask"])

    merged = _reading_batch(
        examples, tokenizer, embed,
        replace(RecipeSettings(), reading_share=1.0, reading_max_merge=2, reading_noise=0.0, reading_max_scale=1.0),
        torch.Generator().manual_seed(0),
    )
    for row in range(2):
        token_embeds = embed(tokens["input_ids"][row])
        length = int(tokens["attention_mask"][row].sum())
        new_length = int(merged["attention_mask"][row].sum())
        runs = prefix_length - (length - new_length)  # vectors the description became
        run = -(-prefix_length // runs)
        assert run in (1, 2) and runs == -(-prefix_length // run)
        expected_prefix = torch.stack([c.sum(0) for c in token_embeds[:prefix_length].split(run)])
        assert torch.allclose(merged["inputs_embeds"][row, :runs], expected_prefix)
        assert torch.equal(merged["inputs_embeds"][row, runs:new_length], token_embeds[prefix_length:length])
        assert (merged["labels"][row, :runs] == -100).all()
        assert torch.equal(merged["labels"][row, runs:new_length], tokens["labels"][row, prefix_length:length])


def test_clip_image_embedding_pools_the_patch_tokens_or_takes_the_class_token() -> None:
    from blip2kit.plugins.shapes.recipe import RecipeSettings, pool_image_tokens

    tokens = torch.tensor([[[9.0, 9.0], [1.0, 2.0], [3.0, 6.0]]])  # [1, class + 2 patches, 2]
    assert pool_image_tokens(tokens, "mean").tolist() == [[2.0, 4.0]]  # the class token left out
    assert pool_image_tokens(tokens, "cls").tolist() == [[9.0, 9.0]]
    assert RecipeSettings().vision_pool == "mean"


def test_vision_pretraining_pairs_fresh_scenes_with_twins_that_differ_only_in_shapes_or_one_size() -> None:
    import random

    import numpy as np

    from blip2kit.core.data import shapes
    from blip2kit.plugins.shapes.recipe import sampled_vision_batch

    scenes = shapes.make_scenes(seed=0, sizes={"train": 200, "val": 100, "test": 100})
    unseen = {s.composition for s in scenes if s.split in ("val", "test")}
    drawn = sampled_vision_batch(random.Random(0), 600, 1.0, unseen)
    assert len(drawn) == 600
    assert not {s.composition for s in drawn} & unseen
    assert not {(o.shape, o.colour) for s in drawn for o in s.objects} & set(shapes.HELD_OUT)
    # A twin follows its scene and shares its background seed (31 random bits: no chance match).
    pairs = [(a, b) for a, b in zip(drawn, drawn[1:]) if a.texture_seed == b.texture_seed]
    assert len(pairs) > 270
    kinds = []
    for scene, twin in pairs:
        assert [(o.colour, o.slot) for o in scene.objects] == [(o.colour, o.slot) for o in twin.objects]
        shapes_changed = [o.shape for o in scene.objects] != [o.shape for o in twin.objects]
        sizes_changed = sum(a.size != b.size for a, b in zip(scene.objects, twin.objects))
        assert (shapes_changed, sizes_changed) in ((True, 0), (False, 1))
        kinds.append(shapes_changed)
        slots = {"left": "on the left", "middle": "in the middle", "right": "on the right"}
        parts = [f"a {o.size} {o.colour} {o.shape} {slots[o.slot]}" for o in twin.objects]
        assert twin.captions[0] == (parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1])
        # The pictures differ only inside the changed objects' boxes: same background and noise.
        different = np.any(np.asarray(shapes.render(scene)) != np.asarray(shapes.render(twin)), axis=-1)
        assert different.any()
        allowed = np.zeros_like(different)
        for a, b in zip(scene.objects, twin.objects):
            if a != b:
                for o in (a, b):
                    top, bottom = int(o.y - o.radius) - 2, int(o.y + o.radius) + 3
                    left, right = int(o.x - o.radius) - 2, int(o.x + o.radius) + 3
                    allowed[max(top, 0):bottom, max(left, 0):right] = True
        assert not (different & ~allowed).any()
    assert 0.55 < sum(kinds) / len(kinds) < 0.8  # two in three change the shapes


@pytest.mark.parametrize(("field", "value", "says"), [
    ("vision_images", "val", "vision_images must be 'sampled' or 'train'"),
    ("vision_twin_rate", 1.5, "vision_twin_rate must lie in [0, 1]"),
    ("reading_max_merge", 0, "reading_max_merge must be at least 1"),
    ("reading_max_scale", 0.5, "reading_max_scale must be at least 1"),
    ("reading_share", 1.5, "reading_share must lie in [0, 1]"),
    ("reading_noise", -0.1, "reading_noise must not be negative"),
    ("language_steps", 0, "language_steps must be at least 1"),
    ("description", "first", "description must be 'canonical' or 'paraphrase'"),
    ("vision_pool", "max", "vision_pool must be 'mean' or 'cls'"),
])
def test_recipe_settings_name_a_bad_field_before_any_training(field: str, value: object, says: str) -> None:
    from blip2kit.plugins.shapes.recipe import RecipeSettings

    with pytest.raises(ValueError, match=re.escape(says)):
        RecipeSettings(**{field: value})
