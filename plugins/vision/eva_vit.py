"""EVA-CLIP ViT image encoders (BLIP-2's ``vit_g``, and ``vit_tiny`` on the same code path).

The tower is timm's ``Eva`` configured as LAVIS ``eva_vit_g`` builds it: pre-norm blocks, GELU,
LayerNorm eps 1e-6, fused qkv without bias plus separate q/v biases (k bias fixed at zero),
absolute position embeddings with a class token, no layer scale, rope or relative position bias.
BLIP-2 uses the output of the penultimate block, so the model is built with depth-1 blocks
(39 of EVA-CLIP-g's 40) and no final norm or head.

Weights: LAVIS ``visual_encoder.*`` keys (or the raw ``eva_vit_g.pth``, same keys without the
prefix, which are also timm's), HF ``vision_model.*`` keys of ``Blip2*`` checkpoints.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from blip2kit.plugins.vision.common import (
    CLIP_MEAN,
    CLIP_STD,
    ViTEncoder,
    VisionWeightsError,
    load_state_file,
)

EVA_VIT_G_URL = (
    "https://storage.googleapis.com/sfr-vision-language-research/LAVIS/models/BLIP2/eva_vit_g.pth"
)

# Own block keys <-> HF Blip2EncoderLayer keys (q/k/v biases handled apart: HF merges them).
_HF_BLOCK_NAMES = {
    "norm1": "layer_norm1",
    "attn.qkv": "self_attn.qkv",
    "attn.proj": "self_attn.projection",
    "norm2": "layer_norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_HF_EMBEDDING_NAMES = {
    "cls_token": "embeddings.class_embedding",
    "pos_embed": "embeddings.position_embedding",
    "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
    "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
}
# Top-level tower parts that BLIP-2 does not use (the final norm and heads of a full EVA-CLIP).
# HF ACT2FN names -> timm activation names (the same functions).
_TIMM_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                     "quick_gelu": "quick_gelu", "relu": "relu", "silu": "silu"}
_UNUSED_TOP_LEVEL = ("norm.", "fc_norm.", "head.", "lm_head.")
_GELU_APPROXIMATIONS = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")
_HF_LAYER_KEY = re.compile(r"^encoder\.layers\.(\d+)\.(.+)$")


class GELUInPlaceWithoutGrad(nn.GELU):
    """nn.GELU that overwrites its input when no gradient flows through it (a frozen tower, or
    inference); with a gradient it returns a new tensor, as GELU's backward needs its input.

    The input is the MLP's fc1 output, read by nothing else. At ViT-g width that is a
    [B*257, 6144] tensor (50 MB at batch 8), above glibc's mmap threshold, so each fresh output
    comes from new pages of the OS. Reusing it made the GELU ~4x faster and took the bench-config
    encode from 185k to 104k page faults per call, ~2% of its time on one CPU thread (README
    Benchmarks, ``python -m benchmarks encode-profile``). The values are bit-identical to nn.GELU's.
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.requires_grad:
            return super().forward(x)
        return torch.ops.aten.gelu_(x, approximate=self.approximate)


