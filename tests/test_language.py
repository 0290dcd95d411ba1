"""The OPT and Flan-T5 language plugins: cards, freezing and precision, OPT label masking, the T5
prefix-LM split, generation plumbing, key conversion, and Flan-T5's untied lm_head surviving a load."""

from __future__ import annotations

import random

import pytest
import torch

from blip2kit.core import GenerationOptions, build_component, count_parameters
from blip2kit.plugins.language.opt import IGNORE_INDEX
from blip2kit.plugins.language.t5 import prefix_lm_split
from blip2kit.plugins.language.testing import make_opt_tokenizer, make_t5_tokenizer
from blip2kit.registry import get_registry


def _build(name: str, **config):
    return build_component(get_registry().get("language", name), config)


@pytest.fixture(scope="module")
def opt_tokenizer_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("opt_tokenizer")
    make_opt_tokenizer(directory)
    return str(directory)


@pytest.fixture(scope="module")
def t5_tokenizer_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("t5_tokenizer")
    make_t5_tokenizer(directory)
    return str(directory)


@pytest.fixture
def opt(opt_tokenizer_dir):
    torch.manual_seed(0)
    return _build("opt_tiny", tokenizer=opt_tokenizer_dir).freeze()


@pytest.fixture
def t5(t5_tokenizer_dir):
    torch.manual_seed(0)
    return _build("flant5_tiny", tokenizer=t5_tokenizer_dir).freeze()


# -- cards ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["opt_2.7b", "opt_6.7b", "opt_tiny", "flant5_xl", "flant5_xxl", "flant5_tiny"])
def test_cards_build_on_meta_with_their_width_and_params(name):
    card = get_registry().get("language", name)
    model = build_component(card, device="meta")
    assert all(p.device.type == "meta" for p in model.parameters())
    assert model.hidden_size == card.width
    assert count_parameters(model).total == card.params
    assert model.is_encoder_decoder == name.startswith("flant5")


def test_full_size_shapes_are_the_released_ones():
    opt = build_component(get_registry().get("language", "opt_6.7b"), device="meta")
    assert opt.model.config.ffn_dim == 16384 and opt.model.config.num_hidden_layers == 32
    t5 = build_component(get_registry().get("language", "flant5_xxl"), device="meta")
    config = t5.model.config
    assert (config.d_model, config.d_ff, config.num_heads, config.num_layers) == (4096, 10240, 64, 24)
    assert config.dense_act_fn == "gelu" and config.is_gated_act
    assert not config.scale_decoder_outputs
    assert t5.model.lm_head.weight is not t5.model.shared.weight


def test_missing_tokenizer_says_what_to_configure():
    model = _build("opt_tiny")
    with pytest.raises(RuntimeError, match="tokenizer"):
        model.tokenizer


# -- freezing and precision ----------------------------------------------------------------------


def test_frozen_model_passes_gradient_to_the_soft_prompt(opt):
    opt.train()
    assert not opt.training and not any(p.requires_grad for p in opt.parameters())
    prefix = torch.randn(2, 4, opt.hidden_size, requires_grad=True)
    loss = opt.loss(prefix, torch.ones(2, 4, dtype=torch.long), ["a red circle", "two cats"])
    loss.backward()
    assert torch.isfinite(loss) and prefix.grad is not None and prefix.grad.abs().sum() > 0


def test_opt_casts_to_half(opt):
    opt.cast_frozen(torch.float16)
    assert {p.dtype for p in opt.parameters()} == {torch.float16}


def test_t5_casts_to_bf16_keeping_wo_fp32(t5):
    with pytest.warns(UserWarning, match="bfloat16"):
        t5.cast_frozen(torch.float16)
    for name, parameter in t5.named_parameters():
        expected = torch.float32 if ".wo." in name else torch.bfloat16
        assert parameter.dtype == expected, name
    prefix = torch.randn(1, 4, t5.hidden_size, dtype=torch.bfloat16)
    assert torch.isfinite(t5.loss(prefix, torch.ones(1, 4, dtype=torch.long), ["a red circle on a square"]))


# -- OPT labels ----------------------------------------------------------------------------------


def _capture_loss_call(opt, monkeypatch):
    """OPT's loss goes through causal_lm_loss (the LM head only where there are labels)."""
    calls = []
    compute = opt.causal_lm_loss

    def spy(**kwargs):
        calls.append(kwargs)
        return compute(**kwargs)

    monkeypatch.setattr(opt, "causal_lm_loss", spy)
    return calls


