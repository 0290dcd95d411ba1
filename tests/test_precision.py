"""The precision policy (blip2kit.core.precision) and frozen_llm_dropout, on tiny models.

fp32 is checked against the model composed by hand (the pieces called in order, no policy); the
half policies against the fp32 model built from the same weights.
"""

from __future__ import annotations

import pytest
import torch

from blip2kit.core import build_model
from blip2kit.core.objectives import representation_losses
from blip2kit.core.precision import resolve_precision
from blip2kit.plugins.language.testing import make_opt_tokenizer, make_t5_tokenizer

CAPTIONS = ["a red circle on a blue square", "two cats laying on a couch"]
BERT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "circle", "on", "blue",
              "square", "two", "cats", "laying", "couch"]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    opt, t5 = tmp_path_factory.mktemp("opt_tok"), tmp_path_factory.mktemp("t5_tok")
    make_opt_tokenizer(opt)
    make_t5_tokenizer(t5)
    bert = tmp_path_factory.mktemp("bert_tok")
    (bert / "vocab.txt").write_text("\n".join(BERT_VOCAB) + "\n")
    return {"opt_tiny": str(opt), "flant5_tiny": str(t5), "bert": str(bert)}


def _stage1(tokenizers, **options):
    torch.manual_seed(0)
    bridge = {"tokenizer": tokenizers["bert"], "vocab_size": len(BERT_VOCAB) + 1}
    return build_model("vit_tiny+qformer_tiny", bridge=bridge, **options)


def _stage2(language, tokenizers, **options):
    torch.manual_seed(0)
    return build_model(f"vit_tiny+qformer_tiny+{language}", language={"tokenizer": tokenizers[language]},
                       **options)


def _pixels(model, batch=2):
    generator = torch.Generator().manual_seed(1)
    size = model.vision.image_size
    return torch.randn(batch, 3, size, size, generator=generator)


@pytest.mark.parametrize("language", ["opt_tiny", "flant5_tiny"])
def test_fp32_policy_is_the_model_composed_by_hand(language, tokenizers):
    model = _stage2(language, tokenizers, precision="fp32").eval()
    assert model.precision == "fp32"
    pixels = _pixels(model)
    model.language.rng.seed(3) if hasattr(model.language, "rng") else None
    loss = model(pixels, CAPTIONS)["loss"]
    with torch.no_grad():
        image_embeds = model.vision(pixels)  # (B, N, W), no policy in between
        prefix = model.projection(model.bridge(image_embeds))
    model.language.rng.seed(3) if hasattr(model.language, "rng") else None
    by_hand = model.language.loss(prefix, torch.ones(prefix.shape[:2], dtype=torch.long), CAPTIONS)
    assert torch.equal(loss, by_hand)


def test_fp32_stage1_policy_is_the_objectives_by_hand(tokenizers):
    model = _stage1(tokenizers, precision="fp32").eval()
    pixels = _pixels(model)
    losses = model(pixels, CAPTIONS, generator=torch.Generator().manual_seed(5))
    tokens = model.bridge.tokenize(CAPTIONS)
    with torch.no_grad():
        features = model.vision(pixels)
    by_hand = representation_losses(model.bridge, features, tokens["input_ids"], tokens["attention_mask"],
                                    generator=torch.Generator().manual_seed(5))
    for key in ("loss", "loss_itc", "loss_itm", "loss_itg"):
        assert torch.equal(losses[key], by_hand[key]), key


