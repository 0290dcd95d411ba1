"""blip2kit's beam search against its two references, token for token.

- ``beam_convention="transformers"``: the installed transformers' ``generate`` on the same weights
  and inputs, run here.
- ``beam_convention="lavis"``: transformers 4.26.1, the version LAVIS ran. Its outputs were made
  once by ``tests/fixtures/beam_lavis/make_goldens.py`` in an environment with that version and
  stored in ``goldens.pt`` with the tiny models' weights and inputs.

Cases cover batches with padding, min_new_tokens, length penalties 0/1/2, a repetition penalty,
several returned sequences, and beams that stop at the end token as well as at max_new_tokens.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from blip2kit.core import GenerationOptions
from blip2kit.core.errors import InputError
from blip2kit.core.validation import generation_options
from blip2kit.plugins.language.opt import OPTLanguageModel
from blip2kit.plugins.language.t5 import T5LanguageModel
from blip2kit.plugins.language.testing import make_opt_tokenizer

GOLDENS = Path(__file__).parent / "fixtures" / "beam_lavis" / "goldens.pt"


@pytest.fixture(scope="module")
def goldens():
    return torch.load(GOLDENS, weights_only=True)


def _load(model: torch.nn.Module, state: dict) -> torch.nn.Module:
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(key == "lm_head.weight" for key in missing), (missing, unexpected)
    return model.eval()


@pytest.fixture(scope="module")
def models(goldens):
    """The 4.26 goldens' weights in the installed transformers, behind blip2kit's wrappers."""
    from transformers import OPTConfig, OPTForCausalLM, T5Config, T5ForConditionalGeneration

    opt = _load(OPTForCausalLM(OPTConfig(**goldens["opt_config"])), goldens["opt_state"])
    t5 = _load(T5ForConditionalGeneration(T5Config(**goldens["t5_config"])), goldens["t5_state"])
    return {"opt": OPTLanguageModel(opt, {"newline_token_id": goldens["opt_eos"]}),
            "t5": T5LanguageModel(t5, {})}


def _inputs(goldens, name, language):
    """[queries ; prompt] embeddings and mask, and the prompt tokens, as blip2kit builds them."""
    queries = goldens[f"{name}_queries"]
    tokens = {"input_ids": goldens[f"{name}_ids"], "attention_mask": goldens[f"{name}_mask"]}
    embeds, mask = language.prepend_soft_prompt(queries, torch.ones(queries.shape[:2], dtype=torch.long), tokens)
    return embeds, mask, tokens


def _options(case, convention, engine="blip2kit"):
    beams, max_new, min_new, penalty, repetition, returned = case
    return GenerationOptions(num_beams=beams, max_new_tokens=max_new, min_new_tokens=min_new,
                             length_penalty=penalty, repetition_penalty=repetition,
                             num_return_sequences=returned, beam_convention=convention, beam_search=engine)


def _special_ids(goldens, name):
    if name == "opt":
        return {"eos_token_id": goldens["opt_eos"], "pad_token_id": goldens["opt_config"]["pad_token_id"]}
    return {}


@torch.no_grad()
@pytest.mark.parametrize("name", ["opt", "t5"])
def test_the_models_are_the_ones_the_goldens_were_made_with(goldens, models, name):
    language = models[name]
    embeds, mask, tokens = _inputs(goldens, name, language)
    if name == "opt":
        logits = language.model(inputs_embeds=embeds, attention_mask=mask).logits[:, -1]
    else:
        start = torch.zeros(embeds.shape[0], 1, dtype=torch.long)
        logits = language.model(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=start).logits[:, -1]
    torch.testing.assert_close(logits, goldens[f"{name}_first_logits"], rtol=1e-4, atol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("name", ["opt", "t5"])
def test_lavis_convention_reproduces_transformers_4_26(goldens, models, name):
    assert goldens["transformers_version"] == "4.26.1"
    language = models[name]
    embeds, mask, tokens = _inputs(goldens, name, language)
    stopped_early = reached_limit = 0
    for case, expected in zip(goldens["cases"], goldens["outputs"][name]):
        ours = language.beam_search(embeds, mask, tokens, _options(case, "lavis"), **_special_ids(goldens, name))
        assert torch.equal(ours, expected), f"case {case}: ours {ours.tolist()} != 4.26 {expected.tolist()}"
        eos = goldens["opt_eos"] if name == "opt" else goldens["t5_config"]["eos_token_id"]
        stopped_early += int((expected == eos).any())
        reached_limit += int(expected.shape[1] == case[1])
    # Both ways a beam ends occur among the cases.
    assert stopped_early > 0 and reached_limit > 0


@torch.no_grad()
@pytest.mark.parametrize("name", ["opt", "t5"])
def test_transformers_convention_reproduces_installed_generate(goldens, models, name):
    language = models[name]
    embeds, mask, tokens = _inputs(goldens, name, language)
    for case in goldens["cases"][::3]:
        options = _options(case, "transformers")
        reference = language.model.generate(inputs_embeds=embeds, attention_mask=mask, **_special_ids(goldens, name),
                                            **language.generation_kwargs(options))
        if name == "t5":
            reference = reference[:, 1:]  # the decoder start token
        ours = language.beam_search(embeds, mask, tokens, options, **_special_ids(goldens, name))
        assert torch.equal(ours, reference), f"case {case}: ours {ours.tolist()} != {reference.tolist()}"


@torch.no_grad()
def test_the_conventions_differ_where_the_length_counts(goldens, models):
    """The two references disagree on some cases (the lengths they normalise by differ), so each
    parity test above can tell them apart."""
    language = models["opt"]
    embeds, mask, tokens = _inputs(goldens, "opt", language)
    differing = 0
    for case, lavis in list(zip(goldens["cases"], goldens["outputs"]["opt"]))[::2]:
        ours = language.beam_search(embeds, mask, tokens, _options(case, "transformers"), **_special_ids(goldens, "opt"))
        differing += int(not torch.equal(ours, lavis))
    assert differing > 0


@torch.no_grad()
@pytest.mark.parametrize("name", ["opt", "t5"])
def test_the_prompt_is_read_once_per_image_then_one_token_per_beam(goldens, models, name):
    """OPT: the prefill of [queries ; prompt] runs on one row per image. T5: the encoder, and the
    decoder's start step (its cross-attention over the encoder output), run once per image."""
    language = models[name]
    embeds, mask, tokens = _inputs(goldens, name, language)
    decoder = language.model.model.decoder if name == "opt" else language.model.decoder
    rows_seen = []

    def record(module, args, kwargs):
        given = kwargs.get("inputs_embeds")
        rows_seen.append(tuple((given if given is not None else kwargs["input_ids"]).shape[:2]))

    hook = decoder.register_forward_pre_hook(record, with_kwargs=True)
    try:
        language.beam_search(embeds, mask, tokens, _options((5, 4, 0, 1.0, 1.0, 1), "transformers"),
                             **_special_ids(goldens, name))
    finally:
        hook.remove()
    batch = embeds.shape[0]
    first = (batch, embeds.shape[1]) if name == "opt" else (batch, 1)
    assert rows_seen[0] == first
    assert len(rows_seen) > 1 and all(shape == (batch * 5, 1) for shape in rows_seen[1:])


