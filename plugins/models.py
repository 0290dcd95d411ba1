"""The named BLIP-2 checkpoints (registered through the `blip2kit` entry point `models`).

Each names a composition of built-in components, the per-slot overrides its weights need, the
Hugging Face hub id the transformers converter gave it and the LAVIS file with the same weights.
"""

from blip2kit.registry import ModelCard, Registry, hookimpl

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
    """Cards for blip2-opt-2.7b, blip2-flan-t5-xl, blip2-itm-vit-g and the rest."""
    for model_card in model_cards():
        registry.add_model(model_card)
