"""Vision encoders: parity with HF Blip2VisionModel and open_clip, sizes, resolution change, freezing,
checkpoint conversion (LAVIS / raw eva_vit_g.pth / HF) and its errors, preprocessing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from blip2kit.core.build import build_component
from blip2kit.core.model import count_parameters
from blip2kit.plugins.vision import VISION_CARDS
from blip2kit.plugins.vision.common import VisionWeightsError, build_transform
from blip2kit.plugins.vision.eva_vit import EvaVisionEncoder
from blip2kit.registry import load_registry

CARDS = {card.name: card for card in VISION_CARDS}
TINY_EVA = {"image_size": 56, "width": 64, "depth": 2, "num_heads": 4, "mlp_dim": 256}
TINY_CLIP_CFG = {"image_size": 56, "layers": 3, "width": 64, "head_width": 16, "patch_size": 14}


def tiny_eva(**overrides) -> EvaVisionEncoder:
    return build_component(CARDS["vit_tiny"], {**TINY_EVA, **overrides})


def randomize(module: nn.Module, scale: float = 0.1) -> None:
    """Non-trivial values everywhere (default inits leave biases zero and LayerNorms at 1/0)."""
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn_like(parameter) * scale)


# -- registry and sizes ------------------------------------------------------------------------


def test_cards_are_registered_through_the_entry_point() -> None:
    registry = load_registry()
    for name in ("vit_g", "vit_l", "vit_tiny", "vit_l_tiny"):
        card = registry.get("vision", name)
        assert card.preprocessing is not None and card.preprocessing.interpolation == "bicubic"


@pytest.mark.parametrize(
    ("name", "expected_params", "width"), [("vit_g", 0.986e9, 1408), ("vit_l", 0.291e9, 1024)]
)
def test_full_size_on_meta(name: str, expected_params: float, width: int) -> None:
    encoder = build_component(CARDS[name], device="meta")
    total = count_parameters(encoder).total
    assert abs(total - expected_params) / expected_params < 0.01
    assert total == CARDS[name].params
    assert encoder.width == CARDS[name].width == width
    assert encoder.num_tokens == 257 and encoder.depth == (39 if name == "vit_g" else 23)
    big = build_component(CARDS[name], {"image_size": 364}, device="meta")
    assert big.num_tokens == 677


def test_vit_g_hf_config_is_blip2_default() -> None:
    from transformers import Blip2VisionConfig

    encoder = build_component(CARDS["vit_g"], device="meta")
    ours = encoder.hf_config()
    default = Blip2VisionConfig()
    assert {key: getattr(default, key) for key in ours} == ours


def test_vit_g_architecture_matches_eva_clip_g() -> None:
    vit = build_component(CARDS["vit_g"], device="meta").vit
    block = vit.blocks[0]
    assert block.attn.num_heads == 16 and block.attn.head_dim == 88
    assert block.mlp.fc1.out_features == 6144 and isinstance(block.mlp.act, nn.GELU)
    assert block.attn.qkv.bias is None and block.attn.q_bias is not None and block.gamma_1 is None
    assert block.norm1.eps == 1e-6 and isinstance(vit.norm, nn.Identity)
    assert tuple(vit.pos_embed.shape) == (1, 257, 1408) and vit.rope is None


# -- parity ------------------------------------------------------------------------------------


def test_eva_matches_hf_blip2_vision_model() -> None:
    from transformers import Blip2VisionConfig, Blip2VisionModel

    config = Blip2VisionConfig(
        hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        image_size=56, patch_size=14, layer_norm_eps=1e-6, qkv_bias=True,
    )
    hf = Blip2VisionModel(config).eval()
    randomize(hf)  # includes a non-zero k part of the merged qkv bias, which softmax cancels
    checkpoint = {f"vision_model.{key}": value for key, value in hf.state_dict().items()}
    checkpoint["qformer.layernorm.weight"] = torch.ones(8)  # another component's key

    encoder = tiny_eva().eval()
    consumed = encoder.load_external_state(checkpoint, "hf")
    assert "vision_model.post_layernorm.weight" not in consumed  # the bridge's ln_vision
    assert "qformer.layernorm.weight" not in consumed

    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        ours = encoder(pixels)
        outputs = hf(pixel_values=pixels, output_hidden_states=True)
        before_post_norm = hf.encoder(inputs_embeds=hf.embeddings(pixels)).last_hidden_state
    assert ours.shape == (2, 17, 64)
    assert (ours - before_post_norm).abs().max().item() <= 1e-5
    assert (ours - outputs.hidden_states[-1]).abs().max().item() <= 1e-5
    # ... and HF's last_hidden_state is that plus post_layernorm, which the encoder leaves out.
    assert (ours - outputs.last_hidden_state).abs().max().item() > 1e-2


@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_pytorch_tanh"])
def test_eva_mlp_gelu_overwrites_its_input_only_without_gradient(hidden_act: str) -> None:
    """Without gradient the MLP's GELU reuses fc1's output (no second [tokens, mlp_dim] tensor);
    with one it must not (GELU's backward reads its input). Both match HF, values and gradients."""
    from transformers import Blip2VisionConfig, Blip2VisionModel

    config = Blip2VisionConfig(
        hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        image_size=56, patch_size=14, layer_norm_eps=1e-6, qkv_bias=True, hidden_act=hidden_act,
    )
    hf = Blip2VisionModel(config).eval()
    randomize(hf)
    encoder = tiny_eva(hidden_act=hidden_act).eval()
    encoder.load_external_state({f"vision_model.{key}": value for key, value in hf.state_dict().items()}, "hf")
    mlp = encoder.vit.blocks[0].mlp
    seen: dict[str, torch.Tensor] = {}
    mlp.fc1.register_forward_hook(lambda module, inputs, output: seen.__setitem__("fc1", output))
    mlp.act.register_forward_hook(lambda module, inputs, output: seen.__setitem__("act", output))
    pixels = torch.randn(2, 3, 56, 56)

    trained = encoder(pixels)
    assert seen["act"].data_ptr() != seen["fc1"].data_ptr()
    reference = hf(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
    assert (trained - reference).abs().max().item() <= 1e-5
    trained.square().mean().backward()
    reference.square().mean().backward()
    assert torch.allclose(mlp.fc1.weight.grad, hf.encoder.layers[0].mlp.fc1.weight.grad, atol=1e-6)

    with torch.no_grad():
        frozen = encoder(pixels)
    assert seen["act"].data_ptr() == seen["fc1"].data_ptr()
    assert torch.equal(frozen, trained.detach())


def test_clip_matches_open_clip_penultimate_block(tmp_path) -> None:
    import open_clip

    clip = open_clip.create_model(
        "ViT-L-14-quickgelu", pretrained=None, vision_cfg=TINY_CLIP_CFG,
        text_cfg={"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
        embed_dim=32,
    ).eval()
    randomize(clip, 0.02)
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        reference = clip.visual.forward_intermediates(
            pixels, indices=[1], output_fmt="NLC", intermediates_only=True, output_extra_tokens=True
        )
    expected = torch.cat(
        [reference["image_intermediates_prefix"][0], reference["image_intermediates"][0]], dim=1
    )  # [2, 17, 64]: block 1 of 0..2, the penultimate

    overrides = {"image_size": 56, "vision_cfg": TINY_CLIP_CFG}
    encoder = build_component(CARDS["vit_l_tiny"], overrides).eval()
    consumed = encoder.load_external_state(clip.state_dict(), "open_clip")
    assert "visual.transformer.resblocks.2.ln_1.weight" in consumed  # dropped last block
    assert "visual.proj" in consumed and not any(key.startswith("text") for key in consumed)
    assert sum(1 for key in encoder.state_dict() if key.endswith("ln_1.weight")) == 2
    assert isinstance(encoder.vit.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)
    with torch.no_grad():
        assert (encoder(pixels) - expected).abs().max().item() <= 1e-5

    # The same weights as an open_clip checkpoint file, loaded by open_clip at build time.
    path = tmp_path / "tiny_clip.pt"
    torch.save(clip.state_dict(), path)
    from_file = build_component(CARDS["vit_l_tiny"], {**overrides, "pretrained": str(path)}).eval()
    with torch.no_grad():
        assert (from_file(pixels) - expected).abs().max().item() <= 1e-5

    # And as a LAVIS file (visual_encoder.* keys, LAVIS clip_vit layout).
    lavis_path = tmp_path / "lavis_clip.pth"
    torch.save({"model": encoder.export_external_state("lavis")}, lavis_path)
    from_lavis = build_component(CARDS["vit_l_tiny"], {**overrides, "pretrained": str(lavis_path)}).eval()
    with torch.no_grad():
        assert torch.equal(from_lavis(pixels), encoder(pixels))
    with pytest.raises(NotImplementedError, match="EVA"):
        encoder.export_external_state("hf")

    # Pretrained at 56 px, run at 84 px: open_clip loads at 56, the grid is resampled (LAVIS
    # clip_vit uses align_corners=True), the class row kept.
    bigger = build_component(
        CARDS["vit_l_tiny"], {**overrides, "image_size": 84, "pretrained": str(path)}
    )
    assert bigger.num_tokens == 37 and bigger.vit.positional_embedding.shape == (37, 64)
    assert torch.equal(bigger.vit.positional_embedding[0], clip.visual.positional_embedding[0])
    grid = clip.visual.positional_embedding[1:].detach().reshape(1, 4, 4, 64).permute(0, 3, 1, 2)
    expected_grid = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=True)
    assert torch.allclose(
        bigger.vit.positional_embedding[1:].detach(), expected_grid.permute(0, 2, 3, 1).reshape(36, 64)
    )
    with torch.no_grad():
        assert bigger(torch.randn(1, 3, 84, 84)).shape == (1, 37, 64)


# -- resolution change -------------------------------------------------------------------------


def test_224_weights_into_364_encoder_resample_position_embeddings() -> None:
    small = tiny_eva(image_size=224, depth=1)
    randomize(small)
    big = tiny_eva(image_size=364, depth=1)
    assert (small.num_tokens, big.num_tokens) == (257, 677)

    big.load_external_state(small.export_external_state("lavis"), "lavis")
    pos_small, pos_big = small.vit.pos_embed.detach(), big.vit.pos_embed.detach()
    assert pos_big.shape == (1, 677, 64)
    assert torch.equal(pos_big[:, 0], pos_small[:, 0])  # the class token's row is kept
    grid = pos_small[:, 1:].reshape(1, 16, 16, 64).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(26, 26), mode="bicubic", align_corners=False)
    assert torch.allclose(pos_big[:, 1:], expected.permute(0, 2, 3, 1).reshape(1, 676, 64))
    assert torch.equal(big.vit.blocks[0].mlp.fc1.weight, small.vit.blocks[0].mlp.fc1.weight)
    with torch.no_grad():
        assert big(torch.randn(1, 3, 364, 364)).shape == (1, 677, 64)
    with pytest.raises(ValueError, match="364px"):
        big(torch.randn(1, 3, 224, 224))


def test_hf_export_and_bigger_grid_in_hf_layout() -> None:
    small = tiny_eva()
    big = tiny_eva(image_size=84)
    big.load_external_state(small.export_external_state("hf"), "hf")
    assert big.vit.pos_embed.shape == (1, 37, 64)


# -- freezing, precision, checkpointing --------------------------------------------------------


def test_frozen_stays_frozen_through_train() -> None:
    encoder = tiny_eva()
    parent = nn.Sequential(encoder, nn.Linear(64, 2))
    encoder.freeze()
    parent.train()
    assert encoder.frozen and not encoder.training
    assert not any(module.training for module in encoder.modules())
    assert not any(parameter.requires_grad for parameter in encoder.parameters())
    assert parent[1].training


def test_cast_frozen_half_precision() -> None:
    encoder = tiny_eva().freeze()
    pixels = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        reference = encoder(pixels)
        encoder.cast_frozen(torch.bfloat16)
        half = encoder(pixels)
    assert half.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in encoder.parameters())
    assert (half.float() - reference).abs().max().item() < 0.1 * reference.abs().max().item()


