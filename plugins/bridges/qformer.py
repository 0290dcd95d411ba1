"""The BLIP-2 Q-Former: a BERT-base shaped bridge whose learned queries cross-attend to image features.

One readable file: the layers, the stage-1 heads (ITC projections, ITM head, temperature, BERT LM
head), the tokenizer with its ``[DEC]`` bos token, initialisation from a local BERT checkpoint, the
stage-2 view (``drop_text_branch``) and key conversion to and from LAVIS ``.pth`` and Hugging Face
``Blip2*`` checkpoints. Architecture facts: BLIP2_REFERENCE.md sections 1, 2 and 7.

Attention masks are boolean (True = may attend) and go straight to
``torch.nn.functional.scaled_dot_product_attention``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pydantic import field_validator, model_validator

from blip2kit.core.checkpoints import CheckpointError, read_state
from blip2kit.core.configs import ComponentConfig, divisors
from blip2kit.core.interfaces import (
    CheckpointFormat,
    ConvertedState,
    ImageKeyValues,
    QueryState,
    RepresentationBridge,
)
from blip2kit.plugins.activations import activation

DECODER_BOS_TOKEN = "[DEC]"


class QFormerConfig(ComponentConfig):
    """Every knob of the Q-Former; the card's config dict holds exactly these keys (the card's
    ``config_class``: sizes positive, heads dividing the width, dropout in [0, 1))."""

    encoder_width: int = 1408  # width of the image features it reads (1408 EVA ViT-g, 1024 CLIP ViT-L)
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    num_queries: int = 32
    cross_attention_freq: int = 2  # layer i cross-attends to the image when i % freq == 0
    vocab_size: int = 30523  # bert-base-uncased 30522 + [DEC]
    max_position_embeddings: int = 512
    embed_dim: int = 256  # ITC feature width
    max_text_length: int = 32  # stage-1 captions are padded/truncated to this many tokens
    dropout: float = 0.1  # hidden and attention-probability dropout, as BERT
    layer_norm_eps: float = 1e-12
    ln_vision_eps: float = 1e-5  # LAVIS ln_vision uses PyTorch's default; HF post_layernorm uses 1e-6
    initializer_range: float = 0.02
    pad_token_id: int = 0
    hidden_act: str = "gelu"  # FFN and LM-head activation (HF ACT2FN name)
    tokenizer: str = "bert-base-uncased"  # a local directory or hub id, loaded when first needed
    bert_init: str | None = None  # a local BERT checkpoint directory; None keeps the random init

    @field_validator(
        "encoder_width", "hidden_size", "num_layers", "num_heads", "intermediate_size",
        "num_queries", "cross_attention_freq", "vocab_size", "max_position_embeddings",
        "embed_dim", "max_text_length",
    )
    @classmethod
    def _positive(cls, value: int) -> int:
        if value <= 0:
            raise ValueError("must be a positive integer")
        return value

    @field_validator("layer_norm_eps", "ln_vision_eps", "initializer_range")
    @classmethod
    def _positive_number(cls, value: float) -> float:
        if not value > 0:
            raise ValueError("must be a number > 0")
        return value

    @field_validator("hidden_act")
    @classmethod
    def _known_activation(cls, value: str) -> str:
        activation(value, "qformer hidden_act")  # refuses names it does not implement
        return value

    @field_validator("dropout")
    @classmethod
    def _probability(cls, value: float) -> float:
        if not 0 <= value < 1:
            raise ValueError("dropout must be in [0, 1) (0 turns it off)")
        return value

    @model_validator(mode="after")
    def _shapes_fit(self) -> QFormerConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"num_heads {self.num_heads} does not divide hidden_size {self.hidden_size}; use one "
                f"of {divisors(self.hidden_size)}"
            )
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"pad_token_id {self.pad_token_id} is outside the vocabulary 0 .. {self.vocab_size - 1}")
        return self

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> QFormerConfig:
        known = set(cls.model_fields)
        unknown = set(config) - known
        if unknown:
            raise ValueError(
                f"qformer config has unknown key(s) {sorted(unknown)}; its keys are {sorted(known)}"
            )
        return cls.model_validate(dict(config))

    def has_cross_attention(self, layer_idx: int) -> bool:
        return layer_idx % self.cross_attention_freq == 0


# ------------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------------


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input dtype (LAVIS ln_vision), cast back after."""

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        y = F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)
        return y.to(x.dtype)