@pytest.mark.parametrize("language", ["opt_tiny", "flant5_tiny"])
def test_bf16_policy_keeps_fp32_master_weights_and_grads(language, tokenizers):
    reference = _stage2(language, tokenizers).eval()
    model = _stage2(language, tokenizers, precision="bf16").eval()
    assert model.precision == "bf16"
    assert {p.dtype for p in model.vision.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.bridge.parameters()} == {torch.float32}
    assert {p.dtype for p in model.projection.parameters()} == {torch.float32}
    language_dtypes = {name: p.dtype for name, p in model.language.named_parameters()}
    if language == "flant5_tiny":
        assert all(d == torch.float32 for n, d in language_dtypes.items() if n.endswith(".wo.weight"))
        assert all(d == torch.bfloat16 for n, d in language_dtypes.items() if not n.endswith(".wo.weight"))
    else:
        assert set(language_dtypes.values()) == {torch.bfloat16}

    # The bridge's and projection's matmuls run in bf16 (autocast) although their weights are fp32.
    seen = set()
    for module in [*model.bridge.modules(), model.projection]:
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(lambda module, args, output: seen.add(output.dtype))
    pixels = _pixels(model)
    if hasattr(model.language, "rng"):
        model.language.rng.seed(3)
        reference.language.rng.seed(3)
    loss = model(pixels, CAPTIONS)["loss"]
    loss.backward()
    assert seen == {torch.bfloat16}
    assert loss.dtype == torch.float32
    for name, parameter in model.named_parameters():
        if name.startswith(("bridge.", "projection.")):
            assert parameter.grad is not None and parameter.grad.dtype == torch.float32, name
        else:
            assert parameter.grad is None, name
    # Same weights in fp32: the loss differs by bf16 rounding only.
    fp32_loss = reference(pixels, CAPTIONS)["loss"]
    assert loss.item() == pytest.approx(fp32_loss.item(), rel=2e-2)


def test_bf16_stage1_losses_follow_fp32(tokenizers):
    reference = _stage1(tokenizers).eval()
    model = _stage1(tokenizers, precision="bf16").eval()
    pixels = _pixels(model, batch=4)
    captions = CAPTIONS * 2
    half = model(pixels, captions, generator=torch.Generator().manual_seed(5))
    full = reference(pixels, captions, generator=torch.Generator().manual_seed(5))
    half["loss"].backward()
    assert all(p.grad.dtype == torch.float32 for p in model.bridge.parameters() if p.grad is not None)
    for key in ("loss_itc", "loss_itg"):  # ITM's negatives are sampled from the similarities
        assert half[key].item() == pytest.approx(full[key].item(), rel=2e-2), key


def test_set_precision_after_building_and_legacy_dtype(tokenizers):
    model = _stage2("opt_tiny", tokenizers, dtype="bf16")
    assert model.precision == "frozen-bf16"
    assert model.policy.compute_dtype is None  # the bridge computes in fp32, as before
    model.set_precision("fp16")
    assert model.precision == "fp16"
    assert next(model.language.parameters()).dtype == torch.float16
    assert model.bridge.query_tokens.dtype == torch.float32
    with torch.no_grad():
        prefix, _ = model.soft_prompt(_pixels(model))
    assert prefix.dtype == torch.float16


def test_precision_errors_name_the_fix():
    with pytest.raises(ValueError, match="unknown precision 'fp8'.*'half'"):
        resolve_precision("fp8")
    with pytest.raises(ValueError, match="pass only precision"):
        resolve_precision("bf16", dtype="bf16")
    assert resolve_precision("half", device="cpu").name == "bf16"
    assert resolve_precision(None).name == "fp32"
    with pytest.raises(ValueError, match="frozen_llm_dropout 'on'"):
        build_model("vit_tiny+qformer_tiny", frozen_llm_dropout="on", device="meta")


@pytest.mark.parametrize("language", ["opt_tiny", "flant5_tiny"])
def test_frozen_llm_dropout(language, tokenizers):
    prefix = torch.randn(2, 4, 64)
    mask = torch.ones(2, 4, dtype=torch.long)

    def two_losses(model):
        losses = []
        for seed in (1, 2):
            torch.manual_seed(seed)
            if hasattr(model.language, "rng"):
                model.language.rng.seed(3)
            losses.append(model.language.loss(prefix, mask, CAPTIONS))
        return losses

    released = _stage2(language, tokenizers).train()
    assert released.frozen_llm_dropout == "as_released"
    assert released.language.training and released.language.model.training
    assert not released.vision.training
    first, second = two_losses(released)
    assert not torch.equal(first, second), "the frozen LLM's dropout should act in training"
    assert not any(p.requires_grad for p in released.language.parameters())
    released.eval()
    assert not released.language.training

    off = _stage2(language, tokenizers, frozen_llm_dropout="off").train()
    assert not any(module.training for module in off.language.modules())
    first, second = two_losses(off)
    assert torch.equal(first, second)