def test_opt_labels_mask_queries_prompt_and_padding(opt, monkeypatch):
    opt.prompt = "a photo of"
    tokenizer = opt.tokenizer
    calls = _capture_loss_call(opt, monkeypatch)
    queries = 3
    opt.loss(torch.zeros(2, queries, opt.hidden_size), torch.ones(2, queries, dtype=torch.long),
             ["two cats", "a man riding a horse on the beach"])
    labels, mask = calls[0]["labels"], calls[0]["attention_mask"]

    long_ids = tokenizer("a photo of a man riding a horse on the beach\n").input_ids
    short_ids = tokenizer("a photo of two cats\n").input_ids
    prompt_length = len(tokenizer("a photo of").input_ids)  # BOS + prompt tokens
    assert long_ids[0] == tokenizer.bos_token_id and prompt_length == 4
    width = queries + len(long_ids)
    expected = torch.full((2, width), IGNORE_INDEX)
    expected[0, queries + prompt_length: queries + len(short_ids)] = torch.tensor(short_ids[prompt_length:])
    expected[1, queries + prompt_length:] = torch.tensor(long_ids[prompt_length:])
    assert torch.equal(labels, expected)
    assert mask[0].tolist() == [1] * (queries + len(short_ids)) + [0] * (len(long_ids) - len(short_ids))
    assert labels[0, -1 - (len(long_ids) - len(short_ids))] == opt.newline_token_id  # caption + "\n"


def test_opt_without_prompt_scores_everything_after_bos(opt, monkeypatch):
    calls = _capture_loss_call(opt, monkeypatch)
    opt.loss(torch.zeros(1, 2, opt.hidden_size), torch.ones(1, 2, dtype=torch.long), ["two cats"])
    ids = opt.tokenizer("two cats\n").input_ids
    # Without a prompt LAVIS masks nothing but the queries (BOS is a label; HF shifts it away).
    assert calls[0]["labels"][0].tolist() == [IGNORE_INDEX] * 2 + ids


def test_opt_target_text_masks_the_input_part(opt, monkeypatch):
    calls = _capture_loss_call(opt, monkeypatch)
    opt.loss(torch.zeros(1, 2, opt.hidden_size), torch.ones(1, 2, dtype=torch.long),
             ["Question: what color is the circle? Short answer:"], [" red"])
    source = opt.tokenizer("Question: what color is the circle? Short answer:").input_ids
    labels = calls[0]["labels"][0].tolist()
    assert labels[: 2 + len(source)] == [IGNORE_INDEX] * (2 + len(source))
    assert opt.tokenizer.decode(labels[2 + len(source):]) == " red\n"
    # Without a space of its own, the target is joined to the input with one.
    opt.loss(torch.zeros(1, 2, opt.hidden_size), torch.ones(1, 2, dtype=torch.long),
             ["Question: what color is the circle? Short answer:"], ["red"])
    assert opt.tokenizer.decode(calls[1]["labels"][0].tolist()[2 + len(source):]) == " red\n"


def test_opt_loss_is_the_shifted_cross_entropy(opt, monkeypatch):
    calls = _capture_loss_call(opt, monkeypatch)
    prefix = torch.randn(2, 3, opt.hidden_size)
    loss = opt.loss(prefix, torch.ones(2, 3, dtype=torch.long), ["two cats", "a green triangle"])
    logits = opt.model(inputs_embeds=calls[0]["inputs_embeds"], attention_mask=calls[0]["attention_mask"]).logits
    labels = calls[0]["labels"]
    expected = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
    )
    assert torch.allclose(loss, expected, atol=1e-6)


def test_opt_loss_with_logits_only_at_targets_equals_transformers_full_loss(opt):
    """Parity of the optimisation: same loss and same gradient as OPTForCausalLM(labels=...)."""
    opt.prompt = "a photo of"  # masked prompt positions too
    captions = ["two cats", "a man riding a horse on the beach"]
    prefix = torch.randn(2, 3, opt.hidden_size, requires_grad=True)
    mask = torch.ones(2, 3, dtype=torch.long)
    calls = []
    compute = opt.causal_lm_loss
    opt.causal_lm_loss = lambda **kwargs: calls.append(kwargs) or compute(**kwargs)
    try:
        loss = opt.loss(prefix, mask, captions)
    finally:
        del opt.causal_lm_loss
        opt.prompt = ""
    (grad,) = torch.autograd.grad(loss, prefix)
    reference_prefix = prefix.detach().clone().requires_grad_(True)
    embeds = torch.cat([reference_prefix, calls[0]["inputs_embeds"][:, 3:].detach()], dim=1)
    reference = opt.model(inputs_embeds=embeds, attention_mask=calls[0]["attention_mask"],
                          labels=calls[0]["labels"]).loss
    (reference_grad,) = torch.autograd.grad(reference, reference_prefix)
    assert torch.allclose(loss, reference, atol=1e-6, rtol=1e-6)
    assert torch.allclose(grad, reference_grad, atol=1e-7, rtol=1e-5)


# -- OPT generation ------------------------------------------------------------------------------


