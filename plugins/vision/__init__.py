"""Built-in vision encoders (registered through the `blip2kit` entry point `vision`).

This module only describes the encoders; their code (torch, timm, open_clip) is imported when one is
built, so listing names stays instant. ``params`` are exact meta-device counts of the default configs.
"""

from blip2kit.registry import CheckpointFormats, ComponentCard, Preprocessing, Registry, hookimpl

_EVA_FACTORY = "blip2kit.plugins.vision.eva_vit:build_eva_vit"
_CLIP_FACTORY = "blip2kit.plugins.vision.clip_vit:build_clip_vit"
_EVA_CONFIG = "blip2kit.plugins.vision.configs:EvaViTConfig"
_CLIP_CONFIG = "blip2kit.plugins.vision.configs:ClipViTConfig"
_LAVIS_EVA_G = (
    "https://storage.googleapis.com/sfr-vision-language-research/LAVIS/models/BLIP2/eva_vit_g.pth"
)

VISION_CARDS = [
    ComponentCard(
        name="vit_g",
        kind="vision",
        factory=_EVA_FACTORY,
        config_class=_EVA_CONFIG,
        config={
            "image_size": 224,  # 364 for the COCO-finetuned checkpoints
            "patch_size": 14,
            "width": 1408,
            "depth": 39,  # 39 of EVA-CLIP-g's 40 blocks: BLIP-2 reads the penultimate block
            "num_heads": 16,
            "mlp_dim": 6144,
            "layer_norm_eps": 1e-6,
            "hidden_act": "gelu",  # HF ACT2FN name of the MLP activation (EVA: exact GELU)
            "pretrained": None,  # local file (LAVIS / eva_vit_g.pth / HF / timm layout), URL or "timm:<name>"
            "grad_checkpointing": False,
        },
        width=1408,
        params=985_894_528,
        weights=f"LAVIS eva_vit_g.pth: {_LAVIS_EVA_G}",
        preprocessing=Preprocessing(image_size=224),
        provenance="EVA-CLIP ViT-g/14 (Fang et al. 2022) as LAVIS eva_vit_g builds it; timm Eva",
        description="EVA-CLIP ViT-g/14, 1408 wide, 39 of 40 blocks, 257 tokens at 224 px (frozen)",
        # HF Blip2 checkpoints describe their vision tower as an EVA of any size.
        formats=CheckpointFormats(
            hf_model_types=("blip_2_vision_model",),
            hf_config_reader="blip2kit.plugins.vision.eva_vit:read_hf_vision_config",
        ),
    ),
    ComponentCard(
        name="vit_l",
        kind="vision",
        factory=_CLIP_FACTORY,
        config_class=_CLIP_CONFIG,
        config={
            "open_clip_model": "ViT-L-14-quickgelu",
            "image_size": 224,
            "pretrained": None,  # open_clip tag ("openai"), open_clip/OpenAI file, or LAVIS file
            "vision_cfg": None,  # an open_clip vision_cfg dict replaces the architecture (tiny variants)
            "grad_checkpointing": False,
        },
        width=1024,
        params=290_581_504,
        weights="open_clip:ViT-L-14/openai (LAVIS: BLIP2/clip_vit_L.pth)",
        preprocessing=Preprocessing(image_size=224),
        provenance="OpenAI CLIP ViT-L/14 (Radford et al. 2021) through open_clip, cut as LAVIS clip_vit",
        description="CLIP ViT-L/14 (QuickGELU), 1024 wide, 23 of 24 blocks, 257 tokens at 224 px (frozen)",
    ),
    ComponentCard(
        name="vit_tiny",
        kind="vision",
        factory=_EVA_FACTORY,
        config_class=_EVA_CONFIG,
        config={
            "image_size": 112,
            "patch_size": 14,
            "width": 64,
            "depth": 2,
            "num_heads": 4,
            "mlp_dim": 256,
            "layer_norm_eps": 1e-6,
            "hidden_act": "gelu",
            "pretrained": None,
            "grad_checkpointing": False,
        },
        width=64,
        params=141_760,
        weights=None,
        preprocessing=Preprocessing(image_size=112),
        provenance="vit_g's EVA code path at toy size, for tests, CI and the demo",
        description="tiny EVA ViT (64 wide, 2 blocks, 65 tokens at 112 px), random weights",
    ),
    ComponentCard(
        name="vit_l_tiny",
        kind="vision",
        factory=_CLIP_FACTORY,
        config_class=_CLIP_CONFIG,
        config={
            "open_clip_model": "ViT-L-14-quickgelu",
            "image_size": 112,
            "pretrained": None,
            "vision_cfg": {"image_size": 112, "layers": 3, "width": 64, "head_width": 16, "patch_size": 14},
            "grad_checkpointing": False,
        },
        width=64,
        params=141_952,
        weights=None,
        preprocessing=Preprocessing(image_size=112),
        provenance="vit_l's open_clip code path at toy size, for tests and CI",
        description="tiny CLIP ViT (64 wide, 2 of 3 blocks, 65 tokens at 112 px), random weights",
    ),
]


@hookimpl
def blip2kit_register(registry: Registry) -> None:
    """Cards for vit_g, vit_l and their tiny test variants."""
    for card in VISION_CARDS:
        registry.add_vision_encoder(card)
