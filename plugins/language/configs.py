"""Built-in configs of the language models: the released OPT and Flan-T5 shapes, and tiny twins.

Plain data (no torch, no transformers), so registering the cards stays instant; ``opt.py`` and
``t5.py`` build models from these. The typed configs at the end (the cards' ``config_class``)
check a merged config before anything is built.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from blip2kit.core.configs import ComponentConfig, divisors

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


# -- typed configs (the cards' config_class) ------------------------------------------------------

_POSITIVE = "a positive integer"


class _LanguageSettings(ComponentConfig):
    """The blip2kit settings every built-in language model has (beside its architecture)."""

    pretrained: str | None = Field(None, description="hub id or local directory of the weights; None: random")
    tokenizer: str | None = Field(None, description="hub id or local directory of the tokenizer")
    prompt: str = Field("", description="text put before every caption (LAVIS prompt), a string")
    max_text_length: int = Field(32, gt=0, description=f"tokens per text, {_POSITIVE}")
    extra_config: dict[str, Any] = Field(
        default_factory=dict, description="further transformers config fields, e.g. a checkpoint's text_config"
    )


class OPTComponentConfig(_LanguageSettings):
    """OPT (``opt_2.7b``, ``opt_6.7b``, ``opt_tiny``): OPTConfig fields plus blip2kit settings."""

    vocab_size: int = Field(50272, gt=0, description=_POSITIVE)
    hidden_size: int = Field(2560, gt=0, description="model width, a positive multiple of num_attention_heads")
    num_hidden_layers: int = Field(32, gt=0, description=_POSITIVE)
    num_attention_heads: int = Field(32, gt=0, description="a positive divisor of hidden_size")
    ffn_dim: int = Field(10240, gt=0, description=_POSITIVE)
    max_position_embeddings: int = Field(2048, gt=0, description=_POSITIVE)
    word_embed_proj_dim: int = Field(2560, gt=0, description=_POSITIVE)
    newline_token_id: int | None = Field(
        None, ge=0, description="token id generation stops at; None: the tokenizer's id of '\\n'"
    )

    @model_validator(mode="after")
    def _shapes_fit(self) -> OPTComponentConfig:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} does not divide hidden_size "
                f"{self.hidden_size}; use one of {divisors(self.hidden_size)}"
            )
        if self.newline_token_id is not None and self.newline_token_id >= self.vocab_size:
            raise ValueError(
                f"newline_token_id {self.newline_token_id} is outside the vocabulary 0 .. {self.vocab_size - 1}"
            )
        return self



def _activations() -> list[str]:
    """The activation names transformers' T5 can run (imported when a T5 config is checked)."""
    from transformers.activations import ACT2FN

    return sorted(ACT2FN)


class T5ComponentConfig(_LanguageSettings):
    """Flan-T5 (``flant5_xl``, ``flant5_xxl``, ``flant5_tiny``): T5Config fields plus blip2kit settings."""

    vocab_size: int = Field(32128, gt=0, description=_POSITIVE)
    d_model: int = Field(2048, gt=0, description=_POSITIVE)
    d_kv: int = Field(64, gt=0, description=_POSITIVE)
    d_ff: int = Field(5120, gt=0, description=_POSITIVE)
    num_layers: int = Field(24, gt=0, description=_POSITIVE)
    num_decoder_layers: int = Field(24, gt=0, description=_POSITIVE)
    num_heads: int = Field(32, gt=0, description=_POSITIVE)
    relative_attention_num_buckets: int = Field(32, gt=0, description=_POSITIVE)
    relative_attention_max_distance: int = Field(128, gt=0, description=_POSITIVE)
    feed_forward_proj: str = Field(
        "gated-gelu", description="a transformers activation name, or 'gated-' + one (e.g. 'gated-gelu')"
    )
    dense_act_fn: str = Field("gelu", description="a transformers activation name, e.g. 'gelu', 'relu'")
    layer_norm_epsilon: float = Field(1e-6, gt=0, description="a number > 0")
    tie_word_embeddings: bool = Field(False, description="True or False")
    pad_token_id: int = Field(0, ge=0, description="a token id >= 0")
    eos_token_id: int = Field(1, ge=0, description="a token id >= 0")
    bos_token_id: int = Field(1, ge=0, description="a token id >= 0")
    decoder_start_token_id: int = Field(0, ge=0, description="a token id >= 0")

    @model_validator(mode="after")
    def _known_activations(self) -> T5ComponentConfig:
        activations = _activations()
        if self.feed_forward_proj.removeprefix("gated-") not in activations:
            raise ValueError(
                f"feed_forward_proj {self.feed_forward_proj!r} is not an activation transformers' T5 "
                f"runs; use an activation or 'gated-' + one, activations: {', '.join(activations)}"
            )
        if self.dense_act_fn not in activations:
            raise ValueError(
                f"dense_act_fn {self.dense_act_fn!r} is not known; use one of {', '.join(activations)}"
            )
        for name in ("pad_token_id", "eos_token_id", "bos_token_id", "decoder_start_token_id"):
            if getattr(self, name) >= self.vocab_size:
                raise ValueError(f"{name} {getattr(self, name)} is outside the vocabulary 0 .. {self.vocab_size - 1}")
        return self


__all__ = ["OPT_CONFIGS", "OPTComponentConfig", "T5_CONFIGS", "T5ComponentConfig"]
