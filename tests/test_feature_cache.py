"""The frozen-feature cache: cached and uncached losses agree within fp16 rounding; wrong caches are refused."""

from __future__ import annotations

import json

import pytest
import torch

from blip2kit.core.build import build_model
from blip2kit.core.data import build_train_loader
from blip2kit.core.data.feature_cache import FeatureCache, FeatureCacheError, FeatureCacheMismatch, write_feature_cache
from blip2kit.plugins.language.testing import make_opt_tokenizer
from data_fixtures import write_jsonl, write_shards

# The captions of data_fixtures, normalised, as a BERT WordPiece vocabulary for the Q-Former.
BERT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "thing", "number", "again", ","]
BERT_VOCAB += [str(i) for i in range(10)]


@pytest.fixture(scope="module")
def stage1_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bert_vocab")
    (folder / "vocab.txt").write_text("\n".join(BERT_VOCAB) + "\n")
    torch.manual_seed(0)
    return build_model("vit_tiny+qformer_tiny", bridge={"tokenizer": str(folder), "vocab_size": len(BERT_VOCAB) + 1,
                                                        "num_layers": 1}).eval()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache_data")
    jsonl = write_jsonl(root, 6)
    (root / "images" / "img005.png").write_bytes(b"broken")  # one bad image
    return {"format": "jsonl", "path": str(jsonl)}


def _pairs(model, source, cache, batches=2):
    """Batches of the same seed: uncached under the eval transform, and from the cache."""
    transform = model.vision.transform(train=False)
    plain = build_train_loader([source], transform=transform, batch_size=2, seed=4)
    cached = build_train_loader([source], transform=None, batch_size=2, seed=4, feature_cache=cache)
    return [(next(plain), next(cached)) for _ in range(batches)]


