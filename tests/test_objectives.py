"""Stage-1 objectives (ITC, ITM with hard negatives, ITG) and the attention masks behind them."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blip2kit.core.interfaces import ImageKeyValues, QueryState, RepresentationBridge, VisionEncoder
from blip2kit.core.model import Blip2, count_parameters
from blip2kit.core.objectives import (
    caption_loss,
    representation_losses,
    sample_hard_negatives,
    soft_itc_loss,
    stage1_losses,
)
from blip2kit.plugins.bridges import QFORMER_TINY_CONFIG
from blip2kit.plugins.bridges.qformer import build_qformer

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "cat", "dog", "on", "the", "mat", "red"]


class PatchEncoder(VisionEncoder):
    """Test double: 4x4 patches -> linear -> [B, 1 + patches, width]."""

    def __init__(self, width: int = 24) -> None:
        super().__init__()
        self.width, self.image_size, self.patch_size = width, 8, 4
        self.mean = self.std = (0.5, 0.5, 0.5)
        self.proj = nn.Conv2d(3, width, 4, 4)
        self.cls = nn.Parameter(torch.randn(1, 1, width))

    def forward(self, pixels: Tensor) -> Tensor:
        patches = self.proj(pixels).flatten(2).transpose(1, 2)  # (B, 4, width)
        return torch.cat([self.cls.expand(pixels.shape[0], -1, -1), patches], dim=1)


def bridge_config(**changes) -> dict:
    config = {**QFORMER_TINY_CONFIG, "encoder_width": 24, "vocab_size": len(VOCAB) + 1,
              "max_text_length": 6, "num_layers": 2}
    config.update(changes)
    return config


@pytest.fixture()
def model(tmp_path: Path) -> Blip2:
    torch.manual_seed(0)
    (tmp_path / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    bridge = build_qformer(bridge_config(tokenizer=str(tmp_path)))
    return Blip2(PatchEncoder(), bridge, name="double+qformer_tiny")


# -- hand-checked pieces -------------------------------------------------------------------------


def test_caption_loss_shifts_ignores_padding_and_smooths():
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [1.0, 1.0, 1.0]]])
    labels = torch.tensor([[1, 2, 0, -100]])  # position 0 ([DEC]) is never a target
    # Targets: logits[0]->2, logits[1]->0, logits[2]->-100 (ignored)
    def smoothed(row: Tensor, target: int) -> float:
        logp = F.log_softmax(row, dim=0)
        return float(-(0.9 * logp[target] + 0.1 * logp.mean()))
    expected = (smoothed(logits[0, 0], 2) + smoothed(logits[0, 1], 0)) / 2
    assert caption_loss(logits, labels).item() == pytest.approx(expected, rel=1e-6)


def test_soft_itc_targets_match_the_reference_formula():
    sim = torch.tensor([[1.0, 0.5, -1.0], [0.2, 0.1, 0.0]])
    positives = torch.tensor([[True, True, False], [False, True, False]])
    # Row 0 targets: 0.9 * [.5, .5, 0] + 0.1/3; row 1: 0.9 * [0, 1, 0] + 0.1/3
    targets = torch.tensor([[0.45, 0.45, 0.0], [0.0, 0.9, 0.0]]) + 0.1 / 3
    expected = -(F.log_softmax(sim, dim=1) * targets).sum(1).mean()
    assert soft_itc_loss(sim, positives).item() == pytest.approx(expected.item(), rel=1e-6)


def test_hard_negatives_never_pick_positives_and_follow_similarity():
    generator = torch.Generator().manual_seed(0)
    sim = torch.randn(4, 4) * 3
    positives = torch.eye(4, dtype=torch.bool)
    positives[0, 1] = True  # a second caption of image 0 (same image_id)
    for _ in range(200):
        images, texts = sample_hard_negatives(sim, sim.t().contiguous(), positives, generator)
        assert not positives[torch.arange(4), images].any()
        assert not positives[torch.arange(4), texts].any()
    # A dominant negative is the one drawn.
    peaked = torch.zeros(3, 3)
    peaked[:, 2] = 50.0
    peaked[2, 0] = 50.0
    images, _ = sample_hard_negatives(peaked, peaked, torch.eye(3, dtype=torch.bool), generator)
    assert images.tolist() == [2, 2, 0]


# -- masks of the four passes --------------------------------------------------------------------


def test_pass_masks(model):
    bridge = model.bridge.eval()
    torch.manual_seed(1)
    image = bridge.prepare_image(torch.randn(1, 5, 24))
    other_image = bridge.prepare_image(torch.randn(1, 5, 24))
    ids = torch.tensor([[2, 5, 6, 8, 3, 0]])
    changed_last = torch.tensor([[2, 5, 6, 8, 7, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    with torch.no_grad():
        # (b) text alone: padding keys are not seen (changing a padded token id changes nothing).
        text = bridge.encode_text(ids, mask)
        text_padded = bridge.encode_text(torch.tensor([[2, 5, 6, 8, 3, 9]]), mask)
        assert torch.allclose(text[:, :5], text_padded[:, :5], atol=1e-6)
        # (d) ITG: causal text; earlier positions ignore later tokens; the image reaches text.
        state = bridge.encode_image(image)
        logits = bridge.caption_logits(state, ids, mask)
        logits_changed = bridge.caption_logits(state, changed_last, mask)
        assert torch.allclose(logits[:, :4], logits_changed[:, :4], atol=1e-6)
        assert not torch.allclose(logits[:, 4], logits_changed[:, 4])
        logits_other = bridge.caption_logits(bridge.encode_image(other_image), ids, mask)
        assert not torch.allclose(logits[:, 0], logits_other[:, 0])
        # (c) ITM: bidirectional, so the queries read the last text token.
        itm = bridge.match_logits(image, None, ids, mask)
        itm_changed = bridge.match_logits(image, None, changed_last, mask)
        assert not torch.allclose(itm, itm_changed)
        assert logits.shape == (1, 6, bridge.config.vocab_size)


# -- the whole stage-1 loss ----------------------------------------------------------------------


def test_stage1_losses_recompute_from_public_pieces(model):
    model.eval()  # no dropout, so the pieces can be recomputed exactly
    torch.manual_seed(2)
    pixels = torch.randn(3, 3, 8, 8)
    captions = ["a cat on the mat", "a red dog", "the dog on a mat"]
    calls = []
    original = model.bridge.match_logits

    def recording(image_embeds, image_mask, input_ids, attention_mask):
        calls.append((image_embeds, input_ids))
        return original(image_embeds, image_mask, input_ids, attention_mask)

    model.bridge.match_logits = recording
    # The pairs as LAVIS builds them (image embeds per pair); the K/V reuse is checked against
    # this path in test_itm_key_value_reuse_*.
    losses = stage1_losses(model, pixels, captions, generator=torch.Generator().manual_seed(0),
                           reuse_image_key_values=False)
    assert set(losses) == {"loss", "loss_itc", "loss_itm", "loss_itg"}
    assert losses["loss"].item() == pytest.approx(
        (losses["loss_itc"] + losses["loss_itm"] + losses["loss_itg"]).item(), rel=1e-6
    )

    bridge = model.bridge
    tokens = bridge.tokenize(captions)
    with torch.no_grad():
        embeds = bridge.prepare_image(model.encode_image(pixels))
        image_feats = bridge.image_features(bridge.encode_image(embeds).query_output)
        text_feat = bridge.text_features(bridge.encode_text(tokens["input_ids"], tokens["attention_mask"]))
        sim = torch.einsum("iqd,td->itq", image_feats, text_feat).max(-1).values / bridge.temp
        targets = torch.arange(3)
        itc = (F.cross_entropy(sim, targets, label_smoothing=0.1)
               + F.cross_entropy(sim.t(), targets, label_smoothing=0.1)) / 2
    assert losses["loss_itc"].item() == pytest.approx(itc.item(), rel=1e-5)

    # ITM saw 3B pairs: (text+, image+), (text+, image-), (text-, image+).
    (itm_images, itm_ids), = calls
    assert itm_images.shape[0] == itm_ids.shape[0] == 9
    assert torch.equal(itm_ids[:3], tokens["input_ids"]) and torch.equal(itm_ids[3:6], tokens["input_ids"])
    assert torch.equal(itm_images[:3], embeds) and torch.equal(itm_images[6:], embeds)
    for b in range(3):  # negatives are never the positive partner
        assert not torch.equal(itm_images[3 + b], embeds[b])
        assert not torch.equal(itm_ids[6 + b], tokens["input_ids"][b])

    # ITG: [DEC] replaces [CLS], pad -> -100, label smoothing 0.1.
    decoder_ids = tokens["input_ids"].clone()
    decoder_ids[:, 0] = bridge.bos_token_id
    with torch.no_grad():
        logits = bridge.caption_logits(bridge.encode_image(embeds), decoder_ids, tokens["attention_mask"])
    labels = decoder_ids.masked_fill(decoder_ids == 0, -100)
    expected_itg = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   label_smoothing=0.1)
    assert losses["loss_itg"].item() == pytest.approx(expected_itg.item(), rel=1e-5)


def test_image_ids_make_same_image_captions_positives(model):
    model.eval()
    torch.manual_seed(3)
    pixels = torch.randn(4, 3, 8, 8)
    pixels[1] = pixels[0]
    captions = ["a cat", "the cat on a mat", "a red dog", "the mat"]
    image_ids = torch.tensor([7, 7, 8, 9])
    calls = []
    original = model.bridge.match_logits
    model.bridge.match_logits = lambda e, m, i, a: calls.append((e, i)) or original(e, m, i, a)
    for seed in range(10):
        calls.clear()
        losses = stage1_losses(model, pixels, captions, image_ids=image_ids,
                               generator=torch.Generator().manual_seed(seed), reuse_image_key_values=False)
        (images, ids), = calls
        tokens = model.bridge.tokenize(captions)
        # Negative images for texts 0 and 1 are never image 0 or 1 (same image_id 7).
        embeds = images[:4]
        for b in (0, 1):
            assert not torch.equal(images[4 + b], embeds[0]) and not torch.equal(images[4 + b], embeds[1])
            negative_text = ids[8 + b]
            assert not torch.equal(negative_text, tokens["input_ids"][0])
            assert not torch.equal(negative_text, tokens["input_ids"][1])
    assert math.isfinite(losses["loss"].item())


def test_gradients_reach_only_trainable_parameters(model):
    model.train()
    torch.manual_seed(4)
    losses = stage1_losses(model, torch.randn(2, 3, 8, 8), ["a cat on the mat", "a red dog"])
    losses["loss"].backward()
    assert all(p.grad is None for p in model.vision.parameters())
    for name, parameter in model.bridge.named_parameters():
        assert parameter.requires_grad
        assert parameter.grad is not None, name
    assert model.bridge.temp.grad.abs().item() > 0
    assert model.bridge.ln_vision.weight.grad.abs().sum().item() > 0
    assert model.bridge.layers[0].cross_attention.key.weight.grad.abs().sum().item() > 0
    assert count_parameters(model).trainable == count_parameters(model.bridge).total


@pytest.mark.parametrize("start, clamped", [(0.9, 0.5), (1e-5, 0.001), (0.07, 0.07)])
def test_itc_temperature_is_clamped_as_lavis_does(model, start, clamped):
    with torch.no_grad():
        model.bridge.temp.fill_(start)
    stage1_losses(model, torch.randn(2, 3, 8, 8), ["a cat on the mat", "a red dog"])
    assert model.bridge.temp.item() == pytest.approx(clamped)


def test_single_pair_is_rejected_with_a_reason(model):
    with pytest.raises(ValueError, match="at least 2"):
        stage1_losses(model, torch.randn(1, 3, 8, 8), ["a cat"])


def test_registry_composition_vit_tiny_qformer_tiny(tmp_path):
    from blip2kit.core.build import build_model
    from blip2kit.registry import get_registry

    if "vit_tiny" not in get_registry().names("vision"):
        pytest.skip("vit_tiny is not registered yet")
    torch.manual_seed(5)
    (tmp_path / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    model = build_model("vit_tiny+qformer_tiny", bridge={"tokenizer": str(tmp_path), "vocab_size": len(VOCAB) + 1,
                                                        "num_layers": 1})
    assert model.bridge.input_width == model.vision.width
    size = model.vision.image_size
    losses = model(torch.randn(2, 3, size, size), ["a cat", "a red dog"])
    losses["loss"].backward()
    assert all(p.grad is None for p in model.vision.parameters())


def test_meta_counts_vit_g_qformer():
    from blip2kit.core.build import build_model
    from blip2kit.registry import get_registry

    if "vit_g" not in get_registry().names("vision"):
        pytest.skip("vit_g is not registered yet")
    stage1 = build_model("vit_g+qformer", device="meta")
    trainable = count_parameters(stage1).trainable
    assert abs(trainable - 186.7e6) / 186.7e6 < 0.01, trainable
    stage2_bridge = build_model("vit_g+qformer", device="meta").bridge
    stage2_bridge.drop_text_branch()
    assert count_parameters(stage2_bridge).trainable == 105_162_240 + 2 * 1408


# -- ITM reusing the query pass's image K/V ------------------------------------------------------


class DelegatingBridge(RepresentationBridge):
    """A third-party-like bridge: only the abstract interface, so no image K/V to reuse (its
    QueryState leaves image_key_values None) and stage 1 must score ITM through match_logits."""

    def __init__(self, inner) -> None:
        super().__init__()
        self.inner = inner
        self.input_width, self.hidden_size, self.num_queries = inner.input_width, inner.hidden_size, inner.num_queries

    temp = property(lambda self: self.inner.temp)
    tokenizer = property(lambda self: self.inner.tokenizer)
    pad_token_id = property(lambda self: self.inner.pad_token_id)

    def forward(self, image_embeds, image_mask=None):
        return self.inner(image_embeds, image_mask)

    def tokenize(self, texts, max_length=None):
        return self.inner.tokenize(texts, max_length)

    def prepare_image(self, image_features):
        return self.inner.prepare_image(image_features)

    def encode_image(self, image_embeds, image_mask=None):
        state = self.inner.encode_image(image_embeds, image_mask)
        return QueryState(query_output=state.query_output, past_key_values=state.past_key_values)

    def encode_text(self, input_ids, attention_mask):
        return self.inner.encode_text(input_ids, attention_mask)

    def image_features(self, query_output):
        return self.inner.image_features(query_output)

    def text_features(self, text_output):
        return self.inner.text_features(text_output)

    def match_logits(self, image_embeds, image_mask, input_ids, attention_mask):
        return self.inner.match_logits(image_embeds, image_mask, input_ids, attention_mask)

    def caption_logits(self, query_state, input_ids, attention_mask):
        return self.inner.caption_logits(query_state, input_ids, attention_mask)


def _losses_and_gradients(bridge, features, ids, image_ids=None, generator_seed=5, **options):
    """Stage-1 losses, then every parameter's gradient and the features' gradient (seeded: the
    same dropout masks and the same hard negatives on every call)."""
    torch.manual_seed(11)
    features = features.clone().requires_grad_(True)
    bridge.zero_grad(set_to_none=True)
    losses = representation_losses(bridge, features, ids, (ids != 0).long(), image_ids,
                                   generator=torch.Generator().manual_seed(generator_seed), **options)
    losses["loss"].backward()
    gradients = {name: parameter.grad.clone() for name, parameter in bridge.named_parameters()
                 if parameter.grad is not None}
    return {k: v.detach() for k, v in losses.items()}, gradients, features.grad


def _assert_same(reference, other):
    losses, gradients, feature_grad = reference
    other_losses, other_gradients, other_feature_grad = other
    for key in losses:
        assert torch.allclose(other_losses[key], losses[key], rtol=1e-6, atol=1e-7), key
    assert set(other_gradients) == set(gradients)
    for name, gradient in gradients.items():
        assert torch.allclose(other_gradients[name], gradient, rtol=1e-5, atol=1e-8), name
    assert torch.allclose(other_feature_grad, feature_grad, rtol=1e-5, atol=1e-8)


def _tiny_bridge(train: bool):
    torch.manual_seed(0)
    bridge = build_qformer(bridge_config(num_layers=4)).train(train)  # cross-attention in layers 0, 2
    bridge.tokenizer = type("T", (), {"bos_token_id": 12, "pad_token_id": 0})()
    return bridge


ITM_IDS = torch.tensor([[2, 5, 6, 3, 0], [2, 7, 3, 0, 0], [2, 9, 10, 8, 3], [2, 11, 3, 0, 0]])


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train-dropout"])
@pytest.mark.parametrize("image_ids", [None, torch.tensor([1, 1, 2, 3])], ids=["pairs", "image_ids"])
def test_itm_key_value_reuse_gives_the_losses_and_gradients_of_recomputing(train, image_ids):
    """fp32 parity of the optimisation: reusing the query pass's K/V for the 3B ITM pairs gives
    the losses and gradients (every parameter, and the image features) of projecting each pair's
    image again, as LAVIS does, on the same hard negatives."""
    bridge = _tiny_bridge(train)
    features = torch.randn(4, 5, 24)
    reused = _losses_and_gradients(bridge, features, ITM_IDS, image_ids)
    recomputed = _losses_and_gradients(bridge, features, ITM_IDS, image_ids, reuse_image_key_values=False)
    _assert_same(recomputed, reused)
    assert reused[1]["layers.2.cross_attention.key.weight"].abs().sum() > 0


def test_itm_key_value_reuse_projects_each_image_once_per_step():
    """With reuse the cross-attention K/V projection runs once per step (the query pass) on the
    B images; without, a second time on the 3B ITM pairs."""
    bridge = _tiny_bridge(False)
    rows = []
    bridge.layers[0].cross_attention.key.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    _losses_and_gradients(bridge, torch.randn(4, 5, 24), ITM_IDS)
    assert rows == [4]
    rows.clear()
    _losses_and_gradients(bridge, torch.randn(4, 5, 24), ITM_IDS, reuse_image_key_values=False)
    assert rows == [4, 12]


def test_bridge_without_key_values_trains_through_match_logits_with_the_same_result():
    """A bridge that implements only the abstract interface keeps working (match_logits on every
    pair) and gives exactly what the Q-Former's K/V reuse gives on the same weights."""
    qformer = _tiny_bridge(True)
    delegating = DelegatingBridge(copy.deepcopy(qformer))
    calls = []
    match = delegating.match_logits
    delegating.match_logits = lambda *args: calls.append(args[2].shape[0]) or match(*args)
    features = torch.randn(4, 5, 24)
    third_party = _losses_and_gradients(delegating, features, ITM_IDS)
    assert calls == [12]  # 3B pairs through match_logits
    renamed = {name.removeprefix("inner."): grad for name, grad in third_party[1].items()}
    _assert_same((third_party[0], renamed, third_party[2]), _losses_and_gradients(qformer, features, ITM_IDS))


