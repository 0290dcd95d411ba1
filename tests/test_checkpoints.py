"""Reading and writing real BLIP-2 checkpoint formats against transformers itself.

Tiny random ``Blip2ForConditionalGeneration`` models (OPT and T5 variants) are saved with
``save_pretrained``; blip2kit's ``from_pretrained`` must give the same LLM logits (fp32, max abs diff
<= 1e-4) and the same greedy and beam tokens, and blip2kit's HF export must load back into
transformers with the same logits.

Compared path: the configs set ``image_token_index`` (this transformers always expands it), so the
HF side gets input_ids = [<image>] * num_queries + tokenizer(text) and scatters the projected queries
into those positions; blip2kit prepends the queries to tokenizer(text) embeddings. The two
sequences are then identical position by position.
"""

from __future__ import annotations

import json

import pytest
import torch

from blip2kit.core import build_model, from_pretrained, load_weights
from blip2kit.core.checkpoints import (
    CheckpointError,
    composition_of_lavis_state,
    read_state,
)
from blip2kit.plugins.language.testing import make_opt_tokenizer, make_t5_tokenizer
from random_weights import fill_random

QUERIES = 8
IMAGE_TOKEN = 511
VOCAB = 512


def _vision_config():
    return dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                image_size=28, patch_size=14, layer_norm_eps=1e-6)


def _qformer_config():
    return dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                vocab_size=60, max_position_embeddings=64)


def _opt_text_config():
    return dict(model_type="opt", vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2,
                num_attention_heads=4, ffn_dim=96, max_position_embeddings=128, word_embed_proj_dim=48,
                pad_token_id=1, bos_token_id=2, eos_token_id=2)


def _t5_text_config():
    return dict(model_type="t5", vocab_size=VOCAB, d_model=48, d_kv=12, d_ff=96, num_layers=2,
                num_heads=4, feed_forward_proj="gated-gelu", dense_act_fn="gelu",
                tie_word_embeddings=False, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)


def _hf_model(text_config, tmp_path, tokenizer_maker):
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    torch.manual_seed(0)
    config = Blip2Config(vision_config=_vision_config(), qformer_config=_qformer_config(),
                         text_config=text_config, num_query_tokens=QUERIES, image_token_index=IMAGE_TOKEN)
    model = Blip2ForConditionalGeneration(config)
    language = model.language_model
    if text_config["model_type"] == "t5":  # Flan-T5: a head of its own
        language.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, text_config["d_model"]))
        language.all_tied_weights_keys.pop("lm_head.weight", None)
    fill_random(model)
    model.eval()
    directory = tmp_path / "hf"
    model.save_pretrained(directory)
    tokenizer = tokenizer_maker(directory)
    return model, tokenizer, directory


@pytest.fixture(scope="module")
def opt_pair(tmp_path_factory):
    hf, tokenizer, directory = _hf_model(_opt_text_config(), tmp_path_factory.mktemp("opt"), make_opt_tokenizer)
    ours = from_pretrained(directory)
    ours.eval()
    return hf, ours, tokenizer, directory


@pytest.fixture(scope="module")
def t5_pair(tmp_path_factory):
    hf, tokenizer, directory = _hf_model(_t5_text_config(), tmp_path_factory.mktemp("t5"), make_t5_tokenizer)
    ours = from_pretrained(directory)
    ours.eval()
    return hf, ours, tokenizer, directory


def _pixels(batch=2):
    torch.manual_seed(1)
    return torch.randn(batch, 3, 28, 28)


def _hf_inputs(tokenizer, texts):
    rows = [[IMAGE_TOKEN] * QUERIES + tokenizer(text).input_ids for text in texts]
    width = max(map(len, rows))
    assert all(len(row) == width for row in rows), "parity texts must tokenize to one length"
    return torch.tensor(rows), torch.ones(len(rows), width, dtype=torch.long)


def _our_inputs(ours, tokenizer, texts):
    prefix, prefix_mask = ours.soft_prompt(_pixels(len(texts)))
    ids = torch.tensor([tokenizer(text).input_ids for text in texts])
    embeds = torch.cat([prefix, ours.language.embed_tokens(ids)], dim=1)
    mask = torch.cat([prefix_mask, torch.ones_like(ids)], dim=1)
    return embeds, mask


