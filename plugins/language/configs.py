"""Built-in configs of the language models: the released OPT and Flan-T5 shapes, and tiny twins.

Plain data (no torch, no transformers), so registering the cards stays instant; ``opt.py`` and
``t5.py`` build models from these.
"""

from __future__ import annotations

from typing import Any

_OPT_COMMON = {
    "pretrained": None,  # hub id or local directory of the OPT weights; None = random init
    "prompt": "",  # LAVIS pretraining prompt; "a photo of" for the COCO caption models
    "max_text_length": 32,
    "newline_token_id": None,  # eos for generation; None = the tokenizer's id of "\n" (50118)
    "extra_config": {},  # further OPTConfig fields, e.g. read from a checkpoint's text_config
}

# facebook/opt-2.7b and facebook/opt-6.7b config.json values (the OPT release).
OPT_CONFIGS: dict[str, dict[str, Any]] = {
    "opt_2.7b": {
        "vocab_size": 50272, "hidden_size": 2560, "num_hidden_layers": 32, "num_attention_heads": 32,
        "ffn_dim": 10240, "max_position_embeddings": 2048, "word_embed_proj_dim": 2560,
        "tokenizer": "facebook/opt-2.7b", **_OPT_COMMON,
    },
    "opt_6.7b": {
        "vocab_size": 50272, "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
        "ffn_dim": 16384, "max_position_embeddings": 2048, "word_embed_proj_dim": 4096,
        "tokenizer": "facebook/opt-6.7b", **_OPT_COMMON,
    },
    # Same code, small dims: for tests, the demo and CI (tests bring their own tokenizer).
    "opt_tiny": {
        "vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "ffn_dim": 128, "max_position_embeddings": 128, "word_embed_proj_dim": 64,
        "tokenizer": None, **_OPT_COMMON,
    },
}


_T5_COMMON = {
    "pretrained": None,  # hub id or local directory of the T5 weights; None = random init
    "prompt": "",  # a fixed encoder input; when set, the whole caption is the decoder target
    "max_text_length": 32,
    "extra_config": {},  # further T5Config fields, e.g. read from a checkpoint's text_config
}

# google/flan-t5-{xl,xxl} config.json values, with LAVIS' (and the HF converter's) gelu override.
_FLAN_T5 = {
    "vocab_size": 32128, "d_kv": 64, "num_layers": 24, "num_decoder_layers": 24,
    "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu", "layer_norm_epsilon": 1e-6,
    "tie_word_embeddings": False, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 1,
    "decoder_start_token_id": 0,
}
T5_CONFIGS: dict[str, dict[str, Any]] = {
    "flant5_xl": {**_FLAN_T5, "d_model": 2048, "d_ff": 5120, "num_heads": 32,
                  "tokenizer": "google/flan-t5-xl", **_T5_COMMON},
    "flant5_xxl": {**_FLAN_T5, "d_model": 4096, "d_ff": 10240, "num_heads": 64,
                   "tokenizer": "google/flan-t5-xxl", **_T5_COMMON},
    "flant5_tiny": {**_FLAN_T5, "vocab_size": 512, "d_model": 64, "d_kv": 16, "d_ff": 128,
                    "num_layers": 2, "num_decoder_layers": 2, "num_heads": 4,
                    "relative_attention_max_distance": 32, "tokenizer": None, **_T5_COMMON},
}


__all__ = ["OPT_CONFIGS", "T5_CONFIGS"]