class Attention(nn.Module):
    """BERT attention block: multi-head attention, output dense, dropout, residual + LayerNorm.

    Self-attention when ``key_value_width == hidden``; cross-attention reads K/V from the image.
    """

    def __init__(self, config: QFormerConfig, key_value_width: int) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.hidden_size // config.num_heads
        self.dropout_p = config.dropout
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(key_value_width, config.hidden_size)
        self.value = nn.Linear(key_value_width, config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def _heads(self, x: Tensor) -> Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, L, hd)

    def key_value(self, source: Tensor) -> tuple[Tensor, Tensor]:
        """source [B, N, kv_width] -> (K, V), each [B, nh, N, hd]."""
        return self._heads(self.key(source)), self._heads(self.value(source))

    def forward(
        self,
        hidden: Tensor,
        context: Tensor | None = None,
        mask: Tensor | None = None,
        past_key_value: tuple[Tensor, Tensor] | None = None,
        context_key_value: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """hidden [B, L, H]; context [B, N, kv_width] (None: self-attention), or its K/V already
        projected as ``context_key_value`` (cross-attention reusing an image's K/V); mask bool
        broadcastable to [B, nh, L, keys]. Returns the block output [B, L, H] and this call's
        own (K, V)."""
        q = self._heads(self.query(hidden))  # (B, nh, L, hd)
        if context_key_value is not None:
            k, v = context_key_value  # (B, nh, N, hd) each
        else:
            k, v = self.key_value(hidden if context is None else context)  # (B, nh, N, hd) each
        present = (k, v)
        if past_key_value is not None:
            # Text decoding: the cached query keys/values come first, then the text's own.
            k = torch.cat([past_key_value[0], k], dim=2)  # (B, nh, Q + L, hd)
            v = torch.cat([past_key_value[1], v], dim=2)
        attended = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout_p if self.training else 0.0
        )  # (B, nh, L, hd)
        attended = attended.transpose(1, 2).reshape(hidden.shape)  # (B, L, H)
        output = self.norm(self.dropout(self.dense(attended)) + hidden)
        return output, present


class FeedForward(nn.Module):
    """BERT FFN: dense -> GELU -> dense, dropout, residual + LayerNorm."""

    def __init__(self, config: QFormerConfig) -> None:
        super().__init__()
        self.fc_in = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc_out = nn.Linear(config.intermediate_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)
        self.act = activation(config.hidden_act, "qformer hidden_act")

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.dropout(self.fc_out(self.act(self.fc_in(x)))) + x)


