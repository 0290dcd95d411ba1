"""Strict means strict: partial towers, extra layers, differing tied copies and non-finite weights are
errors that name the tensors; the one partial case (whole frozen towers left out of a LAVIS file) is
reported."""

from __future__ import annotations

import pytest
import torch

from blip2kit.core import build_model
from blip2kit.core.checkpoints import CheckpointError, export_state, load_state

TINY = "vit_tiny+qformer_tiny+opt_tiny"


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model(TINY)


def test_lavis_file_with_part_of_a_frozen_tower_is_refused(tiny):
    state = export_state(tiny, "lavis")  # the whole model under LAVIS names
    llm_keys = sorted(key for key in state if key.startswith("opt_model."))
    for key in llm_keys[: len(llm_keys) // 2]:
        del state[key]
    with pytest.raises(CheckpointError, match="only part of the language tower"):
        load_state(build_model(TINY), state, "lavis")


def test_lavis_file_without_frozen_towers_is_reported(tiny):
    state = {k: v for k, v in export_state(tiny, "lavis").items()
             if not k.startswith(("opt_model.", "visual_encoder."))}
    with pytest.warns(UserWarning, match="vision: random initialisation"):
        report = load_state(build_model(TINY), state, "lavis")
    assert "language: random initialisation (no pretrained setting)" in report.notes


@pytest.mark.parametrize("fmt, extra_block", [("hf", 2), ("lavis", 3)])
def test_more_vision_layers_than_configured_is_an_error(tiny, fmt, extra_block):
    state = export_state(tiny, fmt)
    block = "vision_model.encoder.layers.{}." if fmt == "hf" else "visual_encoder.blocks.{}."
    for key in [k for k in state if k.startswith(block.format(1))]:
        state[block.format(extra_block) + key[len(block.format(1)):]] = state[key]
        if fmt == "lavis":  # one block past the depth is the EVA block BLIP-2 drops: allowed
            state[block.format(2) + key[len(block.format(1)):]] = state[key]
    with pytest.raises(CheckpointError, match=f"at least {extra_block + 1} vision blocks.*depth 2"):
        load_state(build_model(TINY), state, fmt)


def test_lavis_final_eva_block_is_the_one_allowed_extra(tiny):
    state = export_state(tiny, "lavis")
    for key in [k for k in state if k.startswith("visual_encoder.blocks.1.")]:
        state["visual_encoder.blocks.2." + key[len("visual_encoder.blocks.1."):]] = state[key]
    report = load_state(build_model(TINY), state, "lavis")
    assert not report.unexpected


def test_differing_tied_copies_are_refused():
    stage1 = build_model("vit_tiny+qformer_tiny")
    state = export_state(stage1, "lavis")
    assert torch.equal(state["Qformer.cls.predictions.decoder.weight"],
                       state["Qformer.bert.embeddings.word_embeddings.weight"])
    load_state(build_model("vit_tiny+qformer_tiny"), state, "lavis")  # equal copies load
    state["Qformer.cls.predictions.decoder.weight"] = state["Qformer.cls.predictions.decoder.weight"] + 1
    with pytest.raises(CheckpointError, match=r"tied tensors Qformer\.cls\.predictions\.decoder\.weight"):
        load_state(build_model("vit_tiny+qformer_tiny"), state, "lavis")


def test_differing_tied_llm_copies_are_refused(tiny):
    state = export_state(tiny, "hf")
    embeddings = state["language_model.model.decoder.embed_tokens.weight"]
    state["language_model.lm_head.weight"] = embeddings.clone()
    load_state(build_model(TINY), state, "hf")  # an equal copy of a tied tensor is fine
    state["language_model.lm_head.weight"] = embeddings + 1
    with pytest.raises(CheckpointError, match=r"tied tensors language_model\.lm_head\.weight"):
        load_state(build_model(TINY), state, "hf")


def test_non_finite_weights_are_named_unless_allowed(tiny):
    state = export_state(tiny, "hf")
    state["qformer.layernorm.weight"] = state["qformer.layernorm.weight"].clone()
    state["qformer.layernorm.weight"][0] = float("inf")
    state["language_projection.bias"] = torch.full_like(state["language_projection.bias"], float("nan"))
    with pytest.raises(CheckpointError, match=r"NaN or Inf values in bridge\.embeddings\.norm\.weight, "
                                               r"projection\.bias.*check_finite=False"):
        load_state(build_model(TINY), state, "hf")
    model = build_model(TINY)
    load_state(model, state, "hf", check_finite=False)
    assert torch.isnan(model.projection.bias).all()
