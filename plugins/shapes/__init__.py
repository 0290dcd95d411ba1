"""The frozen towers of the synthetic shapes world (registered through the entry point `shapes`).

``shapes_vit`` is a tiny EVA ViT pretrained CLIP-style on scenes the world's sampler renders afresh
(never a held-out pair, never a val or test composition), each beside a hard-negative twin;
``shapes_opt`` is a tiny OPT with its own BPE tokenizer, pretrained on text only (scene descriptions,
then questions and answers in the VQA prompt format). Both ship as small files under ``assets/``,
made by ``blip2kit demo towers`` (``blip2kit.plugins.shapes.recipe``) from a seed, and are frozen
like any BLIP-2 tower: ``build_model("shapes_vit+qformer_tiny+shapes_opt")``.

The configs are plain data so listing names stays instant; ``pretrained: "packaged"`` means the
files shipped in this package, and any other value is a path to weights of the same architecture.
"""

from blip2kit.registry import ComponentCard, Preprocessing, Registry, hookimpl

PACKAGED = "packaged"  # config value meaning "the weights shipped under assets/"
RECIPE = "blip2kit.plugins.shapes.recipe"  # what makes both towers (`blip2kit demo towers`)

# The architectures the recipe trains; the cards and the recipe read them from here.
SHAPES_VIT_CONFIG = {
    "image_size": 64,
    "patch_size": 8,  # 8x8 patches (65 tokens): a 16 px patch straddles the 6-10 px radius shapes
    "width": 64,
    "depth": 2,  # blocks BLIP-2 reads: the recipe pretrains 3 and ships the first 2 (penultimate output)
    "num_heads": 4,
    "mlp_dim": 256,
    "layer_norm_eps": 1e-6,
    "hidden_act": "gelu",
    "pretrained": PACKAGED,
    "grad_checkpointing": False,
}
SHAPES_OPT_CONFIG = {
    "vocab_size": 512,
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "ffn_dim": 512,
    "max_position_embeddings": 128,
    "word_embed_proj_dim": 128,
    "pretrained": PACKAGED,  # a directory with config.json + model.safetensors + tokenizer files
    "tokenizer": PACKAGED,
    "prompt": "",
    "max_text_length": 64,
    "newline_token_id": None,
    "extra_config": {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 1},  # the recipe's BPE ids
}

SHAPES_CARDS = [
    ComponentCard(
        name="shapes_vit",
        kind="vision",
        factory="blip2kit.plugins.shapes.towers:build_shapes_vit",
        config=SHAPES_VIT_CONFIG,
        config_class="blip2kit.plugins.vision.configs:EvaViTConfig",
        width=64,
        params=116_416,
        weights="packaged with blip2kit (blip2kit demo towers, seed 0)",
        preprocessing=Preprocessing(image_size=64),
        provenance="EVA ViT code path, pretrained CLIP-style on freshly rendered shapes-world scenes with hard-negative twins",
        recipe=RECIPE,
        description="tiny EVA ViT for the shapes world (64 wide, 2 of 3 blocks, patch 8: 65 tokens at 64 px), frozen",
    ),
    ComponentCard(
        name="shapes_opt",
        kind="language",
        factory="blip2kit.plugins.shapes.towers:build_shapes_opt",
        config=SHAPES_OPT_CONFIG,
        config_class="blip2kit.plugins.language.configs:OPTComponentConfig",
        width=128,
        params=875_520,
        weights="packaged with blip2kit (blip2kit demo towers, seed 0)",
        provenance="OPT architecture (transformers OPTForCausalLM), text-only pretraining on the shapes world",
        recipe=RECIPE,
        description=(
            "tiny OPT (128 wide, 4 layers) with its own BPE tokenizer, pretrained on text only: sampled "
            "scene descriptions (also as perturbed embeddings), paraphrases and VQA, frozen"
        ),
    ),
]


@hookimpl
def blip2kit_register(registry: Registry) -> None:
    """Cards for shapes_vit and shapes_opt."""
    vision, language = SHAPES_CARDS
    registry.add_vision_encoder(vision)
    registry.add_language_model(language)