def test_cache_holds_the_encoders_fp16_features(stage1_model, data, tmp_path):
    out = write_feature_cache(stage1_model, [data], tmp_path / "cache", batch_size=4, shard_size=3, progress=False)
    cache = FeatureCache(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(cache) == 5 and len(manifest["shards"]) == 2  # 5 readable images in shards of 3
    assert manifest["encoder"]["name"] == "vit_tiny" and manifest["encoder"]["image_size"] == 112
    assert [k for k in manifest["bad"] if k.endswith("img005.png")]
    cache.check(stage1_model)  # the same model passes
    for plain, cached in _pairs(stage1_model, data, out):
        assert plain["image_ids"] == cached["image_ids"] and plain["text_input"] == cached["text_input"]
        with torch.no_grad():
            reference = stage1_model.vision(plain["pixels"])  # [B, N, W] fp32
        assert cached["image_features"].dtype == torch.float16
        assert torch.equal(cached["image_features"], reference.half())  # exactly the fp16 rounding
        rounding = (cached["image_features"].float() - reference).abs().max()
        print(f"fp16 feature rounding: max |difference| {float(rounding):.3g} on |features| <= {float(reference.abs().max()):.3g}")


def _stage1_losses(model, batch):
    generator = torch.Generator().manual_seed(0)
    inputs = {"pixels": batch["pixels"]} if "pixels" in batch else {"image_features": batch["image_features"]}
    with torch.no_grad():
        return model(text_input=batch["text_input"], generator=generator, **inputs)


@pytest.mark.slow
def test_stage1_losses_cached_vs_uncached(stage1_model, data, tmp_path):
    out = write_feature_cache(stage1_model, [data], tmp_path / "cache", batch_size=2, progress=False)
    worst = 0.0
    for plain, cached in _pairs(stage1_model, data, out, batches=1):
        uncached_losses = _stage1_losses(stage1_model, plain)
        cached_losses = _stage1_losses(stage1_model, cached)
        for name in ("loss", "loss_itc", "loss_itm", "loss_itg"):
            difference = abs(float(uncached_losses[name]) - float(cached_losses[name]))
            worst = max(worst, difference)
            assert difference < 1e-3, (name, difference)
        # The whole difference is the fp16 rounding of the features: rounding them by hand gives
        # exactly the cached losses.
        with torch.no_grad():
            rounded = stage1_model.vision(plain["pixels"]).half()
        by_hand = _stage1_losses(stage1_model, {"image_features": rounded, "text_input": plain["text_input"]})
        assert float(by_hand["loss"]) == float(cached_losses["loss"])
    print(f"stage-1 max |loss difference| cached vs uncached: {worst:.3g}")


@pytest.mark.slow
def test_stage2_losses_cached_vs_uncached(data, tmp_path):
    make_opt_tokenizer(tmp_path / "opt")
    torch.manual_seed(0)
    model = build_model("vit_tiny+qformer_tiny+opt_tiny", language={"tokenizer": str(tmp_path / "opt")}).eval()
    out = write_feature_cache(model, [data], tmp_path / "cache", batch_size=3, progress=False)
    FeatureCache(out).check(model)
    worst = 0.0
    for plain, cached in _pairs(model, data, out):
        with torch.no_grad():
            uncached_loss = float(model(plain["pixels"], plain["text_input"])["loss"])
            cached_loss = float(model(text_input=cached["text_input"], image_features=cached["image_features"])["loss"])
        worst = max(worst, abs(uncached_loss - cached_loss))
        assert abs(uncached_loss - cached_loss) < 1e-3
    print(f"stage-2 max |loss difference| cached vs uncached: {worst:.3g}")


def test_cache_refuses_another_encoder_weights_or_resolution(stage1_model, data, tmp_path):
    out = write_feature_cache(stage1_model, [data], tmp_path / "cache", batch_size=8, progress=False)
    cache = FeatureCache(out)
    bridge = {"tokenizer": "unused", "num_layers": 1}
    torch.manual_seed(1)
    other_weights = build_model("vit_tiny+qformer_tiny", bridge=bridge)
    with pytest.raises(FeatureCacheMismatch, match=r"encoder weights \(SHA-256\)"):
        cache.check(other_weights)
    other_resolution = build_model("vit_tiny+qformer_tiny", bridge=bridge, vision={"image_size": 56})
    with pytest.raises(FeatureCacheMismatch, match=r"resolution \(image_size\) 112.*has 56"):
        cache.check(other_resolution)
    other_encoder = build_model("vit_l_tiny+qformer_tiny", bridge=bridge)
    with pytest.raises(FeatureCacheMismatch, match=r"encoder 'vit_tiny'.*has 'vit_l_tiny'"):
        cache.check(other_encoder)
    with pytest.raises(FeatureCacheError, match="not a feature cache"):
        FeatureCache(tmp_path)


def test_forward_takes_exactly_one_image_input(stage1_model):
    pixels = torch.randn(2, 3, 112, 112)
    features = torch.randn(2, stage1_model.vision.num_tokens, stage1_model.vision.width)
    with pytest.raises(ValueError, match="exactly one of pixels .* got both"):
        stage1_model(pixels, ["a", "b"], image_features=features)
    with pytest.raises(ValueError, match="got neither"):
        stage1_model(text_input=["a", "b"])
    with pytest.raises(ValueError, match=r"image_features must be \[B, 65, 64\]"):
        stage1_model(text_input=["a", "b"], image_features=features[:, :10])


def test_webdataset_cache_and_bad_samples(stage1_model, tmp_path):
    source = {"format": "webdataset", "path": write_shards(tmp_path / "shards", 6, per_shard=3)}
    out = write_feature_cache(stage1_model, [source], tmp_path / "cache", batch_size=4, progress=False)
    loader = build_train_loader([source], transform=None, batch_size=3, seed=0, feature_cache=out)
    batch = next(loader)
    assert batch["image_features"].shape == (3, 65, 64)
    assert loader.bad_samples.count == 0