def test_grad_checkpointing_flag_gives_the_same_gradients() -> None:
    plain = tiny_eva()
    checkpointed = tiny_eva(grad_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    assert checkpointed.vit.grad_checkpointing and not plain.vit.grad_checkpointing
    pixels = torch.randn(2, 3, 56, 56)
    for encoder in (plain, checkpointed):
        encoder.train()
        encoder(pixels).square().mean().backward()
    grad_plain = plain.vit.blocks[0].attn.q_bias.grad
    assert grad_plain is not None and grad_plain.abs().sum() > 0
    assert torch.allclose(grad_plain, checkpointed.vit.blocks[0].attn.q_bias.grad, atol=1e-6)


# -- checkpoint conversion ---------------------------------------------------------------------


def test_hf_round_trip_is_identity() -> None:
    encoder = tiny_eva()
    randomize(encoder)
    exported = encoder.export_external_state("hf")
    assert not any("post_layernorm" in key for key in exported)
    assert exported["vision_model.encoder.layers.0.self_attn.qkv.bias"].shape == (192,)
    converted = encoder.convert_external_state(exported, "hf")
    own = encoder.state_dict()
    assert converted.consumed == set(exported)
    assert set(converted.state) == set(own)
    assert all(torch.equal(converted.state[key], own[key]) for key in own)


def test_lavis_checkpoint_and_raw_eva_file_load(tmp_path) -> None:
    source = tiny_eva(depth=3)  # a 3-block tower, like EVA-CLIP-g's 40 for a 39-block encoder
    randomize(source)
    lavis_state = source.export_external_state("lavis")
    lavis_state["ln_vision.weight"] = torch.ones(64)  # the bridge's, not the encoder's
    lavis_state["query_tokens"] = torch.zeros(1, 32, 768)
    path = tmp_path / "blip2_vitg.pth"
    torch.save({"model": lavis_state, "epoch": 3}, path)

    encoder = tiny_eva(pretrained=str(path))
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, source.state_dict()[key]), key
    converted = encoder.convert_external_state(lavis_state, "lavis")
    assert "visual_encoder.blocks.2.mlp.fc1.weight" in converted.consumed  # dropped last block
    assert "ln_vision.weight" not in converted.consumed and "query_tokens" not in converted.consumed

    # eva_vit_g.pth: the same keys without the prefix (also timm's Eva names).
    raw = {key[len("visual_encoder."):]: value for key, value in source.export_external_state("lavis").items()}
    raw_path = tmp_path / "eva_vit_g.pth"
    torch.save(raw, raw_path)
    from_raw = tiny_eva(pretrained=str(raw_path))
    assert torch.equal(from_raw.vit.blocks[1].attn.v_bias, source.vit.blocks[1].attn.v_bias)