class EvaVisionEncoder(ViTEncoder):
    """EVA ViT tower run to its penultimate block: pixels [B, 3, S, S] -> [B, (S/p)^2 + 1, width]."""

    _pos_embed_key = "vit.pos_embed"
    _pos_embed_align_corners = False  # LAVIS eva_vit and HF both resample with align_corners=False

    def __init__(
        self,
        *,
        image_size: int,
        patch_size: int,
        width: int,
        depth: int,
        num_heads: int,
        mlp_dim: int,
        layer_norm_eps: float,
        hidden_act: str = "gelu",
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        from timm.layers import get_act_layer
        from timm.models.eva import Eva

        if hidden_act not in _TIMM_ACTIVATIONS:
            raise ValueError(f"EVA hidden_act {hidden_act!r} is not implemented; use one of "
                             f"{sorted(_TIMM_ACTIVATIONS)}")

        if image_size % patch_size:
            raise ValueError(
                f"EVA image_size {image_size} is not a multiple of patch_size {patch_size}; "
                "pick a size such as 224 or 364 for patch 14"
            )
        if width % num_heads:
            raise ValueError(f"EVA width {width} is not divisible by num_heads {num_heads}")
        self.width = width
        self.depth = depth
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.image_size = image_size
        self.patch_size = patch_size
        self.layer_norm_eps = layer_norm_eps
        self.hidden_act = hidden_act
        self.mean, self.std = CLIP_MEAN, CLIP_STD
        self.vit = Eva(
            img_size=image_size,
            patch_size=patch_size,
            num_classes=0,
            global_pool="",
            embed_dim=width,
            depth=depth,
            num_heads=num_heads,
            qkv_bias=True,  # timm: q_bias and v_bias parameters, k_bias a zero buffer
            qkv_fused=True,
            # timm truncates int(width * ratio); the extra half unit keeps float error from losing one.
            mlp_ratio=(mlp_dim + 0.5) / width,
            norm_layer=partial(nn.LayerNorm, eps=layer_norm_eps),
            init_values=None,
            use_abs_pos_emb=True,
            use_rot_pos_emb=False,
            use_post_transformer_norm=False,
            use_fc_norm=False,
            device=device,
        )
        assert self.vit.blocks[0].mlp.fc1.out_features == mlp_dim, "EVA FFN width not as configured"
        # timm's Eva takes no activation argument: set each block's MLP's.
        for block in self.vit.blocks:
            if hidden_act in _GELU_APPROXIMATIONS:
                block.mlp.act = GELUInPlaceWithoutGrad(approximate=_GELU_APPROXIMATIONS[hidden_act])
            else:
                block.mlp.act = get_act_layer(_TIMM_ACTIVATIONS[hidden_act])()

    def forward(self, pixels: Tensor) -> Tensor:
        if pixels.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"EVA encoder built for {self.image_size}px images got {tuple(pixels.shape)}; use "
                "its transform() or build it with image_size matching the images"
            )
        pixels = pixels.to(self.vit.patch_embed.proj.weight.dtype)  # [B, 3, S, S]
        return self.vit.forward_features(pixels)  # [B, num_tokens, width]

    # -- checkpoints ----------------------------------------------------------------------------

    def _from_external(
        self, state: Mapping[str, Tensor], source: str
    ) -> tuple[dict[str, Tensor], set[str]]:
        if source == "lavis":
            return self._from_lavis(state)
        if source == "hf":
            return self._from_hf(state)
        raise ValueError(f"EVA encoder reads 'lavis' or 'hf' checkpoints, not {source!r}")

    def _from_lavis(self, state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], set[str]]:
        def pick(name: str, value: Tensor) -> dict[str, Tensor] | None:
            block = _BLOCK_KEY.match(name)
            if block and int(block.group(1)) == self.depth:
                return {}  # the last EVA block: BLIP-2 stops one block earlier
            if block and int(block.group(1)) > self.depth:
                raise self._too_deep(int(block.group(1)) + 1, self.depth + 1, "LAVIS")
            if name.startswith(_UNUSED_TOP_LEVEL):
                return {}
            if name in _HF_EMBEDDING_NAMES or (
                block and block.group(2).rsplit(".", 1)[0] in {*_HF_BLOCK_NAMES, "attn"}
            ):
                return {f"vit.{name}": value}
            return None

        return self._pick_keys(state, "visual_encoder.", pick, "LAVIS")

    def _from_hf(self, state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], set[str]]:
        by_hf_embedding = {hf: ours for ours, hf in _HF_EMBEDDING_NAMES.items()}
        by_hf_block = {hf: ours for ours, hf in _HF_BLOCK_NAMES.items()}

        def pick(name: str, value: Tensor) -> dict[str, Tensor] | None:
            layer = _HF_LAYER_KEY.match(name)
            if name in by_hf_embedding:
                return {f"vit.{by_hf_embedding[name]}": value}
            if layer and int(layer.group(1)) >= self.depth:
                raise self._too_deep(int(layer.group(1)) + 1, self.depth, "HF")
            if layer and layer.group(2) == "self_attn.qkv.bias":
                q_bias, _k_bias, v_bias = value.chunk(3)  # [3*width] -> 3 x [width]
                # The k bias is dropped: it adds q.b_k to every logit of a query row, which softmax
                # cancels, so the outputs are identical (LAVIS and timm fix it at zero anyway).
                index = layer.group(1)
                return {f"vit.blocks.{index}.attn.q_bias": q_bias, f"vit.blocks.{index}.attn.v_bias": v_bias}
            if layer and layer.group(2).rsplit(".", 1)[0] in by_hf_block:
                module, leaf = layer.group(2).rsplit(".", 1)
                return {f"vit.blocks.{layer.group(1)}.{by_hf_block[module]}.{leaf}": value}
            return None

        # post_layernorm is LAVIS ln_vision: it belongs to the bridge, not to the frozen tower.
        tower = {k: v for k, v in state.items() if not k.startswith("vision_model.post_layernorm.")}
        return self._pick_keys(tower, "vision_model.", pick, "HF")

    def _too_deep(self, layers: int, allowed: int, source: str) -> VisionWeightsError:
        return VisionWeightsError(
            f"the {source} checkpoint has at least {layers} vision blocks but this EVA encoder is "
            f"configured with depth {self.depth} (a file may hold at most {allowed}); set depth to "
            "the checkpoint's, or use the checkpoint made for this encoder"
        )

    def export_external_state(self, target: str) -> dict[str, Tensor]:
        """Weights under LAVIS ``visual_encoder.*`` or HF ``vision_model.*`` names.

        The HF export holds no ``vision_model.post_layernorm``: that is the bridge's ln_vision.
        """
        own = {key[len("vit."):]: value for key, value in self.state_dict().items()}
        if target == "lavis":
            return {f"visual_encoder.{key}": value for key, value in own.items()}
        if target != "hf":
            raise ValueError(f"EVA encoder writes 'lavis' or 'hf' checkpoints, not {target!r}")
        out: dict[str, Tensor] = {}
        for key, value in own.items():
            block = _BLOCK_KEY.match(key)
            if key in _HF_EMBEDDING_NAMES:
                out[f"vision_model.{_HF_EMBEDDING_NAMES[key]}"] = value
            elif block and block.group(2) in ("attn.q_bias", "attn.v_bias"):
                continue  # merged below with the qkv weight's layer
            elif block:
                module, leaf = block.group(2).rsplit(".", 1)
                out[f"vision_model.encoder.layers.{block.group(1)}.{_HF_BLOCK_NAMES[module]}.{leaf}"] = value
            else:
                raise AssertionError(f"EVA key {key!r} has no HF name")
        for index in range(self.depth):
            q_bias = own[f"blocks.{index}.attn.q_bias"]
            v_bias = own[f"blocks.{index}.attn.v_bias"]
            out[f"vision_model.encoder.layers.{index}.self_attn.qkv.bias"] = torch.cat(
                [q_bias, torch.zeros_like(q_bias), v_bias]
            )  # [3*width]: HF's merged [q_bias, 0, v_bias]
        return out

    def hf_config(self) -> dict[str, Any]:
        """Blip2VisionConfig fields; num_hidden_layers counts the blocks BLIP-2 runs (39 for ViT-g)."""
        return {
            "hidden_size": self.width,
            "intermediate_size": self.mlp_dim,
            "num_hidden_layers": self.depth,
            "num_attention_heads": self.num_heads,
            "patch_size": self.patch_size,
            "image_size": self.image_size,
            "hidden_act": self.hidden_act,
            "layer_norm_eps": self.layer_norm_eps,
            "qkv_bias": True,
        }

    # -- pretrained weights ---------------------------------------------------------------------

    def load_pretrained(self, source: str | Path) -> None:
        """Load weights from a local file (LAVIS checkpoint, raw ``eva_vit_g.pth``, timm or HF
        ``Blip2*`` layout, detected from the keys), an http(s) URL, or ``timm:<model>.<tag>``."""
        text = str(source)
        if Path(text).is_file():
            state = load_state_file(text)
            where = text
        elif text.startswith(("http://", "https://")):
            state = torch.hub.load_state_dict_from_url(text, map_location="cpu", weights_only=True)
            state = state.get("model", state)
            where = text
        elif text.startswith("timm:"):
            import timm

            tower = timm.create_model(text[len("timm:"):], pretrained=True, num_classes=0)
            state = tower.state_dict()
            where = text
        else:
            raise FileNotFoundError(
                f"EVA pretrained weights {text!r}: not a local file, an http(s) URL, or "
                f"'timm:<model>.<tag>'; e.g. {EVA_VIT_G_URL}"
            )
        self.load_external_state(*_as_external(state), where=where)

    def load_external_state(  # type: ignore[override]
        self, state: Mapping[str, Tensor], source: str, where: str | None = None
    ) -> set[str]:
        try:
            return super().load_external_state(state, source)
        except VisionWeightsError as error:
            if where is None:
                raise
            raise VisionWeightsError(f"loading EVA weights from {where}: {error}") from error


