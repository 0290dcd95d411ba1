"""The model's public methods check their inputs (issue 8 item 7): pixels, captions, generation
options, over-long prompts and answer's prompt each get a message naming the argument and the fix,
instead of a silent wrong answer or a traceback from torch or transformers."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from blip2kit.core import build_component, build_model
from blip2kit.core.errors import InputError
from blip2kit.core.interfaces import GenerationOptions
from blip2kit.plugins.language.testing import make_opt_tokenizer, make_t5_tokenizer
from blip2kit.registry import Registry, get_registry


@pytest.fixture
def model(registry: Registry):
    """Stage 2 on the doubles: 32 px images, mean/std 0.5 (normalised pixels within ±1)."""
    return build_model("double_vision+double_bridge+double_lm")


def pixels(batch: int = 2, size: int = 32) -> torch.Tensor:
    return torch.rand(batch, 3, size, size) * 2 - 1  # what the encoder's transform gives


# -- pixels ---------------------------------------------------------------------------------------

BAD_PIXELS = [
    ("numpy", lambda: np.zeros((2, 3, 32, 32), np.float32), ["got a numpy.ndarray", "model.vision.transform()"]),
    ("PIL", lambda: Image.new("RGB", (32, 32)), ["got a PIL.Image.Image", "model.vision.transform()"]),
    ("list", lambda: [[0.0] * 32] * 3, ["got a list", "model.vision.transform()"]),
    ("uint8", lambda: torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8), ["dtype torch.uint8 (raw 0-255 values?)", "model.vision.transform()"]),
    ("raw-0-255-float", lambda: torch.rand(2, 3, 32, 32) * 255, ["look like raw 0-255", "within ±1.00", "model.vision.transform()"]),
    ("one-channel", lambda: pixels()[:, :1], ["1 channels (dimension 1 of shape [2, 1, 32, 32])", "reads 3 (RGB)"]),
    ("channels-last", lambda: pixels().permute(0, 2, 3, 1), ["permute(0, 3, 1, 2)"]),
    ("no-batch-dim", lambda: pixels()[0], ["without a batch dimension", "unsqueeze(0)"]),
    ("wrong-size", lambda: pixels(size=64), ["64x64 but the vision encoder reads 32x32", "image_size"]),
    ("nan", lambda: pixels().index_put_((torch.tensor(0),), torch.tensor(float("nan"))), ["NaN or infinite"]),
    ("empty", lambda: pixels(batch=0), ["no images"]),
]


@pytest.mark.parametrize(("make", "expected"), [row[1:] for row in BAD_PIXELS], ids=[row[0] for row in BAD_PIXELS])
@pytest.mark.parametrize("method", ["forward", "generate", "answer", "soft_prompt"])
def test_bad_pixels_are_refused_by_every_public_method(model, method: str, make, expected: list[str]) -> None:
    bad = make()
    calls = {
        "forward": lambda: model(bad, ["a cat", "a dog"]),
        "generate": lambda: model.generate(bad),
        "answer": lambda: model.answer(bad, "what is it?"),
        "soft_prompt": lambda: model.soft_prompt(bad),
    }
    with pytest.raises(InputError) as error:
        calls[method]()
    for part in expected:
        assert part in str(error.value), f"{part!r} not in {str(error.value)!r}"


def test_normalised_pixels_pass(model) -> None:
    assert model(pixels(), ["a cat", "a dog"])["loss"].isfinite()
    assert len(model.generate(pixels())) == 2


def test_stage1_checks_pixels_before_any_other_work(registry: Registry) -> None:
    stage1 = build_model("double_vision+double_bridge")  # its losses would fail on this bridge
    with pytest.raises(InputError, match="raw 0-255"):
        stage1(torch.rand(2, 3, 32, 32) * 255, ["a cat", "a dog"])


# -- captions -------------------------------------------------------------------------------------


def test_a_single_caption_string_is_not_split_into_characters(model) -> None:
    # len("ab") == batch size: before, each image got one character.
    with pytest.raises(InputError, match=r"text_input must be a list of strings, one per image, got a single string 'ab'; pass \['ab'\] \* 2"):
        model(pixels(), "ab")


@pytest.mark.parametrize(
    ("text_input", "text_output", "expected"),
    [
        (["a cat"], None, "got 1 text_input for 2 images"),
        (["a cat", 3], None, r"text_input\[1\] is int 3"),
        (["a cat", "a dog"], "cat dog", "text_output must be a list of strings"),
        (["a cat", "a dog"], ["a"], "got 1 text_output for 2 images"),
        ({"a": 1}, None, "text_input must be a list of strings, one per image, got dict"),
    ],
)
def test_captions_must_be_one_string_per_image(model, text_input: Any, text_output: Any, expected: str) -> None:
    with pytest.raises(InputError, match=expected):
        model(pixels(), text_input, text_output)


def test_prompts_and_questions_are_one_string_or_one_per_image(model) -> None:
    with pytest.raises(InputError, match="got 3 prompts for 2 images"):
        model.generate(pixels(), ["a", "b", "c"])
    with pytest.raises(InputError, match=r"questions\[0\] is NoneType"):
        model.answer(pixels(), [None, "why?"])
    assert len(model.generate(pixels(), "a photo of")) == 2  # one string is meant for every image


# -- generation options ---------------------------------------------------------------------------

BAD_OPTIONS = [
    ({"max_new_tokens": 0}, "max_new_tokens=0 is not allowed; use an integer >= 1"),
    ({"num_beams": 0}, "num_beams=0 is not allowed; use an integer >= 1"),
    ({"num_beams": 2.5}, "num_beams must be an integer >= 1, got 2.5"),
    ({"num_beams": True}, "num_beams must be an integer >= 1, got True"),
    ({"beams": 3}, r"unknown generation option 'beams' \(did you mean 'num_beams'\?\); the options are num_beams, max_new_tokens"),
    ({"num_return_sequences": 3, "num_beams": 2}, "num_return_sequences=3 is more than num_beams=2"),
    ({"min_new_tokens": 8, "max_new_tokens": 4}, "min_new_tokens=8 is more than max_new_tokens=4"),
    ({"top_p": 0.0}, "top_p=0.0 is not allowed; use 0 < top_p <= 1"),
    ({"temperature": 0}, "temperature=0 is not allowed; use a number > 0"),
    ({"do_sample": "yes"}, "do_sample must be True or False"),
    ({"length_penalty": "long"}, "length_penalty must be a number"),
]


@pytest.mark.parametrize(("options", "expected"), BAD_OPTIONS, ids=[str(o) for o, _ in BAD_OPTIONS])
def test_generation_options_are_each_named_and_checked(model, options: dict[str, Any], expected: str) -> None:
    with pytest.raises(InputError, match=expected):
        model.generate(pixels(), **options)


def test_sampling_may_return_more_sequences_than_beams(model) -> None:
    assert len(model.generate(pixels(), do_sample=True, num_beams=1, num_return_sequences=1)) == 2


# -- answer's prompt ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("Question: Short answer:", "must contain '{}' exactly once.*the question would be dropped"),
        ("Q: {} and again {}", "cannot take the question.*use exactly one '{}'"),
        ("Q: {question} A:", "cannot take the question.*KeyError"),
    ],
)
def test_answer_prompt_must_hold_one_placeholder(model, prompt: str, expected: str) -> None:
    with pytest.raises(InputError, match=expected):
        model.answer(pixels(), "what is it?", prompt=prompt)


# -- prompts longer than the language model's positions (never truncated, refused) -------------------------------------------------

@pytest.fixture(scope="module")
def opt(tmp_path_factory):
    directory = tmp_path_factory.mktemp("opt_tokenizer")
    make_opt_tokenizer(directory)
    return build_component(get_registry().get("language", "opt_tiny"), {"tokenizer": str(directory), "max_text_length": 12}).freeze()


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    directory = tmp_path_factory.mktemp("t5_tokenizer")
    make_t5_tokenizer(directory)
    return build_component(get_registry().get("language", "flant5_tiny"), {"tokenizer": str(directory), "max_text_length": 12}).freeze()


def test_opt_generation_refuses_more_positions_than_it_has(opt) -> None:
    prefix, mask = torch.randn(1, 8, opt.hidden_size), torch.ones(1, 8, dtype=torch.long)
    limit = opt.model.config.max_position_embeddings  # 128 for opt_tiny
    with pytest.raises(InputError, match=rf"8 query tokens \+ a prompt of \d+ tokens \+ max_new_tokens=200 need \d+ positions, but OPTLanguageModel has {limit}"):
        opt.generate(prefix, mask, ["a photo of"], GenerationOptions(num_beams=1, max_new_tokens=200))