def test_opt_generation_stops_at_newline_and_left_pads(opt, monkeypatch):
    assert opt.newline_token_id == opt.tokenizer("\n", add_special_tokens=False).input_ids[0]
    seen = {}
    generate = opt.model.generate

    def spy(**kwargs):
        seen.update(kwargs)
        return generate(**kwargs)

    monkeypatch.setattr(opt.model, "generate", spy)
    torch.manual_seed(0)
    prefix = torch.randn(2, 3, opt.hidden_size)
    mask = torch.ones(2, 3, dtype=torch.long)
    options = GenerationOptions(num_beams=1, max_new_tokens=5, min_new_tokens=1)
    batched = opt.generate(prefix, mask, ["Question: how many cats?", "a"], options)
    assert seen["eos_token_id"] == opt.newline_token_id
    assert seen["attention_mask"][1, :3].tolist() == [1, 1, 1]  # queries first, then left padding
    assert seen["attention_mask"][1, 3] == 0 and seen["attention_mask"][1, -1] == 1
    single = [opt.generate(prefix[i : i + 1], mask[i : i + 1], [p], options)[0]
              for i, p in enumerate(["Question: how many cats?", "a"])]
    assert batched == single
    assert all(text == text.strip() for text in batched)


def test_beam_search_and_sampling_run(opt):
    prefix, mask = torch.randn(2, 3, opt.hidden_size), torch.ones(2, 3, dtype=torch.long)
    beams = opt.generate(prefix, mask, ["", ""], GenerationOptions(num_beams=3, max_new_tokens=4,
                                                                  length_penalty=0.0, repetition_penalty=1.5))
    torch.manual_seed(0)
    sampled = opt.generate(prefix, mask, ["", ""], GenerationOptions(num_beams=1, do_sample=True, top_p=0.9,
                                                                    max_new_tokens=4, num_return_sequences=2))
    assert len(beams) == 2 and len(sampled) == 4