def test_checkpoint_without_vision_weights_converts_to_nothing_but_cannot_load() -> None:
    released = {"query_tokens": torch.zeros(1, 32, 768), "ln_vision.weight": torch.ones(64)}
    encoder = tiny_eva()
    converted = encoder.convert_external_state(released, "lavis")
    assert converted.state == {} and converted.consumed == set()
    with pytest.raises(VisionWeightsError, match="no weights"):
        encoder.load_external_state(released, "lavis")


def test_bad_keys_are_named() -> None:
    encoder = tiny_eva()
    good = encoder.export_external_state("lavis")

    missing = dict(good)
    del missing["visual_encoder.blocks.1.attn.q_bias"]
    with pytest.raises(VisionWeightsError, match=r"missing keys: vit\.blocks\.1\.attn\.q_bias"):
        encoder.convert_external_state(missing, "lavis")

    wrong_shape = dict(good)
    wrong_shape["visual_encoder.blocks.0.mlp.fc1.weight"] = torch.zeros(128, 64)
    with pytest.raises(VisionWeightsError, match=r"blocks\.0\.mlp\.fc1\.weight: checkpoint \(128, 64\) vs model \(256, 64\)"):
        encoder.convert_external_state(wrong_shape, "lavis")

    layer_scale = dict(good)
    layer_scale["visual_encoder.blocks.0.gamma_1"] = torch.ones(64)
    with pytest.raises(VisionWeightsError, match="gamma_1"):
        encoder.convert_external_state(layer_scale, "lavis")

    with pytest.raises(FileNotFoundError, match="not a local file"):
        tiny_eva(pretrained="no/such/eva.pth")


# -- preprocessing -----------------------------------------------------------------------------


def test_transforms_follow_lavis() -> None:
    from PIL import Image
    from torchvision.transforms import functional as TF

    encoder = tiny_eva()
    image = Image.fromarray((torch.rand(40, 70, 3) * 255).to(torch.uint8).numpy(), mode="RGB")
    pixels = encoder.transform(train=False)(image)
    assert pixels.shape == (3, 56, 56)
    resized = image.resize((56, 56), Image.BICUBIC)  # squashed to (S, S), no crop
    expected = TF.normalize(TF.to_tensor(resized), encoder.mean, encoder.std)
    assert torch.allclose(pixels, expected, atol=1e-6)
    grey = image.convert("L")
    assert encoder.transform(train=True)(grey).shape == (3, 56, 56)
    assert "RandomResizedCrop" in repr(build_transform(224, train=True))
    assert encoder.mean == CARDS["vit_tiny"].preprocessing.mean
