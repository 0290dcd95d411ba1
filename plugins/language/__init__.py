"""Built-in language models (registered through the `blip2kit` entry point `language`).

OPT-2.7B/6.7B (decoder-only) and Flan-T5-XL/XXL (encoder-decoder) on transformers, their tiny
test-sized twins, and the named BLIP-2 checkpoints (``blip2-opt-2.7b`` ...) built from them.
"""

from blip2kit.registry import ComponentCard, ModelCard, Registry, hookimpl

_PROVENANCE_OPT = "Zhang et al. 2022, OPT (arXiv 2205.01068); LAVIS blip2_opt.py"
_PROVENANCE_T5 = "Chung et al. 2022, Flan-T5 (arXiv 2210.11416); LAVIS blip2_t5.py"

# name -> (factory, config, width, params of the default config on meta, weights, description)
_LANGUAGE_CARDS = {
    "opt_2.7b": ("opt:build_opt", "OPT_CONFIGS", 2560, 2651596800, "facebook/opt-2.7b",
                 "OPT-2.7B, frozen decoder-only LLM (LM loss, stops at newline)"),
    "opt_6.7b": ("opt:build_opt", "OPT_CONFIGS", 4096, 6658473984, "facebook/opt-6.7b",
                 "OPT-6.7B, frozen decoder-only LLM (LM loss, stops at newline)"),
    "opt_tiny": ("opt:build_opt", "OPT_CONFIGS", 64, 108160, None,
                 "tiny OPT with random weights for tests and the demo"),
    "flant5_xl": ("t5:build_t5", "T5_CONFIGS", 2048, 2849757184, "google/flan-t5-xl",
                  "Flan-T5-XL, frozen encoder-decoder LLM (prefix-LM loss), bf16 with fp32 wo"),
    "flant5_xxl": ("t5:build_t5", "T5_CONFIGS", 4096, 11135332352, "google/flan-t5-xxl",
                   "Flan-T5-XXL, frozen encoder-decoder LLM (prefix-LM loss), bf16 with fp32 wo"),
    "flant5_tiny": ("t5:build_t5", "T5_CONFIGS", 64, 263168, None,
                    "tiny Flan-T5 with random weights for tests and the demo"),
}


def language_cards() -> list[ComponentCard]:
    """The component cards of the built-in language models."""
    from blip2kit.plugins.language.configs import OPT_CONFIGS, T5_CONFIGS

    tables = {"OPT_CONFIGS": OPT_CONFIGS, "T5_CONFIGS": T5_CONFIGS}
    cards = []
    for name, (factory, table, width, params, weights, description) in _LANGUAGE_CARDS.items():
        cards.append(
            ComponentCard(
                name=name,
                kind="language",
                factory=f"blip2kit.plugins.language.{factory}",
                config=tables[table][name],
                width=width,
                params=params,
                weights=weights,
                provenance=_PROVENANCE_OPT if name.startswith("opt") else _PROVENANCE_T5,
                description=description,
            )
        )
    return cards


_LAVIS_URL = "https://storage.googleapis.com/sfr-vision-language-research/LAVIS/models/BLIP2/"
_COCO = {"vision": {"image_size": 364}}  # COCO-finetuned checkpoints run at 364 px (677 tokens)
# The HF OPT checkpoints added an <image> token and padded the vocabulary to 50304.
_HF_OPT_VOCAB = {"vocab_size": 50304}

# name -> (composition, overrides, HF hub id, LAVIS file, description)
_MODEL_CARDS = {
    "blip2-opt-2.7b": ("vit_g+qformer+opt_2.7b", {"language": _HF_OPT_VOCAB},
                       "Salesforce/blip2-opt-2.7b", "blip2_pretrained_opt2.7b.pth",
                       "BLIP-2 pretrained with OPT-2.7B (zero-shot captioning and VQA)"),
    "blip2-opt-6.7b": ("vit_g+qformer+opt_6.7b", {"language": _HF_OPT_VOCAB},
                       "Salesforce/blip2-opt-6.7b", "blip2_pretrained_opt6.7b.pth",
                       "BLIP-2 pretrained with OPT-6.7B"),
    "blip2-flan-t5-xl": ("vit_g+qformer+flant5_xl", {}, "Salesforce/blip2-flan-t5-xl",
                         "blip2_pretrained_flant5xl.pth", "BLIP-2 pretrained with Flan-T5-XL"),
    "blip2-flan-t5-xxl": ("vit_g+qformer+flant5_xxl", {}, "Salesforce/blip2-flan-t5-xxl",
                          "blip2_pretrained_flant5xxl.pth", "BLIP-2 pretrained with Flan-T5-XXL"),
    "blip2-itm-vit-g": ("vit_g+qformer", {}, "Salesforce/blip2-itm-vit-g", "blip2_pretrained.pth",
                        "BLIP-2 stage-1 Q-Former on EVA ViT-g (retrieval, ITM, features)"),
    "blip2-opt-2.7b-coco": ("vit_g+qformer+opt_2.7b",
                            {**_COCO, "language": {**_HF_OPT_VOCAB, "prompt": "a photo of"}},
                            "Salesforce/blip2-opt-2.7b-coco", "blip2_caption_opt2.7b.pth",
                            "BLIP-2 OPT-2.7B finetuned for COCO captioning (364 px)"),
    "blip2-opt-6.7b-coco": ("vit_g+qformer+opt_6.7b",
                            {**_COCO, "language": {**_HF_OPT_VOCAB, "prompt": "a photo of"}},
                            "Salesforce/blip2-opt-6.7b-coco", "blip2_caption_opt6.7b.pth",
                            "BLIP-2 OPT-6.7B finetuned for COCO captioning (364 px)"),
    "blip2-flan-t5-xl-coco": ("vit_g+qformer+flant5_xl", _COCO, "Salesforce/blip2-flan-t5-xl-coco",
                              "blip2_caption_flant5xl.pth",
                              "BLIP-2 Flan-T5-XL finetuned for COCO captioning (364 px)"),
    "blip2-itm-vit-g-coco": ("vit_g+qformer", _COCO, "Salesforce/blip2-itm-vit-g-coco",
                             "blip2_finetune_coco.pth",
                             "BLIP-2 stage-1 Q-Former finetuned for COCO retrieval (364 px)"),
}


def model_cards() -> list[ModelCard]:
    """The named BLIP-2 checkpoints (HF converter names; LAVIS files of the same weights)."""
    return [
        ModelCard(name=name, composition=composition, overrides=overrides, weights=hub_id,
                  lavis_weights=_LAVIS_URL + lavis_file,
                  provenance="Li et al. 2023, BLIP-2 (arXiv 2301.12597); Salesforce LAVIS / HF hub",
                  description=description)
        for name, (composition, overrides, hub_id, lavis_file, description) in _MODEL_CARDS.items()
    ]


@hookimpl
def blip2kit_register(registry: Registry) -> None:
    """Cards for OPT and Flan-T5 and the named BLIP-2 checkpoints."""
    for card in language_cards():
        registry.add_language_model(card)
    for model_card in model_cards():
        registry.add_model(model_card)