class QFormerLayer(nn.Module):
    """Self-attention over [queries ; text], cross-attention for the queries only, two FFNs."""

    def __init__(self, config: QFormerConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attention = Attention(config, config.hidden_size)
        self.cross_attention = (
            Attention(config, config.encoder_width) if config.has_cross_attention(layer_idx) else None
        )
        self.query_ffn = FeedForward(config)
        self.text_ffn: FeedForward | None = FeedForward(config)

    def forward(
        self,
        hidden: Tensor,
        query_length: int,
        self_mask: Tensor | None = None,
        image_key_value: tuple[Tensor, Tensor] | None = None,
        image_mask: Tensor | None = None,
        past_key_value: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """hidden [B, query_length + T, H] -> same shape, plus the self-attention (K, V) to cache.

        The queries cross-attend to the image through its projected ``image_key_value``."""
        attended, present = self.self_attention(hidden, mask=self_mask, past_key_value=past_key_value)
        queries = attended[:, :query_length]  # (B, Q, H)
        text = attended[:, query_length:]  # (B, T, H)
        parts = []
        if query_length > 0:
            if self.cross_attention is not None:
                if image_key_value is None:
                    raise ValueError("a Q-Former pass with queries needs the image's K/V to cross-attend to")
                queries, _ = self.cross_attention(queries, mask=image_mask, context_key_value=image_key_value)
            parts.append(self.query_ffn(queries))
        if text.shape[1] > 0:
            if self.text_ffn is None:
                raise RuntimeError(
                    "this Q-Former is the stage-2 view (drop_text_branch removed the text FFN); "
                    "text cannot pass through it. Build a stage-1 'vision+qformer' model for text."
                )
            parts.append(self.text_ffn(text))
        return torch.cat(parts, dim=1), present


class Embeddings(nn.Module):
    """Word + absolute position embeddings for text (no token types), LayerNorm and dropout over
    [queries ; text]. Queries get no position embedding; text takes positions 0..T-1."""

    def __init__(self, config: QFormerConfig) -> None:
        super().__init__()
        self.word_embeddings: nn.Embedding | None = nn.Embedding(
            config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id
        )
        self.position_embeddings: nn.Embedding | None = nn.Embedding(
            config.max_position_embeddings, config.hidden_size
        )
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, input_ids: Tensor | None = None, query_embeds: Tensor | None = None) -> Tensor:
        parts = [] if query_embeds is None else [query_embeds]  # (B, Q, H)
        if input_ids is not None:
            if self.word_embeddings is None or self.position_embeddings is None:
                raise RuntimeError(
                    "this Q-Former is the stage-2 view and has no word/position embeddings; it "
                    "reads no text. Use a stage-1 'vision+qformer' model for text."
                )
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # (T,)
            text = self.word_embeddings(input_ids) + self.position_embeddings(positions)  # (B, T, H)
            parts.append(text.to(parts[0].dtype) if parts else text)
        return self.dropout(self.norm(torch.cat(parts, dim=1)))


class LMHead(nn.Module):
    """BERT LM head: dense + GELU + LayerNorm, then a decoder tied to the word embeddings, + bias."""

    def __init__(self, config: QFormerConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.act = activation(config.hidden_act, "qformer hidden_act")

    def forward(self, hidden: Tensor, word_embeddings: Tensor) -> Tensor:
        hidden = self.norm(self.act(self.dense(hidden)))  # (B, T, H)
        return F.linear(hidden, word_embeddings, self.bias)  # (B, T, V)


# ------------------------------------------------------------------------------------------------
# The Q-Former
# ------------------------------------------------------------------------------------------------


class QFormer(RepresentationBridge):
    """BLIP-2 Q-Former with its stage-1 heads; ``drop_text_branch`` leaves the stage-2 bridge."""

    def __init__(self, config: QFormerConfig, tokenizer: Any = None) -> None:
        super().__init__()
        self.config = config
        self.input_width = config.encoder_width
        self.hidden_size = config.hidden_size
        self.num_queries = config.num_queries
        self.embed_dim = config.embed_dim
        self.max_text_length = config.max_text_length
        self._tokenizer = tokenizer
        self.has_text_branch = True

        self.ln_vision = FP32LayerNorm(config.encoder_width, eps=config.ln_vision_eps)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_queries, config.hidden_size))
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList(QFormerLayer(config, i) for i in range(config.num_layers))
        # Stage-1 heads.
        self.vision_proj: nn.Linear | None = nn.Linear(config.hidden_size, config.embed_dim)
        self.text_proj: nn.Linear | None = nn.Linear(config.hidden_size, config.embed_dim)
        self.itm_head: nn.Linear | None = nn.Linear(config.hidden_size, 2)
        self.temp: nn.Parameter | None = nn.Parameter(torch.tensor(0.07))
        self.lm_head: LMHead | None = LMHead(config)
        self.reset_parameters()

    # -- initialisation -------------------------------------------------------------------------

    def reset_parameters(self) -> None:
        """BERT's init (normal(0, 0.02) weights, zero biases, unit LayerNorms); queries std 0.02;
        the query FFN starts as a copy of the text FFN, as LAVIS copies every `*_query` weight."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.padding_idx is not None:
                    with torch.no_grad():
                        module.weight[module.padding_idx].zero_()
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.query_tokens, mean=0.0, std=std)
        self.copy_text_ffn_to_query_ffn()

    @torch.no_grad()
    def copy_text_ffn_to_query_ffn(self) -> None:
        for layer in self.layers:
            if layer.text_ffn is not None:
                layer.query_ffn.load_state_dict(layer.text_ffn.state_dict())

    def load_bert(self, directory: str | Path) -> None:
        """Initialise from a local Hugging Face BERT checkpoint directory (bert-base-uncased layout).

        Copies embeddings, self-attention, the text FFN (and into the query FFN) and the LM head;
        cross-attention keeps its random init; the word table grows by the [DEC] row.
        """
        bert_state, bert_config = _read_bert_checkpoint(directory)
        for ours, theirs in (
            ("hidden_size", "hidden_size"),
            ("num_layers", "num_hidden_layers"),
            ("num_heads", "num_attention_heads"),
            ("intermediate_size", "intermediate_size"),
        ):
            if bert_config.get(theirs) != getattr(self.config, ours):
                raise ValueError(
                    f"BERT checkpoint {directory} has {theirs}={bert_config.get(theirs)} but this "
                    f"Q-Former has {ours}={getattr(self.config, ours)}; set the Q-Former's config to "
                    "match the checkpoint or point bert_init at a matching BERT"
                )
        own = self.state_dict()
        loaded: dict[str, Tensor] = {}
        for key in own:
            lavis_key = _own_to_external(key, "lavis")
            if lavis_key is None or not lavis_key.startswith("Qformer."):
                continue
            bert_key = lavis_key.removeprefix("Qformer.")
            if bert_key not in bert_state:
                continue  # cross-attention and the query FFN are not in BERT
            value = bert_state[bert_key]
            if value.shape != own[key].shape and key in ("embeddings.word_embeddings.weight", "lm_head.bias"):
                # The [DEC] row(s) BERT lacks keep their random init (bias: zero).
                grown = own[key].clone()
                grown[: value.shape[0]] = value
                value = grown
            if value.shape != own[key].shape:
                raise ValueError(
                    f"BERT checkpoint {directory}: {bert_key} has shape {tuple(value.shape)} but "
                    f"Q-Former {key} has {tuple(own[key].shape)}"
                )
            loaded[key] = value
        missing_text = [k for k in own if ".text_ffn." in k and k not in loaded]
        if missing_text:
            raise ValueError(
                f"BERT checkpoint {directory} lacks the FFN weights for {missing_text[:3]}...; is it "
                "a BERT (bert.encoder.layer.*) checkpoint?"
            )
        self.load_state_dict(loaded, strict=False)
        self.copy_text_ffn_to_query_ffn()

    # -- tokenizer ------------------------------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        """BERT uncased WordPiece + bos token [DEC], loaded on first use (never at build time)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.config.tokenizer)
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, value: Any) -> None:
        self._tokenizer = value

    @property
    def bos_token_id(self) -> int:
        return self.tokenizer.bos_token_id

    @property
    def pad_token_id(self) -> int:
        return self.config.pad_token_id

    def tokenize(self, texts: Sequence[str], max_length: int | None = None) -> dict[str, Tensor]:
        tokens = self.tokenizer(
            list(texts),
            padding="max_length",
            truncation=True,
            max_length=max_length or self.max_text_length,
            return_tensors="pt",
        )
        device = self.query_tokens.device
        return {
            "input_ids": tokens["input_ids"].to(device),
            "attention_mask": tokens["attention_mask"].to(device),
        }

    # -- passes ---------------------------------------------------------------------------------

    def prepare_image(self, image_features: Tensor) -> Tensor:
        """The trainable input LayerNorm (LAVIS ln_vision) in the bridge's dtype."""
        return self.ln_vision(image_features).to(self.query_tokens.dtype)  # (B, N, encoder_width)

    def _run(
        self,
        hidden: Tensor,
        query_length: int,
        self_mask: Tensor | None = None,
        image_key_values: ImageKeyValues | None = None,
        image_mask: Tensor | None = None,
        past_key_values: Sequence[tuple[Tensor, Tensor]] | None = None,
    ) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        cross_mask = None if image_mask is None else image_mask.bool()[:, None, None, :]  # (B, 1, 1, N)
        presents = []
        for i, layer in enumerate(self.layers):
            hidden, present = layer(
                hidden,
                query_length,
                self_mask=self_mask,
                image_key_value=None if image_key_values is None else image_key_values.layers[i],
                image_mask=cross_mask,
                past_key_value=None if past_key_values is None else past_key_values[i],
            )
            presents.append(present)
        return hidden, presents

    def image_key_values(self, image_embeds: Tensor) -> ImageKeyValues:
        """Each cross-attention layer's K/V of prepared image_embeds [B, N, encoder_width]."""
        return ImageKeyValues(tuple(
            None if layer.cross_attention is None else layer.cross_attention.key_value(image_embeds)
            for layer in self.layers
        ))

    def encode_image(self, image_embeds: Tensor, image_mask: Tensor | None = None) -> QueryState:
        """Pass (a): queries alone, bidirectional, cross-attending to prepared image_embeds.

        The state keeps the images' cross-attention K/V, which stage 1's ITM pairs reuse."""
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)  # (B, Q, H)
        hidden = self.embeddings(query_embeds=queries)
        image_key_values = self.image_key_values(image_embeds)
        query_output, presents = self._run(
            hidden, self.num_queries, image_key_values=image_key_values, image_mask=image_mask
        )
        return QueryState(query_output=query_output, past_key_values=presents,
                          image_key_values=image_key_values)

    def forward(self, image_embeds: Tensor, image_mask: Tensor | None = None) -> Tensor:
        """Encoder features [B, N, encoder_width] -> query_output [B, Q, H] (ln_vision included)."""
        return self.encode_image(self.prepare_image(image_embeds), image_mask).query_output

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Pass (b): text alone with the BERT padding mask -> [B, T, H]."""
        hidden = self.embeddings(input_ids=input_ids)  # (B, T, H)
        mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
        text_output, _ = self._run(hidden, 0, self_mask=mask)
        return text_output

    def image_features(self, query_output: Tensor) -> Tensor:
        return F.normalize(self._head("vision_proj")(query_output), dim=-1)  # (B, Q, D)

    def text_features(self, text_output: Tensor) -> Tensor:
        return F.normalize(self._head("text_proj")(text_output[:, 0]), dim=-1)  # (B, D)

    def match_logits(
        self, image_embeds: Tensor, image_mask: Tensor | None, input_ids: Tensor, attention_mask: Tensor
    ) -> Tensor:
        """Pass (c): [queries ; text] fully bidirectional (padding only) -> ITM logits [B, 2]."""
        return self.match_logits_from_key_values(
            self.image_key_values(image_embeds), image_mask, input_ids, attention_mask
        )

    def match_logits_from_key_values(
        self,
        image_key_values: ImageKeyValues,
        image_mask: Tensor | None,
        input_ids: Tensor,
        attention_mask: Tensor,
    ) -> Tensor:
        """Pass (c) with each pair's image given as its cross-attention K/V (one row per pair)."""
        batch = input_ids.shape[0]
        if image_key_values.batch_size != batch:
            raise ValueError(
                f"ITM got image K/V for {image_key_values.batch_size} images but {batch} texts; "
                "give one image per pair (select the pairs' rows first)"
            )
        queries = self.query_tokens.expand(batch, -1, -1)  # (B, Q, H)
        hidden = self.embeddings(input_ids=input_ids, query_embeds=queries)  # (B, Q + T, H)
        query_mask = torch.ones(batch, self.num_queries, dtype=torch.bool, device=input_ids.device)
        mask = torch.cat([query_mask, attention_mask.bool()], dim=1)[:, None, None, :]  # (B, 1, 1, Q+T)
        output, _ = self._run(
            hidden, self.num_queries, self_mask=mask, image_key_values=image_key_values, image_mask=image_mask
        )
        logits = self._head("itm_head")(output[:, : self.num_queries])  # (B, Q, 2)
        return logits.mean(dim=1)  # (B, 2)

    def caption_logits(self, query_state: QueryState, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Pass (d): causal text attending to all cached query K/V (queries never see text)."""
        if self.lm_head is None:
            raise RuntimeError("this Q-Former is the stage-2 view; its LM head was dropped")
        batch, length = input_ids.shape
        hidden = self.embeddings(input_ids=input_ids)  # (B, T, H)
        num_prefix = query_state.past_key_values[0][0].shape[2]
        causal = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).tril()  # (T, T)
        prefix = torch.ones(length, num_prefix, dtype=torch.bool, device=input_ids.device)  # (T, Q)
        rows = torch.cat([prefix, causal], dim=1)  # (T, Q + T)
        keys = torch.cat(
            [torch.ones(batch, num_prefix, dtype=torch.bool, device=input_ids.device), attention_mask.bool()],
            dim=1,
        )  # (B, Q + T)
        mask = rows[None, None] & keys[:, None, None, :]  # (B, 1, T, Q + T)
        text_output, _ = self._run(hidden, 0, self_mask=mask, past_key_values=query_state.past_key_values)
        return self.lm_head(text_output, self.embeddings.word_embeddings.weight)  # (B, T, V)

    def _head(self, name: str) -> nn.Module:
        head = getattr(self, name)
        if head is None:
            raise RuntimeError(
                f"this Q-Former is the stage-2 view; drop_text_branch removed {name}, which only "
                "stage 1 uses"
            )
        return head

    # -- stage 2 --------------------------------------------------------------------------------

    def drop_text_branch(self) -> None:
        """Remove what only stage 1 uses: word/position embeddings, every text FFN, LM head,
        ITC/ITM heads and temp (LAVIS deletes the first three; the heads are unused in stage 2)."""
        self.embeddings.word_embeddings = None
        self.embeddings.position_embeddings = None
        for layer in self.layers:
            layer.text_ffn = None
        self.lm_head = None
        self.vision_proj = None
        self.text_proj = None
        self.itm_head = None
        self.temp = None
        self.has_text_branch = False

    # -- checkpoints ----------------------------------------------------------------------------

    def convert_external_state(self, state: Mapping[str, Tensor], source: CheckpointFormat) -> ConvertedState:
        """Pick the Q-Former's keys out of a whole LAVIS or HF checkpoint.

        Stage-1-only keys that this view does not hold (after drop_text_branch), LAVIS's tied
        decoder copies and the ``position_ids`` buffer count as consumed: they are the Q-Former's
        and deliberately unused, as LAVIS's non-strict stage-2 load ignores them.
        """
        _check_format(source)
        own = self.state_dict()
        converted = ConvertedState()
        for key, tensor in own.items():
            external = _own_to_external(key, source)
            if external is None or external not in state:
                continue
            value = state[external]
            if tuple(value.shape) != tuple(tensor.shape):
                raise ValueError(
                    f"{source} checkpoint key {external} has shape {tuple(value.shape)} but Q-Former "
                    f"{key} expects {tuple(tensor.shape)}; was the checkpoint made for another "
                    "encoder width, query count or vocabulary?"
                )
            converted.state[key] = value
            converted.consumed.add(external)
        for key in _full_own_keys(self.config):
            external = _own_to_external(key, source)
            if external is not None and external in state and key not in own:
                converted.consumed.add(external)
        for extra in _tied_and_buffer_keys(source):
            if extra in state:
                converted.consumed.add(extra)
        _check_tied_copies(state, source)
        return converted

    def export_external_state(self, target: CheckpointFormat) -> dict[str, Tensor]:
        """Own weights under ``target`` key names. HF has no place for temp and the LM head, so
        they are left out there; LAVIS also gets the tied decoder copies it stores."""
        _check_format(target)
        exported = {}
        for key, tensor in self.state_dict().items():
            external = _own_to_external(key, target)
            if external is not None:
                exported[external] = tensor
        if target == "lavis" and self.lm_head is not None:
            exported["Qformer.cls.predictions.decoder.weight"] = self.embeddings.word_embeddings.weight.data
            exported["Qformer.cls.predictions.decoder.bias"] = self.lm_head.bias.data
        return exported

    def hf_config(self) -> dict[str, Any]:
        c = self.config
        return {
            "qformer_config": {
                "vocab_size": c.vocab_size,
                "hidden_size": c.hidden_size,
                "num_hidden_layers": c.num_layers,
                "num_attention_heads": c.num_heads,
                "intermediate_size": c.intermediate_size,
                "hidden_act": c.hidden_act,
                "hidden_dropout_prob": c.dropout,
                "attention_probs_dropout_prob": c.dropout,
                "max_position_embeddings": c.max_position_embeddings,
                "initializer_range": c.initializer_range,
                "layer_norm_eps": c.layer_norm_eps,
                "pad_token_id": c.pad_token_id,
                "cross_attention_frequency": c.cross_attention_freq,
                "encoder_hidden_size": c.encoder_width,
                "use_qformer_text_input": self.has_text_branch,
            },
            "num_query_tokens": c.num_queries,
            "image_text_hidden_size": c.embed_dim,
        }


# ------------------------------------------------------------------------------------------------
# Key names
# ------------------------------------------------------------------------------------------------

# Own sub-key inside a layer -> (LAVIS/BERT name, HF name) inside `encoder.layer.{i}.`
_LAYER_NAMES = {
    "self_attention.query": ("attention.self.query", "attention.attention.query"),
    "self_attention.key": ("attention.self.key", "attention.attention.key"),
    "self_attention.value": ("attention.self.value", "attention.attention.value"),
    "self_attention.dense": ("attention.output.dense", "attention.output.dense"),
    "self_attention.norm": ("attention.output.LayerNorm", "attention.output.LayerNorm"),
    "cross_attention.query": ("crossattention.self.query", "crossattention.attention.query"),
    "cross_attention.key": ("crossattention.self.key", "crossattention.attention.key"),
    "cross_attention.value": ("crossattention.self.value", "crossattention.attention.value"),
    "cross_attention.dense": ("crossattention.output.dense", "crossattention.output.dense"),
    "cross_attention.norm": ("crossattention.output.LayerNorm", "crossattention.output.LayerNorm"),
    "query_ffn.fc_in": ("intermediate_query.dense", "intermediate_query.dense"),
    "query_ffn.fc_out": ("output_query.dense", "output_query.dense"),
    "query_ffn.norm": ("output_query.LayerNorm", "output_query.LayerNorm"),
    "text_ffn.fc_in": ("intermediate.dense", "intermediate.dense"),
    "text_ffn.fc_out": ("output.dense", "output.dense"),
    "text_ffn.norm": ("output.LayerNorm", "output.LayerNorm"),
}

# Own top-level key -> (LAVIS name, HF name or None where HF has no such weight)
_TOP_NAMES = {
    "query_tokens": ("query_tokens", "query_tokens"),
    "ln_vision.weight": ("ln_vision.weight", "vision_model.post_layernorm.weight"),
    "ln_vision.bias": ("ln_vision.bias", "vision_model.post_layernorm.bias"),
    "embeddings.word_embeddings.weight": (
        "Qformer.bert.embeddings.word_embeddings.weight", "embeddings.word_embeddings.weight"),
    "embeddings.position_embeddings.weight": (
        "Qformer.bert.embeddings.position_embeddings.weight", "embeddings.position_embeddings.weight"),
    "embeddings.norm.weight": ("Qformer.bert.embeddings.LayerNorm.weight", "qformer.layernorm.weight"),
    "embeddings.norm.bias": ("Qformer.bert.embeddings.LayerNorm.bias", "qformer.layernorm.bias"),
    "vision_proj.weight": ("vision_proj.weight", "vision_projection.weight"),
    "vision_proj.bias": ("vision_proj.bias", "vision_projection.bias"),
    "text_proj.weight": ("text_proj.weight", "text_projection.weight"),
    "text_proj.bias": ("text_proj.bias", "text_projection.bias"),
    "itm_head.weight": ("itm_head.weight", "itm_head.weight"),
    "itm_head.bias": ("itm_head.bias", "itm_head.bias"),
    "temp": ("temp", None),
    "lm_head.dense.weight": ("Qformer.cls.predictions.transform.dense.weight", None),
    "lm_head.dense.bias": ("Qformer.cls.predictions.transform.dense.bias", None),
    "lm_head.norm.weight": ("Qformer.cls.predictions.transform.LayerNorm.weight", None),
    "lm_head.norm.bias": ("Qformer.cls.predictions.transform.LayerNorm.bias", None),
    "lm_head.bias": ("Qformer.cls.predictions.bias", None),
}

_LAYER_KEY = re.compile(r"^layers\.(\d+)\.(\w+\.\w+)\.(weight|bias)$")


def _own_to_external(key: str, fmt: str) -> str | None:
    """One own state_dict key -> its name in a LAVIS or HF checkpoint (None: no such weight there)."""
    column = 0 if fmt == "lavis" else 1
    if key in _TOP_NAMES:
        return _TOP_NAMES[key][column]
    match = _LAYER_KEY.match(key)
    if match is None or match.group(2) not in _LAYER_NAMES:
        raise KeyError(f"Q-Former key {key!r} has no external name; add it to _LAYER_NAMES/_TOP_NAMES")
    index, part, leaf = match.groups()
    prefix = "Qformer.bert.encoder.layer" if fmt == "lavis" else "qformer.encoder.layer"
    return f"{prefix}.{index}.{_LAYER_NAMES[part][column]}.{leaf}"


def _full_own_keys(config: QFormerConfig) -> list[str]:
    """Every own key of the full (stage-1) Q-Former for ``config``, without building it."""
    keys = list(_TOP_NAMES)
    for i in range(config.num_layers):
        for part in _LAYER_NAMES:
            if part.startswith("cross_attention") and not config.has_cross_attention(i):
                continue
            keys += [f"layers.{i}.{part}.weight", f"layers.{i}.{part}.bias"]
    return keys


def _tied_and_buffer_keys(fmt: str) -> tuple[str, ...]:
    if fmt == "lavis":
        return (
            "Qformer.cls.predictions.decoder.weight",
            "Qformer.cls.predictions.decoder.bias",
            "Qformer.bert.embeddings.position_ids",
        )
    return ("qformer.embeddings.position_ids", "embeddings.position_ids")


# LAVIS stores the BERT LM head's decoder as copies of tensors it is tied to; blip2kit keeps one.
_LAVIS_TIED_COPIES = {
    "Qformer.cls.predictions.decoder.weight": "Qformer.bert.embeddings.word_embeddings.weight",
    "Qformer.cls.predictions.decoder.bias": "Qformer.cls.predictions.bias",
}


def _check_tied_copies(state: Mapping[str, Tensor], fmt: str) -> None:
    """A tied copy must equal its pair: a file where they differ is damaged or not a BLIP-2 file,
    and loading one of the two would silently change the model."""
    if fmt != "lavis":
        return
    for copy, pair in _LAVIS_TIED_COPIES.items():
        if copy not in state or pair not in state or state[copy].is_meta or state[pair].is_meta:
            continue  # absent, or not read yet (meta: the check runs when the values are read)
        if not torch.equal(state[copy], state[pair]):
            raise CheckpointError(
                f"tied tensors {copy} and {pair} of the LAVIS checkpoint differ; they must be one "
                "tensor (the file is damaged or was edited): re-export it"
            )


def _check_format(fmt: str) -> None:
    if fmt not in ("lavis", "hf"):
        raise ValueError(f"unknown checkpoint format {fmt!r}; the Q-Former reads 'lavis' and 'hf'")


# ------------------------------------------------------------------------------------------------
# Tokenizer and BERT checkpoints
# ------------------------------------------------------------------------------------------------


def load_tokenizer(name_or_path: str | Path) -> Any:
    """BERT uncased WordPiece from a local directory (vocab.txt) or hub id, plus bos token [DEC]."""
    from transformers import BertTokenizer

    tokenizer = BertTokenizer.from_pretrained(str(name_or_path), truncation_side="right")
    # transformers builds an empty WordPiece when it finds no vocabulary (offline, wrong path)
    # instead of failing; every word would then become [UNK], so refuse it here.
    words = set(tokenizer.get_vocab()) - set(tokenizer.all_special_tokens)
    if not words:
        raise FileNotFoundError(
            f"no BERT vocabulary found at {str(name_or_path)!r}: give a directory with vocab.txt "
            "(bert-base-uncased layout) or a hub id that can be downloaded, as the Q-Former's "
            "`tokenizer` config"
        )
    if tokenizer.bos_token != DECODER_BOS_TOKEN:
        tokenizer.add_special_tokens({"bos_token": DECODER_BOS_TOKEN})
    return tokenizer


def _read_bert_checkpoint(directory: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(state dict with `bert.*`/`cls.*` keys, config.json) of a local HF BERT checkpoint."""
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"bert_init {directory} has no config.json; point it at a Hugging Face BERT checkpoint "
            "directory (config.json + model.safetensors or pytorch_model.bin)"
        )
    config = json.loads(config_path.read_text())
    state = read_state(directory)  # model.safetensors or pytorch_model.bin, weights only
    renamed = {}
    for key, value in state.items():
        # Old Google-converted checkpoints name LayerNorm parameters gamma/beta.
        key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        if not key.startswith(("bert.", "cls.")):
            key = "bert." + key  # a bare BertModel checkpoint
        renamed[key] = value
    return renamed, config