@pytest.fixture(scope="module")
def opt_with_tokenizer(tmp_path_factory):
    from blip2kit.core import build_component
    from blip2kit.registry import get_registry

    directory = tmp_path_factory.mktemp("opt_tokenizer")
    make_opt_tokenizer(directory)
    torch.manual_seed(0)
    language = build_component(get_registry().get("language", "opt_tiny"), {"tokenizer": str(directory)}).freeze()
    with torch.no_grad():  # wider weights than the init, so beams disagree
        for parameter in language.parameters():
            parameter.mul_(5.0)
    return language


def test_generate_runs_blip2kit_beam_search_and_can_force_transformers(opt_with_tokenizer, monkeypatch):
    language = opt_with_tokenizer
    prefix = torch.randn(2, 3, language.hidden_size, generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 3, dtype=torch.long)
    prompts = ["a photo of", "Question: how many cats? Short answer:"]
    options = dict(num_beams=4, max_new_tokens=6, min_new_tokens=1, num_return_sequences=2)
    own = language.generate(prefix, mask, prompts, generation_options({}, options))

    calls = []
    generate = language.model.generate
    monkeypatch.setattr(language.model, "generate", lambda **kw: calls.append(kw) or generate(**kw))
    theirs = language.generate(prefix, mask, prompts, generation_options({}, {**options, "beam_search": "transformers"}))
    assert len(calls) == 1 and calls[0]["num_beams"] == 4
    assert own == theirs and len(own) == 4
    language.generate(prefix, mask, prompts, generation_options({}, options))
    assert len(calls) == 1  # blip2kit's own beam search does not call generate


@pytest.mark.parametrize("options, message", [
    ({"beam_convention": "lavis4"}, "beam_convention='lavis4' is not known"),
    ({"beam_search": "hf"}, "beam_search='hf' is not known"),
    ({"beam_convention": "lavis", "beam_search": "transformers"}, "needs beam_search='blip2kit'"),
    ({"beam_convention": "lavis", "do_sample": True}, "without sampling"),
])
def test_beam_options_are_checked_by_name(options, message):
    with pytest.raises(InputError, match=message):
        generation_options({"num_beams": 5}, options)


def test_evaluation_recipes_carry_the_beam_convention(opt_with_tokenizer):
    import argparse

    from blip2kit.core.commands.evaluate import resolve_config
    from blip2kit.core.evaluation.recipes import generation_options as recipe_options, recipe

    prompts = ["a photo of"] * 2
    assert recipe_options(opt_with_tokenizer, recipe("coco_caption"), prompts)["beam_convention"] == "transformers"
    lavis = recipe_options(opt_with_tokenizer, recipe("coco_caption", beam_convention="lavis"), prompts)
    assert generation_options({}, lavis).beam_convention == "lavis"
    arguments = argparse.Namespace(config=None, task="coco_caption", model="m", images=".", beam_convention="4.26")
    with pytest.raises(ValueError, match="beam_convention: Input should be 'transformers' or 'lavis'"):
        resolve_config(arguments)
