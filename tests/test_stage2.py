"""Stage 2: the projected queries as the LLM's soft prompt, what trains, starting from stage 1, and
generation through the composed model."""

from __future__ import annotations

import pytest
import torch

from blip2kit.core import build_model
from blip2kit.core.checkpoints import load_stage1_bridge
from blip2kit.plugins.language.testing import make_opt_tokenizer, make_t5_tokenizer

# BLIP2_REFERENCE.md section 6: Q-Former without text branch + queries + ln_vision + projection.
STAGE2_TRAINABLE = {
    "vit_g+qformer+opt_2.7b": 107.1e6,
    "vit_g+qformer+opt_6.7b": 108.3e6,
    "vit_l+qformer+opt_2.7b": 103.6e6,
    "vit_l+qformer+flant5_xl": 103.2e6,
    "vit_g+qformer+flant5_xl": 106.7e6,
    "vit_g+qformer+flant5_xxl": 108.3e6,
}


@pytest.mark.parametrize("name", sorted(STAGE2_TRAINABLE))
def test_stage2_trainable_counts_match_the_paper(name):
    model = build_model(name, device="meta")
    counts = model.parameter_summary()
    assert counts["total"].trainable == pytest.approx(STAGE2_TRAINABLE[name], rel=0.01)
    assert counts["vision"].trainable == 0 and counts["language"].trainable == 0
    assert model.projection.in_features == 768
    assert model.projection.out_features == model.language.hidden_size


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    return {"opt": str(tmp_path_factory.mktemp("opt_tok")), "t5": str(tmp_path_factory.mktemp("t5_tok"))}


def _tiny(language, tokenizers):
    make = make_opt_tokenizer if language.startswith("opt") else make_t5_tokenizer
    key = "opt" if language.startswith("opt") else "t5"
    make(tokenizers[key])
    torch.manual_seed(0)
    return build_model(f"vit_tiny+qformer_tiny+{language}", language={"tokenizer": tokenizers[key]})


@pytest.mark.parametrize("language", ["opt_tiny", "flant5_tiny"])
def test_only_bridge_and_projection_get_gradients(language, tokenizers):
    model = _tiny(language, tokenizers)
    model.train()
    # LAVIS (frozen_llm_dropout="as_released"): only the ViT stays in eval mode.
    assert not model.vision.training and model.language.training
    pixels = torch.randn(2, 3, model.vision.image_size, model.vision.image_size)
    output = model(pixels, ["a red circle on a blue square", "two cats laying on a couch"])
    output["loss"].backward()
    assert torch.isfinite(output["loss"])
    for name, parameter in model.named_parameters():
        trains = name.startswith(("bridge.", "projection."))
        assert parameter.requires_grad == trains, name
        if not trains:
            assert parameter.grad is None, name
    assert model.projection.weight.grad.abs().sum() > 0
    assert model.bridge.query_tokens.grad.abs().sum() > 0


@pytest.mark.parametrize("language", ["opt_tiny", "flant5_tiny"])
def test_generate_captions_and_answers(language, tokenizers):
    model = _tiny(language, tokenizers).eval()
    pixels = torch.randn(2, 3, model.vision.image_size, model.vision.image_size)
    captions = model.generate(pixels, num_beams=2, max_new_tokens=4)
    answers = model.answer(pixels, ["what color is the circle?", "how many cats?"], max_new_tokens=3)
    sampled = model.generate(pixels, ["a photo of", "a"], do_sample=True, top_p=0.9, num_beams=1,
                             max_new_tokens=3)
    for texts in (captions, answers, sampled):
        assert len(texts) == 2 and all(text == text.strip() for text in texts)
    with pytest.raises(ValueError, match="one per image"):
        model.generate(pixels, ["only one"])


def test_stage2_starts_from_a_stage1_checkpoint(tokenizers):
    torch.manual_seed(0)
    stage1 = build_model("vit_tiny+qformer_tiny")
    with torch.no_grad():
        for parameter in stage1.bridge.parameters():
            parameter.add_(torch.randn_like(parameter))
    stage2 = _tiny("opt_tiny", tokenizers)
    for source, state in (("lavis", stage1.bridge.export_external_state("lavis")),
                          ("blip2kit", stage1.state_dict())):
        report = load_stage1_bridge(stage2, state)
        assert torch.equal(stage2.bridge.query_tokens, stage1.bridge.query_tokens), source
        for name, value in stage2.bridge.state_dict().items():
            assert torch.equal(value, stage1.bridge.state_dict()[name]), (source, name)
        assert not report.missing, source
        dropped = " ".join(report.dropped)
        assert "word_embeddings" in dropped and "itm_head" in dropped, source
    lavis_report = load_stage1_bridge(stage2, stage1.bridge.export_external_state("lavis"))
    assert "Qformer.bert.encoder.layer.0.intermediate.dense.weight" in lavis_report.dropped
    assert "Qformer.bert.encoder.layer.0.intermediate_query.dense.weight" not in lavis_report.dropped