def _as_external(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], str]:
    """Name the layout of a weights file: LAVIS, HF, or raw EVA/timm keys (given the LAVIS prefix)."""
    keys = list(state)
    if any(key.startswith("visual_encoder.") for key in keys):
        return dict(state), "lavis"
    if any(key.startswith("vision_model.") for key in keys):
        return dict(state), "hf"
    if any(key.startswith("vit.") for key in keys):  # blip2kit's own encoder state_dict
        return {f"visual_encoder.{key[4:]}": value for key, value in state.items()}, "lavis"
    # eva_vit_g.pth and timm's Eva share LAVIS's names without the prefix.
    return {f"visual_encoder.{key}": value for key, value in state.items()}, "lavis"


def build_eva_vit(
    config: Mapping[str, Any],
    device: torch.device | str | None = None,
    *,
    encoder_class: type[EvaVisionEncoder] | None = None,
) -> EvaVisionEncoder:
    """Factory of the ``vit_g`` / ``vit_tiny`` cards; ``encoder_class`` lets a plugin reuse it for
    its own subclass (e.g. another image transform)."""
    encoder = (encoder_class or EvaVisionEncoder)(
        image_size=int(config["image_size"]),
        patch_size=int(config["patch_size"]),
        width=int(config["width"]),
        depth=int(config["depth"]),
        num_heads=int(config["num_heads"]),
        mlp_dim=int(config["mlp_dim"]),
        layer_norm_eps=float(config["layer_norm_eps"]),
        hidden_act=str(config.get("hidden_act", "gelu")),
        device=device,
    )
    if config.get("grad_checkpointing"):
        encoder.set_grad_checkpointing(True)
    if config.get("pretrained"):
        encoder.load_pretrained(config["pretrained"])
    return encoder


