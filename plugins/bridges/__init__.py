"""Built-in bridges (registered through the `blip2kit` entry point `bridges`).

Card configs are literal dicts (the keys of ``qformer.QFormerConfig``) so listing imports no torch.
"""

from blip2kit.registry import CheckpointFormats, ComponentCard, Registry, hookimpl

_QFORMER_FACTORY = "blip2kit.plugins.bridges.qformer:build_qformer"
_QFORMER_CONFIG = "blip2kit.plugins.bridges.qformer:QFormerConfig"

QFORMER_CONFIG = {
    "encoder_width": 1408,  # set to the vision encoder's width at composition
    "hidden_size": 768,
    "num_layers": 12,
    "num_heads": 12,
    "intermediate_size": 3072,
    "num_queries": 32,
    "cross_attention_freq": 2,
    "vocab_size": 30523,  # bert-base-uncased + [DEC]
    "max_position_embeddings": 512,
    "embed_dim": 256,
    "max_text_length": 32,
    "dropout": 0.1,
    "layer_norm_eps": 1e-12,
    "ln_vision_eps": 1e-5,  # LAVIS; HF's post_layernorm uses 1e-6
    "initializer_range": 0.02,
    "pad_token_id": 0,
    "hidden_act": "gelu",
    "tokenizer": "bert-base-uncased",
    "bert_init": None,
}

QFORMER_TINY_CONFIG = {
    **QFORMER_CONFIG,
    "encoder_width": 64,
    "hidden_size": 32,
    "num_layers": 2,
    "num_heads": 4,
    "intermediate_size": 64,
    "num_queries": 8,
    "max_position_embeddings": 64,
    "embed_dim": 16,
}

_PROVENANCE = (
    "BLIP-2 (Li et al. 2023, arXiv 2301.12597); layout and keys as LAVIS Blip2Qformer and "
    "transformers Blip2QFormerModel / Blip2ForImageTextRetrieval"
)


@hookimpl
def blip2kit_register(registry: Registry) -> None:
    """Cards for qformer and qformer_tiny."""
    registry.add_bridge(
        ComponentCard(
            name="qformer",
            kind="bridge",
            factory=_QFORMER_FACTORY,
            config_class=_QFORMER_CONFIG,
            config=QFORMER_CONFIG,
            width=768,
            params=186_705_470,  # stage-1 (with text branch and heads), encoder_width 1408
            weights="initialised from bert-base-uncased; trained weights: the blip2-* models",
            provenance=_PROVENANCE,
            description="BLIP-2 Q-Former: BERT-base, 32 queries, cross-attention every 2nd layer",
            formats=CheckpointFormats(
                hf_model_types=("blip_2_qformer",),
                hf_config_reader="blip2kit.plugins.bridges.qformer:read_hf_qformer_config",
            ),
        )
    )
    registry.add_bridge(
        ComponentCard(
            name="qformer_tiny",
            kind="bridge",
            factory=_QFORMER_FACTORY,
            config_class=_QFORMER_CONFIG,
            config=QFORMER_TINY_CONFIG,
            width=32,
            params=1_043_934,
            provenance=_PROVENANCE,
            description="Q-Former with tiny dims (hidden 32, 2 layers, 8 queries) for tests and demos",
        )
    )