def test_image_key_values_select_and_cat_keep_rows_and_gradients():
    keys = torch.arange(6.0).view(3, 2).requires_grad_(True)
    cache = ImageKeyValues((None, (keys, keys * 10)))
    joined = ImageKeyValues.cat([cache, cache.select(torch.tensor([2]))])
    picked = joined.select(torch.tensor([3, 0, 0]))
    assert picked.layers[0] is None and picked.batch_size == 3
    assert picked.layers[1][0].tolist() == [[4.0, 5.0], [0.0, 1.0], [0.0, 1.0]]
    assert picked.layers[1][1].tolist() == [[40.0, 50.0], [0.0, 10.0], [0.0, 10.0]]
    picked.layers[1][0].sum().backward()
    assert keys.grad.tolist() == [[2.0, 2.0], [0.0, 0.0], [1.0, 1.0]]


# -- across ranks --------------------------------------------------------------------------------


def _distributed_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    bridge = build_qformer(bridge_config()).eval()
    features = torch.randn(4, 5, 24)[rank * 2: rank * 2 + 2]
    ids = torch.tensor([[2, 5, 6, 3], [2, 7, 3, 0], [2, 9, 10, 3], [2, 11, 3, 0]])[rank * 2: rank * 2 + 2]
    bridge.tokenizer = type("T", (), {"bos_token_id": 12, "pad_token_id": 0})()
    losses = representation_losses(bridge, features, ids, (ids != 0).long())
    losses["loss"].backward()
    # K/V reuse across ranks: own images read the query pass's K/V, negatives gathered from the
    # other rank are projected here; both paths on the same negatives (seeded per rank).
    foreign = []
    project = bridge.image_key_values
    bridge.image_key_values = lambda embeds: foreign.append(embeds.shape[0]) or project(embeds)
    paths = {}
    for reuse in (True, False):
        torch.manual_seed(7)
        paths[reuse] = _losses_and_gradients(bridge, features, ids, reuse_image_key_values=reuse,
                                             generator_seed=rank)
    torch.save({"losses": {k: v.detach() for k, v in losses.items()},
                "grad": bridge.query_tokens.grad, "paths": paths, "foreign": foreign},
               f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_agree_with_one_process_on_itc_and_itg(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    torch.manual_seed(0)
    bridge = build_qformer(bridge_config()).eval()
    features = torch.randn(4, 5, 24)
    ids = torch.tensor([[2, 5, 6, 3], [2, 7, 3, 0], [2, 9, 10, 3], [2, 11, 3, 0]])
    bridge.tokenizer = type("T", (), {"bos_token_id": 12, "pad_token_id": 0})()
    single = representation_losses(bridge, features, ids, (ids != 0).long())
    # Each rank's ITC rows are the same rows of the full similarity, and both ranks hold the same
    # number of ITG targets, so the mean over ranks equals the one-process loss.
    for key in ("loss_itc", "loss_itg"):
        mean = sum(r["losses"][key] for r in results) / 2
        assert mean.item() == pytest.approx(single[key].item(), rel=1e-5), key
    assert all(torch.isfinite(r["losses"]["loss_itm"]) for r in results)
    assert all(r["grad"] is not None and r["grad"].abs().sum() > 0 for r in results)

    # On every rank, K/V reuse (with the fallback for the other rank's images) gives the losses
    # and gradients of projecting every pair's image; the features' gradient includes what the
    # other rank's loss sends back through gather_with_grad.
    for result in results:
        _assert_same(result["paths"][False], result["paths"][True])
    assert sum(len(r["foreign"]) for r in results) > 0, "no negative came from the other rank"