def read_hf_vision_config(
    vision_config: Mapping[str, Any], blip2_config: Mapping[str, Any]
) -> tuple[str, dict[str, Any]]:
    """The ``vit_g`` card's settings for an HF ``vision_config`` (an EVA tower of any size), with
    transformers' defaults for omitted fields; refuses settings this tower does not implement."""
    from transformers import Blip2VisionConfig

    full = Blip2VisionConfig.from_dict(dict(vision_config))
    if not full.qkv_bias:
        raise ValueError("vision_config.qkv_bias=False is not implemented: the EVA tower always has "
                         "q and v biases")
    if full.hidden_act not in _TIMM_ACTIVATIONS:
        raise ValueError(f"vision_config.hidden_act {full.hidden_act!r} is not implemented; use one "
                         f"of {sorted(_TIMM_ACTIVATIONS)}")
    image_size, patch_size = full.image_size, full.patch_size
    return "vit_g", {
        "image_size": int(image_size[0] if isinstance(image_size, (list, tuple)) else image_size),
        "patch_size": int(patch_size[0] if isinstance(patch_size, (list, tuple)) else patch_size),
        "width": full.hidden_size,
        "depth": full.num_hidden_layers,
        "num_heads": full.num_attention_heads,
        "mlp_dim": full.intermediate_size,
        "layer_norm_eps": full.layer_norm_eps,
        "hidden_act": full.hidden_act,
    }
