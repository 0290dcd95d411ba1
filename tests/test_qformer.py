"""The Q-Former bridge: parity with transformers, key conversion, BERT init, tokenizer, stage-2 view,
parameter counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from blip2kit.core.interfaces import RepresentationBridge
from blip2kit.core.model import count_parameters
from blip2kit.core.retrieval import image_embeddings, itc_similarity, itm_logits, text_embeddings
from blip2kit.plugins.bridges import QFORMER_CONFIG, QFORMER_TINY_CONFIG
from blip2kit.plugins.bridges.qformer import (
    DECODER_BOS_TOKEN,
    QFormer,
    QFormerConfig,
    build_qformer,
    load_tokenizer,
)

WORDS = ["a", "cat", "dog", "on", "the", "mat", "red", "ball", "sits", "runs"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def write_vocab(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(SPECIALS + WORDS) + "\n")
    return directory


def tiny_config(**changes) -> dict:
    config = {
        **QFORMER_TINY_CONFIG,
        "encoder_width": 48,
        "num_layers": 3,
        "vocab_size": len(SPECIALS) + len(WORDS) + 1,  # + [DEC]
        "max_text_length": 8,
    }
    config.update(changes)
    return config


def perturb_(module: torch.nn.Module, scale: float = 0.1) -> None:
    """Move every weight (LayerNorms included) off its init, so key mix-ups cannot hide."""
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn_like(parameter) * scale)


# -- parity with transformers --------------------------------------------------------------------


def test_query_outputs_match_hf_blip2_qformer_model():
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    torch.manual_seed(0)
    hf_config = Blip2QFormerConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
        vocab_size=16, max_position_embeddings=64, encoder_hidden_size=48, cross_attention_frequency=2,
    )
    hf = Blip2QFormerModel(hf_config).eval()
    perturb_(hf)
    query_tokens = torch.randn(1, 8, 32)
    state = {f"qformer.{k}": v for k, v in hf.state_dict().items()} | {"query_tokens": query_tokens}

    ours = build_qformer(tiny_config(num_layers=4, encoder_width=48)).eval()
    ours.drop_text_branch()  # Blip2QFormerModel without text input is the stage-2 view
    converted = ours.convert_external_state(state, "hf")
    assert converted.consumed == set(state)
    missing = ours.load_state_dict(converted.state, strict=False).missing_keys
    assert missing == ["ln_vision.weight", "ln_vision.bias"]  # HF keeps it in the vision model

    image_embeds = torch.randn(2, 5, 48)
    with torch.no_grad():
        expected = hf(query_embeds=query_tokens.expand(2, -1, -1), encoder_hidden_states=image_embeds)
        got = ours.encode_image(image_embeds).query_output
    diff = (got - expected.last_hidden_state).abs().max().item()
    assert diff <= 1e-5, diff


@pytest.fixture(scope="module")
def hf_retrieval_pair():
    from transformers import Blip2Config, Blip2ForImageTextRetrieval

    torch.manual_seed(1)
    config = Blip2Config(
        vision_config=dict(
            hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
            image_size=28, patch_size=14, layer_norm_eps=1e-6,
        ),
        qformer_config=dict(
            hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
            vocab_size=16, max_position_embeddings=64, use_qformer_text_input=True,
        ),
        num_query_tokens=8,
        image_text_hidden_size=16,
    )
    hf = Blip2ForImageTextRetrieval(config).eval()
    perturb_(hf)
    ours = build_qformer(tiny_config(vocab_size=16, ln_vision_eps=1e-6)).eval()
    hf_state = hf.state_dict()
    converted = ours.convert_external_state(hf_state, "hf")
    ours.load_state_dict(converted.state, strict=False)
    return hf, ours, converted


def test_hf_retrieval_keys_are_all_read(hf_retrieval_pair):
    hf, ours, converted = hf_retrieval_pair
    unread = set(hf.state_dict()) - converted.consumed
    # Only the vision tower's own weights remain (its post_layernorm is our ln_vision).
    assert unread and all(k.startswith("vision_model.") for k in unread)
    assert "vision_model.post_layernorm.weight" in converted.consumed
    # What HF cannot hold (temp, LM head) stays ours; everything else was loaded.
    not_loaded = set(ours.state_dict()) - set(converted.state)
    assert not_loaded == {"temp", "lm_head.dense.weight", "lm_head.dense.bias", "lm_head.norm.weight",
                          "lm_head.norm.bias", "lm_head.bias"}
    exported = ours.export_external_state("hf")
    for key, value in exported.items():
        assert torch.equal(value, hf.state_dict()[key]), key
    assert set(exported) == converted.consumed


def test_itm_and_itc_match_hf_blip2_for_image_text_retrieval(hf_retrieval_pair):
    hf, ours, _ = hf_retrieval_pair
    torch.manual_seed(2)
    pixels = torch.randn(3, 3, 28, 28)
    input_ids = torch.tensor([[2, 5, 6, 7, 3, 0], [2, 8, 9, 3, 0, 0], [2, 10, 11, 12, 13, 3]])
    attention_mask = (input_ids != 0).long()
    with torch.no_grad():
        # The encoder output before HF's post_layernorm, which our ln_vision then applies.
        features = hf.vision_model(pixels, output_hidden_states=True).hidden_states[-1]
        hf_itm = hf(pixels, input_ids, attention_mask, use_image_text_matching_head=True)
        hf_itc = hf(pixels, input_ids, attention_mask, use_image_text_matching_head=False)

    got_itm = itm_logits(ours, features, input_ids, attention_mask)
    assert got_itm.shape == (3, 2)
    assert (got_itm - hf_itm.logits_per_image).abs().max().item() <= 1e-5

    image_feats = image_embeddings(ours, features)
    text_feats = text_embeddings(ours, input_ids, attention_mask)
    got_itc = itc_similarity(image_feats, text_feats)
    assert got_itc.shape == (3, 3)
    assert (got_itc - hf_itc.logits_per_image).abs().max().item() <= 1e-5


# -- LAVIS keys ----------------------------------------------------------------------------------


def test_lavis_export_has_reference_names_and_round_trips():
    torch.manual_seed(3)
    source = build_qformer(tiny_config())
    exported = source.export_external_state("lavis")
    H, W, V = 32, 48, tiny_config()["vocab_size"]
    assert exported["query_tokens"].shape == (1, 8, H)
    assert exported["Qformer.bert.encoder.layer.0.crossattention.self.key.weight"].shape == (H, W)
    assert exported["Qformer.bert.encoder.layer.2.crossattention.output.LayerNorm.bias"].shape == (H,)
    assert not any(k.startswith("Qformer.bert.encoder.layer.1.crossattention") for k in exported)
    assert exported["Qformer.bert.embeddings.word_embeddings.weight"].shape == (V, H)
    assert "Qformer.bert.encoder.layer.1.output_query.LayerNorm.weight" in exported
    assert "Qformer.bert.encoder.layer.1.intermediate.dense.weight" in exported
    assert exported["Qformer.cls.predictions.decoder.weight"] is exported[
        "Qformer.bert.embeddings.word_embeddings.weight"
    ] or torch.equal(
        exported["Qformer.cls.predictions.decoder.weight"],
        exported["Qformer.bert.embeddings.word_embeddings.weight"],
    )
    for key in ("ln_vision.weight", "vision_proj.weight", "text_proj.bias", "itm_head.weight", "temp",
                "Qformer.cls.predictions.bias", "Qformer.cls.predictions.transform.dense.weight",
                "Qformer.cls.predictions.transform.LayerNorm.weight"):
        assert key in exported, key

    checkpoint = dict(exported) | {"Qformer.bert.embeddings.position_ids": torch.arange(64)[None],
                                   "opt_proj.weight": torch.zeros(4, H)}
    target = build_qformer(tiny_config())
    converted = target.convert_external_state(checkpoint, "lavis")
    assert set(checkpoint) - converted.consumed == {"opt_proj.weight"}
    target.load_state_dict(converted.state, strict=True)
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_stage1_lavis_checkpoint_loads_into_stage2_view():
    source = build_qformer(tiny_config())
    checkpoint = source.export_external_state("lavis")
    stage2 = build_qformer(tiny_config())
    stage2.drop_text_branch()
    converted = stage2.convert_external_state(checkpoint, "lavis")
    assert converted.consumed == set(checkpoint)  # the dropped text parts are known, not strays
    stage2.load_state_dict(converted.state, strict=True)
    assert not any("text_ffn" in k or "word_embeddings" in k for k in converted.state)
    assert set(stage2.export_external_state("lavis")) < set(checkpoint)


def test_wrong_shapes_are_reported_with_the_key():
    model = build_qformer(tiny_config())
    state = model.export_external_state("lavis")
    state["query_tokens"] = torch.zeros(1, 4, 32)
    with pytest.raises(ValueError, match="query_tokens"):
        model.convert_external_state(state, "lavis")


# -- stage-2 view --------------------------------------------------------------------------------


def test_drop_text_branch_keeps_forward_and_removes_text_parts():
    torch.manual_seed(4)
    model = build_qformer(tiny_config()).eval()
    features = torch.randn(2, 5, 48)
    before = model(features)
    model.drop_text_branch()
    after = model(features)
    assert after.shape == (2, 8, 32)
    assert torch.allclose(before, after)  # the queries never depended on the text branch
    names = [n for n, _ in model.named_parameters()]
    for gone in ("word_embeddings", "position_embeddings", "text_ffn", "lm_head", "vision_proj",
                 "text_proj", "itm_head", "temp"):
        assert not any(gone in n for n in names), gone
    with pytest.raises(RuntimeError, match="stage-2 view"):
        model.encode_text(torch.tensor([[2, 5, 3]]), torch.ones(1, 3, dtype=torch.long))
    assert model.hf_config()["qformer_config"]["use_qformer_text_input"] is False


# -- parameter counts ----------------------------------------------------------------------------


def test_full_size_counts_on_meta():
    with torch.device("meta"):
        model = build_qformer(QFORMER_CONFIG, device="meta")
    stage1 = count_parameters(model).trainable
    assert abs(stage1 - 186.7e6) / 186.7e6 < 0.01
    assert stage1 == 186_705_470
    # Reference breakdown: 6 cross-attention blocks with K/V from 1408.
    cross = sum(p.numel() for n, p in model.named_parameters() if "cross_attention" in n)
    assert abs(cross - 20.08e6) < 0.01e6
    model.drop_text_branch()
    assert count_parameters(model).trainable == 105_162_240 + 2 * 1408  # 105.16M + ln_vision


def test_cards_are_registered_with_measured_numbers():
    from blip2kit.registry import get_registry

    registry = get_registry()
    for name in ("qformer", "qformer_tiny"):
        card = registry.get("bridge", name)
        with torch.device("meta"):
            model = card.load_factory()(dict(card.config), device="meta")
        assert isinstance(model, RepresentationBridge)
        assert card.params == count_parameters(model).total
        assert card.width == model.hidden_size
        assert "encoder_width" in card.config


def test_vit_g_compositions_count_when_vision_cards_exist():
    from blip2kit.core.build import build_model
    from blip2kit.registry import get_registry

    if "vit_g" not in get_registry().names("vision"):
        pytest.skip("vit_g is not registered yet (plugins/vision lands separately)")
    stage1 = build_model("vit_g+qformer", device="meta")
    trainable = count_parameters(stage1).trainable
    assert abs(trainable - 186.7e6) / 186.7e6 < 0.01
    assert count_parameters(stage1.bridge).trainable == 186_705_470


# -- tokenizer and BERT initialisation -----------------------------------------------------------


def test_tokenizer_adds_dec_and_is_loaded_lazily(tmp_path):
    vocab_dir = write_vocab(tmp_path / "vocab")
    model = build_qformer(tiny_config(tokenizer=str(vocab_dir)))
    assert model._tokenizer is None  # nothing loaded at build time
    tokens = model.tokenize(["a cat sits on the mat", "the red ball runs a cat on the mat again"])
    assert model._tokenizer is not None
    assert tokens["input_ids"].shape == (2, 8)
    tokenizer = model.tokenizer
    assert len(tokenizer) == len(SPECIALS) + len(WORDS) + 1 == model.config.vocab_size
    assert tokenizer.bos_token == DECODER_BOS_TOKEN
    assert model.bos_token_id == len(SPECIALS) + len(WORDS)
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    assert tokens["input_ids"][0].tolist() == [cls, 5, 6, 13, 8, 9, 10, sep]
    assert tokens["attention_mask"][0].tolist() == [1] * 8
    assert tokens["input_ids"][1, -1].item() == sep  # truncated on the right, [SEP] kept
    short = model.tokenize(["a cat"])
    assert short["input_ids"][0].tolist() == [cls, 5, 6, sep, 0, 0, 0, 0]
    assert short["attention_mask"][0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    assert load_tokenizer(vocab_dir).convert_tokens_to_ids(DECODER_BOS_TOKEN) == model.bos_token_id


def _tiny_bert(tmp_path: Path, safetensors: bool = True):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(5)
    config = BertConfig(
        vocab_size=len(SPECIALS) + len(WORDS), hidden_size=32, num_hidden_layers=3,
        num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
    )
    bert = BertForMaskedLM(config)
    perturb_(bert)
    directory = tmp_path / "bert"
    if safetensors:
        bert.save_pretrained(directory)
    else:
        directory.mkdir()
        (directory / "config.json").write_text(json.dumps(config.to_dict()))
        torch.save(bert.state_dict(), directory / "pytorch_model.bin")
    return bert, directory


@pytest.mark.parametrize("safetensors", [True, False])
def test_bert_init_copies_bert_weights(tmp_path, safetensors):
    bert, directory = _tiny_bert(tmp_path, safetensors)
    torch.manual_seed(6)
    model = build_qformer(tiny_config(bert_init=str(directory)))
    b = bert.state_dict()
    V = bert.config.vocab_size
    words = model.embeddings.word_embeddings.weight
    assert words.shape[0] == V + 1
    assert torch.equal(words[:V], b["bert.embeddings.word_embeddings.weight"])
    assert not torch.equal(words[V], torch.zeros_like(words[V]))  # the [DEC] row is initialised
    assert torch.equal(model.embeddings.position_embeddings.weight, b["bert.embeddings.position_embeddings.weight"])
    assert torch.equal(model.embeddings.norm.weight, b["bert.embeddings.LayerNorm.weight"])
    for i, layer in enumerate(model.layers):
        prefix = f"bert.encoder.layer.{i}."
        assert torch.equal(layer.self_attention.key.weight, b[prefix + "attention.self.key.weight"])
        assert torch.equal(layer.self_attention.norm.bias, b[prefix + "attention.output.LayerNorm.bias"])
        assert torch.equal(layer.text_ffn.fc_in.weight, b[prefix + "intermediate.dense.weight"])
        assert torch.equal(layer.text_ffn.norm.weight, b[prefix + "output.LayerNorm.weight"])
        assert torch.equal(layer.query_ffn.fc_out.weight, b[prefix + "output.dense.weight"])
        assert torch.equal(layer.query_ffn.norm.bias, b[prefix + "output.LayerNorm.bias"])
    assert model.layers[0].cross_attention is not None and model.layers[1].cross_attention is None
    assert torch.equal(model.lm_head.dense.weight, b["cls.predictions.transform.dense.weight"])
    assert torch.equal(model.lm_head.norm.weight, b["cls.predictions.transform.LayerNorm.weight"])
    assert torch.equal(model.lm_head.bias[:V], b["cls.predictions.bias"])
    # The LM head predicts with the (grown) word table.
    assert model.caption_logits(
        model.encode_image(torch.randn(1, 5, 48)), torch.tensor([[2, 5]]), torch.ones(1, 2)
    ).shape == (1, 2, V + 1)


def test_bert_init_rejects_mismatched_shapes(tmp_path):
    _, directory = _tiny_bert(tmp_path)
    with pytest.raises(ValueError, match="num_hidden_layers"):
        build_qformer(tiny_config(num_layers=2, bert_init=str(directory)))
    with pytest.raises(FileNotFoundError, match="config.json"):
        build_qformer(tiny_config(bert_init=str(tmp_path / "nowhere")))


def test_config_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown key"):
        QFormerConfig.from_dict({"hidden": 3})
    assert isinstance(build_qformer(tiny_config()), QFormer)


def test_hf_config_and_export_build_a_loadable_hf_retrieval_model():
    from transformers import Blip2Config, Blip2ForImageTextRetrieval

    torch.manual_seed(7)
    ours = build_qformer(tiny_config(ln_vision_eps=1e-6))
    described = ours.hf_config()
    config = Blip2Config(
        vision_config=dict(hidden_size=48, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, image_size=28, patch_size=14),
        qformer_config=described["qformer_config"],
        num_query_tokens=described["num_query_tokens"],
        image_text_hidden_size=described["image_text_hidden_size"],
    )
    hf = Blip2ForImageTextRetrieval(config)
    result = hf.load_state_dict(ours.export_external_state("hf"), strict=False)
    assert result.unexpected_keys == []
    assert all(k.startswith("vision_model.") and "post_layernorm" not in k for k in result.missing_keys)


def test_a_missing_vocabulary_is_an_error_not_an_all_unk_tokenizer(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no BERT vocabulary found"):
        load_tokenizer(tmp_path / "empty")