TEXTS = ["a photo of a red circle", "a photo of two cats"]


def _same_length_texts(tokenizer):
    lengths = {len(tokenizer(text).input_ids) for text in TEXTS}
    return TEXTS if len(lengths) == 1 else TEXTS[:1]


# -- import: HF -> blip2kit -----------------------------------------------------------------------


def test_opt_composition_and_config_come_from_config_json(opt_pair):
    _, ours, tokenizer, directory = opt_pair
    assert ours.name == "vit_g+qformer+opt_tiny"
    assert ours.vision.width == 64 and ours.bridge.num_queries == QUERIES
    assert ours.language.hidden_size == 48 and ours.language.vocab_size == VOCAB
    assert len(ours.language.tokenizer) == len(tokenizer)  # loaded from the checkpoint directory
    assert not any(p.requires_grad for p in ours.language.parameters())
    assert all(p.requires_grad for p in ours.projection.parameters())


def test_opt_logits_match_transformers(opt_pair):
    hf, ours, tokenizer, _ = opt_pair
    texts = _same_length_texts(tokenizer)
    input_ids, mask = _hf_inputs(tokenizer, texts)
    with torch.no_grad():
        expected = hf(pixel_values=_pixels(len(texts)), input_ids=input_ids, attention_mask=mask).logits
        embeds, our_mask = _our_inputs(ours, tokenizer, texts)
        got = ours.language.model(inputs_embeds=embeds, attention_mask=our_mask).logits
    assert got.shape == expected.shape
    print("opt import max abs diff", (got - expected).abs().max().item())
    assert (got - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("num_beams", [1, 3])
def test_opt_generation_matches_transformers(opt_pair, num_beams):
    hf, ours, tokenizer, _ = opt_pair
    newline = tokenizer("\n", add_special_tokens=False).input_ids[0]
    prompt_ids, mask = _hf_inputs(tokenizer, ["a photo of"] * 2)
    with torch.no_grad():
        hf_ids = hf.generate(pixel_values=_pixels(), input_ids=prompt_ids, attention_mask=mask,
                             num_beams=num_beams, max_new_tokens=6, min_new_tokens=1, eos_token_id=newline,
                             pad_token_id=tokenizer.pad_token_id, do_sample=False)
    expected = [text.strip() for text in tokenizer.batch_decode(hf_ids[:, prompt_ids.shape[1]:],
                                                                skip_special_tokens=True)]
    got = ours.generate(_pixels(), "a photo of", num_beams=num_beams, max_new_tokens=6, min_new_tokens=1,
                        length_penalty=1.0)
    print("opt", num_beams, got)
    assert got == expected


def test_t5_logits_match_transformers_and_keep_the_head(t5_pair):
    hf, ours, tokenizer, _ = t5_pair
    head = ours.language.model.lm_head.weight
    assert head is not ours.language.model.shared.weight
    assert torch.equal(head, hf.language_model.lm_head.weight)
    assert not ours.language.model.config.scale_decoder_outputs
    texts = _same_length_texts(tokenizer)
    input_ids, mask = _hf_inputs(tokenizer, texts)
    decoder_ids = torch.tensor([[0, 5, 6, 7]] * len(texts))
    with torch.no_grad():
        expected = hf(pixel_values=_pixels(len(texts)), input_ids=input_ids, attention_mask=mask,
                      decoder_input_ids=decoder_ids).logits
        embeds, our_mask = _our_inputs(ours, tokenizer, texts)
        got = ours.language.model(inputs_embeds=embeds, attention_mask=our_mask, decoder_input_ids=decoder_ids).logits
    print("t5 import max abs diff", (got - expected).abs().max().item(), expected.abs().max().item())
    assert (got - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("num_beams", [1, 3])
def test_t5_generation_matches_transformers(t5_pair, num_beams):
    hf, ours, tokenizer, _ = t5_pair
    prompt_ids, mask = _hf_inputs(tokenizer, ["Question: what color? Short answer:"] * 2)
    with torch.no_grad():
        hf_ids = hf.generate(pixel_values=_pixels(), input_ids=prompt_ids, attention_mask=mask,
                             num_beams=num_beams, max_new_tokens=5, min_new_tokens=1, length_penalty=-1.0)
    expected = [text.strip() for text in tokenizer.batch_decode(hf_ids, skip_special_tokens=True)]
    got = ours.answer(_pixels(), "what color?", num_beams=num_beams, max_new_tokens=5)
    assert got == expected


# -- export: blip2kit -> HF -----------------------------------------------------------------------


@pytest.mark.parametrize("language", ["opt_tiny", "flant5_tiny"])
def test_export_loads_in_transformers_with_the_same_logits(tmp_path, language):
    from transformers import Blip2ForConditionalGeneration

    torch.manual_seed(0)
    model = build_model(f"vit_tiny+qformer_tiny+{language}", bridge={"ln_vision_eps": 1e-6})
    fill_random(model)
    model.eval()
    maker = make_opt_tokenizer if language.startswith("opt") else make_t5_tokenizer
    model.language.tokenizer = maker(tmp_path / "tokenizer")
    model.save_pretrained(tmp_path / "export")

    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["architectures"] == ["Blip2ForConditionalGeneration"]
    hf = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "export").eval()
    tokenizer = model.language.tokenizer
    image_token = config["image_token_index"]
    queries = model.bridge.num_queries
    size = model.vision.image_size
    torch.manual_seed(2)
    pixels = torch.randn(1, 3, size, size)
    ids = tokenizer("a photo of two cats").input_ids
    with torch.no_grad():
        prefix, prefix_mask = model.soft_prompt(pixels)
        embeds = torch.cat([prefix, model.language.embed_tokens(torch.tensor([ids]))], dim=1)
        kwargs = {"decoder_input_ids": torch.tensor([[0, 4, 5]])} if model.language.is_encoder_decoder else {}
        ours = model.language.model(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2]), **kwargs).logits
        theirs = hf(pixel_values=pixels, input_ids=torch.tensor([[image_token] * queries + ids]), **kwargs).logits
    print(language, "export max abs diff", (ours - theirs).abs().max().item(), ours.abs().max().item())
    assert (ours - theirs).abs().max().item() <= 1e-4
    if model.language.is_encoder_decoder:
        assert torch.equal(hf.language_model.lm_head.weight, model.language.model.lm_head.weight)


