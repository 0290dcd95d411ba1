"""Built-in language models (registered through the `blip2kit` entry point `language`).

OPT-2.7B/6.7B (decoder-only) and Flan-T5-XL/XXL (encoder-decoder) on transformers, and their tiny
test-sized twins. The named BLIP-2 checkpoints built from them are in ``blip2kit.plugins.models``.
"""

from blip2kit.registry import CheckpointFormats, ComponentCard, Registry, hookimpl

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
    # Checkpoints without blip2kit.json: HF text_config model_type and LAVIS projection prefix.
    formats = {
        "OPT_CONFIGS": CheckpointFormats(
            hf_model_types=("opt",), lavis_projection_prefix="opt_proj.",
            hf_config_reader="blip2kit.plugins.language.opt:read_hf_text_config"),
        "T5_CONFIGS": CheckpointFormats(
            hf_model_types=("t5",), lavis_projection_prefix="t5_proj.",
            hf_config_reader="blip2kit.plugins.language.t5:read_hf_text_config"),
    }
    cards = []
    for name, (factory, table, width, params, weights, description) in _LANGUAGE_CARDS.items():
        cards.append(
            ComponentCard(
                name=name,
                kind="language",
                factory=f"blip2kit.plugins.language.{factory}",
                config_class="blip2kit.plugins.language.configs:"
                + ("OPTComponentConfig" if table == "OPT_CONFIGS" else "T5ComponentConfig"),
                config=tables[table][name],
                width=width,
                params=params,
                weights=weights,
                provenance=_PROVENANCE_OPT if name.startswith("opt") else _PROVENANCE_T5,
                description=description,
                formats=formats[table],
            )
        )
    return cards


@hookimpl
def blip2kit_register(registry: Registry) -> None:
    """Cards for OPT and Flan-T5."""
    for card in language_cards():
        registry.add_language_model(card)