# -- T5 prefix-LM --------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [1, 2, 3, 7, 20])
def test_t5_split_point_is_between_one_and_the_middle(length):
    rng = random.Random(0)
    points = {prefix_lm_split(length, rng) for _ in range(400)}
    assert points == set(range(1, max(1, length // 2) + 1))


def test_t5_split_keeps_the_caption_and_ends_both_halves_with_eos(t5):
    t5.rng.seed(0)
    caption = "a man riding a horse on the beach at sunset"
    ids = t5.tokenizer(caption, add_special_tokens=False).input_ids
    for _ in range(10):
        encoder, decoder = t5.split_captions([caption])
        source = encoder["input_ids"][0].tolist()
        target = decoder["input_ids"][0].tolist()
        assert source[-1] == target[-1] == t5.tokenizer.eos_token_id
        assert source[:-1] + target[:-1] == ids
        assert 1 <= len(source) - 1 <= len(ids) // 2


def _capture_t5_loss_call(t5, monkeypatch):
    """T5's loss goes through seq2seq_lm_loss (the LM head only where there are labels)."""
    calls = []
    compute = t5.seq2seq_lm_loss

    def spy(**kwargs):
        calls.append(kwargs)
        return compute(**kwargs)

    monkeypatch.setattr(t5, "seq2seq_lm_loss", spy)
    return calls


def test_t5_loss_uses_the_split_or_the_target(t5, monkeypatch):
    calls = _capture_t5_loss_call(t5, monkeypatch)
    prefix, mask = torch.randn(2, 3, t5.hidden_size), torch.ones(2, 3, dtype=torch.long)
    t5.loss(prefix, mask, ["What color is the circle?", "a"], ["red", "two cats laying on a couch"])
    labels = calls[0]["labels"]
    assert labels[0].tolist()[: len(t5.tokenizer("red").input_ids)] == t5.tokenizer("red").input_ids
    assert (labels[0] == IGNORE_INDEX).any() and not (labels[1] == IGNORE_INDEX).any()
    assert calls[0]["inputs_embeds"].shape[1] == 3 + len(t5.tokenizer("What color is the circle?").input_ids)


@pytest.mark.parametrize("scale_decoder_outputs", [False, True], ids=["flan-t5-head", "tied-rescaled-head"])
def test_t5_loss_with_logits_only_at_targets_equals_transformers_full_loss(t5, monkeypatch, scale_decoder_outputs):
    """Parity of the optimisation: same loss and gradient as T5ForConditionalGeneration(labels=...),
    with padded targets (positions without a label) in the batch."""
    monkeypatch.setattr(t5.model.config, "scale_decoder_outputs", scale_decoder_outputs)
    calls = _capture_t5_loss_call(t5, monkeypatch)
    torch.manual_seed(1)
    prefix = torch.randn(2, 3, t5.hidden_size, requires_grad=True)
    mask = torch.ones(2, 3, dtype=torch.long)
    loss = t5.loss(prefix, mask, ["What color is the circle?", "a"], ["red", "two cats laying on a couch"])
    (grad,) = torch.autograd.grad(loss, prefix)
    (call,) = calls
    assert (call["labels"] == IGNORE_INDEX).any()  # padding the head skips
    reference_prefix = prefix.detach().clone().requires_grad_(True)
    embeds = torch.cat([reference_prefix, call["inputs_embeds"][:, 3:].detach()], dim=1)
    reference = t5.model(inputs_embeds=embeds, attention_mask=call["attention_mask"],
                         decoder_attention_mask=call["decoder_attention_mask"], labels=call["labels"]).loss
    (reference_grad,) = torch.autograd.grad(reference, reference_prefix)
    assert torch.allclose(loss, reference, atol=1e-6, rtol=1e-6)
    assert torch.allclose(grad, reference_grad, atol=1e-7, rtol=1e-5)


def test_t5_vqa_defaults_use_negative_length_penalty(t5, opt):
    assert t5.generation_defaults("vqa")["length_penalty"] == -1.0
    assert opt.generation_defaults("vqa")["length_penalty"] == 0.0
    assert t5.generation_defaults("caption") == {"num_beams": 5, "max_new_tokens": 30, "min_new_tokens": 1}


def test_t5_generates_strings(t5):
    texts = t5.generate(torch.randn(2, 3, t5.hidden_size), torch.ones(2, 3, dtype=torch.long),
                        ["Question: what color? Short answer:", ""], GenerationOptions(num_beams=2, max_new_tokens=4))
    assert len(texts) == 2 and all(isinstance(text, str) and text == text.strip() for text in texts)


# -- weights -------------------------------------------------------------------------------------


def test_flan_t5_checkpoint_keeps_its_own_lm_head_without_rescaling(tmp_path, t5_tokenizer_dir):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(vocab_size=512, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                      feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    reference = T5ForConditionalGeneration(config)
    reference.lm_head.weight = torch.nn.Parameter(torch.randn(512, 64))  # a distinct head
    reference.all_tied_weights_keys.pop("lm_head.weight")
    reference.save_pretrained(tmp_path)
    head = reference.lm_head.weight.detach().clone()

    loaded = _build("flant5_tiny", pretrained=str(tmp_path), tokenizer=t5_tokenizer_dir)
    model = loaded.model
    assert torch.equal(model.lm_head.weight, head)
    assert torch.equal(model.shared.weight, reference.shared.weight)
    assert model.lm_head.weight is not model.shared.weight and not model.config.scale_decoder_outputs

    input_ids = torch.tensor([[5, 6, 7, 1]])
    decoder_ids = torch.tensor([[0, 8, 9]])
    output = model(input_ids=input_ids, decoder_input_ids=decoder_ids, output_hidden_states=True)
    hidden = output.decoder_hidden_states[-1]
    assert torch.allclose(output.logits, hidden @ head.T, atol=1e-5)  # no d_model**-0.5 rescale

    # A random-init Flan-T5 also has a head of its own that survives our state conversion.
    fresh = _build("flant5_tiny")
    converted = fresh.convert_external_state(loaded.export_external_state("hf"), "hf")
    fresh.load_state_dict(converted.state)
    assert torch.equal(fresh.model.lm_head.weight, head)
    assert torch.equal(fresh.model.encoder.embed_tokens.weight, reference.shared.weight)


def test_opt_keys_round_trip_in_both_formats(opt):
    for source, prefix in (("hf", "language_model."), ("lavis", "opt_model.")):
        exported = opt.export_external_state(source)
        assert all(key.startswith(prefix) for key in exported)
        assert f"{prefix}lm_head.weight" not in exported  # tied: written once, under embed_tokens
        other = _build("opt_tiny")
        converted = other.convert_external_state({**exported, "unrelated.key": torch.zeros(1)}, source)
        assert "unrelated.key" not in converted.consumed and len(converted.consumed) == len(exported)
        other.load_state_dict(converted.state)
        for (name, a), (_, b) in zip(opt.state_dict().items(), other.state_dict().items()):
            assert torch.equal(a, b), name


def test_opt_loads_pretrained_directory(tmp_path, opt):
    opt.model.save_pretrained(tmp_path)
    loaded = _build("opt_tiny", pretrained=str(tmp_path))
    for (name, a), (_, b) in zip(opt.model.state_dict().items(), loaded.model.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(OSError, match="could not load"):
        _build("opt_tiny", pretrained=str(tmp_path / "missing"))


def test_hf_config_round_trips_through_transformers(t5, opt):
    from transformers import AutoConfig

    t5_config = AutoConfig.for_model(**t5.hf_config())
    assert t5_config.scale_decoder_outputs is False and t5_config.dense_act_fn == "gelu"
    assert AutoConfig.for_model(**opt.hf_config()).hidden_size == opt.hidden_size