def test_round_trip_through_our_own_export(tmp_path, opt_pair):
    _, ours, _, _ = opt_pair
    ours.save_pretrained(tmp_path / "again")
    again = from_pretrained(tmp_path / "again")
    for (name, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


# -- errors and LAVIS -----------------------------------------------------------------------------


def test_missing_and_mismatched_keys_are_named(tmp_path, opt_pair):
    from safetensors.torch import save_file

    _, _, _, directory = opt_pair
    state = read_state(directory)
    model = from_pretrained(directory)
    broken = {k: v for k, v in state.items() if k != "language_projection.bias"}
    broken["surprise.weight"] = torch.zeros(1)
    save_file(broken, str(tmp_path / "broken.safetensors"))
    with pytest.raises(CheckpointError, match=r"projection\.bias.*surprise\.weight"):
        load_weights(model, tmp_path / "broken.safetensors")
    state["language_projection.weight"] = torch.zeros(3, 3)
    save_file(state, str(tmp_path / "mismatch.safetensors"))
    with pytest.raises(CheckpointError, match=r"projection\.weight: checkpoint \(3, 3\)"):
        load_weights(model, tmp_path / "mismatch.safetensors")


def test_lavis_checkpoint_holds_trainable_keys_only(tmp_path, opt_pair):
    _, ours, _, _ = opt_pair
    ours.save_pretrained(tmp_path, format="lavis")
    state = read_state(tmp_path / "checkpoint.pth")
    assert "opt_proj.weight" in state and "query_tokens" in state and "ln_vision.weight" in state
    assert not any(key.startswith(("visual_encoder.", "opt_model.")) for key in state)
    model = build_model("vit_g+qformer+opt_tiny", device="meta",
                        vision={"width": 64, "depth": 2, "num_heads": 4, "mlp_dim": 128, "image_size": 28},
                        bridge={"hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_size": 64,
                            "num_queries": QUERIES, "vocab_size": 60, "max_position_embeddings": 64},
                        language={"extra_config": ours.language.hf_config()})
    with pytest.warns(UserWarning, match="frozen vision and language"):
        report = load_weights(model, tmp_path / "checkpoint.pth")
    assert torch.equal(model.projection.weight, ours.projection.weight)
    assert torch.equal(model.bridge.query_tokens, ours.bridge.query_tokens)
    assert any(key.startswith("language.") for key in report.missing) and not report.unexpected


def test_lavis_composition_is_read_from_shapes():
    state = {"ln_vision.weight": torch.zeros(1408), "opt_proj.weight": torch.zeros(2560, 768)}
    assert composition_of_lavis_state(state) == "vit_g+qformer+opt_2.7b"
    state = {"ln_vision.weight": torch.zeros(1024), "t5_proj.weight": torch.zeros(2048, 768)}
    assert composition_of_lavis_state(state) == "vit_l+qformer+flant5_xl"


class NotATensor:
    """Any non-tensor object: torch.load(weights_only=True) must refuse to build it."""


def test_arbitrary_pickles_are_refused(tmp_path):
    torch.save({"model": {"x": NotATensor()}}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="weights_only"):
        read_state(tmp_path / "evil.pth")


@pytest.mark.parametrize("name, composition, image_size", [
    ("blip2-opt-2.7b", "vit_g+qformer+opt_2.7b", 224),
    ("blip2-opt-6.7b-coco", "vit_g+qformer+opt_6.7b", 364),
    ("blip2-flan-t5-xl", "vit_g+qformer+flant5_xl", 224),
    ("blip2-flan-t5-xxl", "vit_g+qformer+flant5_xxl", 224),
    ("blip2-itm-vit-g-coco", "vit_g+qformer", 364),
])
def test_named_checkpoints_compose_on_meta(name, composition, image_size):
    from blip2kit.registry import get_registry

    card = get_registry().get("model", name)
    assert card.composition == composition and card.weights == f"Salesforce/{name}"
    assert card.lavis_weights.endswith(".pth")
    model = build_model(name, device="meta")
    assert model.vision.image_size == image_size
    assert (model.language is None) == (name.startswith("blip2-itm"))


def test_retrieval_checkpoint_round_trips_as_a_stage1_model(tmp_path):
    from transformers import Blip2Config, Blip2ForImageTextRetrieval

    torch.manual_seed(0)
    qformer = {**_qformer_config(), "use_qformer_text_input": True}
    config = Blip2Config(vision_config=_vision_config(), qformer_config=qformer, num_query_tokens=QUERIES,
                         image_text_hidden_size=16)
    hf = Blip2ForImageTextRetrieval(config)
    fill_random(hf)
    hf.save_pretrained(tmp_path / "itm")
    ours = from_pretrained(tmp_path / "itm")  # HF keeps no Q-Former LM head or temp: those stay init
    assert ours.name == "vit_g+qformer" and ours.stage == 1
    assert torch.equal(ours.bridge.query_tokens, hf.query_tokens)
    ours.save_pretrained(tmp_path / "export")
    again, info = Blip2ForImageTextRetrieval.from_pretrained(tmp_path / "export", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    for name, value in hf.state_dict().items():
        other = again.state_dict()[name]
        if name.endswith("qkv.bias"):  # the k bias is dropped (softmax cancels it); q and v kept
            third = value.shape[0] // 3
            value, other = torch.cat([value[:third], value[2 * third:]]), torch.cat([other[:third], other[2 * third:]])
        assert torch.equal(value, other), name


def test_corrupt_checkpoint_files_are_named_in_the_error(tmp_path):
    from blip2kit.core.checkpoints import CheckpointError, read_state

    for name in ("model.safetensors", "weights.pth"):
        (tmp_path / name).write_bytes(b"\x00not a checkpoint" * 64)
        with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
            read_state(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_state(tmp_path / "missing.pth")


def test_from_pretrained_casts_frozen_towers_only(t5_pair):
    _, _, _, directory = t5_pair
    model = from_pretrained(directory, dtype="bf16")
    assert next(model.vision.parameters()).dtype == torch.bfloat16
    assert model.bridge.query_tokens.dtype == torch.float32
    dtypes = {name: p.dtype for name, p in model.language.named_parameters()}
    assert all(dtype == torch.float32 for name, dtype in dtypes.items() if name.endswith(".wo.weight"))
    assert any(dtype == torch.bfloat16 for dtype in dtypes.values())