# ------------------------------------------------------------------------------------------------
# Factories (named by the cards in plugins/bridges/__init__.py)
# ------------------------------------------------------------------------------------------------


def build_qformer(config: Mapping[str, Any], device: torch.device | str | None = None) -> QFormer:
    qformer_config = QFormerConfig.from_dict(config)
    model = QFormer(qformer_config)
    if qformer_config.bert_init is not None:
        if str(device) == "meta":
            raise ValueError("bert_init cannot be loaded into a meta-device build; build on a real device")
        model.load_bert(qformer_config.bert_init)
    return model


# ------------------------------------------------------------------------------------------------
# Reading a Hugging Face Blip2Config (named by the cards' formats.hf_config_reader)
# ------------------------------------------------------------------------------------------------


def read_hf_qformer_config(
    qformer_config: Mapping[str, Any], blip2_config: Mapping[str, Any]
) -> tuple[str, dict[str, Any]]:
    """The ``qformer`` card's settings for an HF ``qformer_config`` (transformers' defaults for
    omitted fields); refuses settings this Q-Former does not implement, naming them."""
    from transformers import Blip2QFormerConfig, Blip2VisionConfig

    full = Blip2QFormerConfig.from_dict(dict(qformer_config))
    vision = Blip2VisionConfig.from_dict(dict(blip2_config.get("vision_config") or {}))
    position_type = getattr(full, "position_embedding_type", "absolute")
    if position_type != "absolute":
        raise ValueError(f"qformer_config.position_embedding_type {position_type!r} is not implemented "
                         "(only 'absolute')")
    if abs(full.hidden_dropout_prob - full.attention_probs_dropout_prob) > 1e-12:
        raise ValueError(
            f"qformer_config.hidden_dropout_prob {full.hidden_dropout_prob} differs from "
            f"attention_probs_dropout_prob {full.attention_probs_dropout_prob}; the Q-Former has one dropout"
        )
    activation(full.hidden_act, "qformer_config.hidden_act")
    return "qformer", {
        "hidden_size": full.hidden_size,
        "num_layers": full.num_hidden_layers,
        "num_heads": full.num_attention_heads,
        "intermediate_size": full.intermediate_size,
        "num_queries": blip2_config.get("num_query_tokens", 32),
        "cross_attention_freq": full.cross_attention_frequency,
        "vocab_size": full.vocab_size,
        "max_position_embeddings": full.max_position_embeddings,
        "embed_dim": blip2_config.get("image_text_hidden_size", 256),
        "layer_norm_eps": full.layer_norm_eps,
        "dropout": full.hidden_dropout_prob,
        "initializer_range": full.initializer_range,
        "pad_token_id": full.pad_token_id,
        "hidden_act": full.hidden_act,
        # HF's ln_vision is vision_model.post_layernorm, with the vision tower's eps.
        "ln_vision_eps": vision.layer_norm_eps,
    }


__all__ = [
    "DECODER_BOS_TOKEN",
    "read_hf_qformer_config",
    "QFormer",
    "QFormerConfig",
    "build_qformer",
    "load_tokenizer",
]
