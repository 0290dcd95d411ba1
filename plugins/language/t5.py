"""Flan-T5 as BLIP-2's frozen encoder-decoder language model (LAVIS ``blip2_t5.py``), on transformers.

The encoder reads [queries ; input text]; the decoder predicts the target text. Captions without a
target are split for prefix-LM training at a point drawn uniformly between token 1 and the middle
(the split the BLIP-2 authors describe in LAVIS issue #139; the released code has none).

Flan-T5 has its own, untied ``lm_head`` and no d_model**-0.5 decoder-output scaling. transformers
5.x's ``T5Config`` always ties embeddings and records the old tie flag as ``scale_decoder_outputs``,
so this file gives the head its own tensor whenever scaling is off (see ``untie_lm_head``).
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blip2kit.core.interfaces import CheckpointFormat, ConvertedState, GenerationOptions
from blip2kit.plugins.language.configs import T5_CONFIGS
from blip2kit.plugins.language.hf_base import (
    HFLanguageModel,
    architecture_config,
    load_pretrained,
    text_config_overrides,
)

IGNORE_INDEX = -100

def untie_lm_head(model: nn.Module) -> None:
    """Give ``lm_head`` its own tensor when the config says the head is separate (no rescale).

    T5Config forces ``tie_word_embeddings=True`` (it still ties the encoder/decoder tables to
    ``shared``), so the head would otherwise be the embedding table and a checkpoint's distinct
    head would overwrite, or be overwritten by, the embeddings.
    """
    if model.config.scale_decoder_outputs:
        return  # original T5: the head is the (rescaled) embedding table
    if model.lm_head.weight is model.shared.weight:
        model.lm_head.weight = nn.Parameter(model.shared.weight.detach().clone())
    # transformers' own re-tying (tie_weights, from_pretrained) must leave the head alone too.
    tied = getattr(model, "all_tied_weights_keys", None)
    if isinstance(tied, dict):
        tied.pop("lm_head.weight", None)


def prefix_lm_split(length: int, rng: random.Random | None = None) -> int:
    """Split point k of a caption of ``length`` tokens: uniform over 1 .. max(1, length // 2).

    The encoder reads tokens[:k] and the decoder predicts tokens[k:].
    """
    rng = rng or random
    return rng.randint(1, max(1, length // 2))


class T5LanguageModel(HFLanguageModel):
    """Frozen ``T5ForConditionalGeneration``: [queries ; input text] -> encoder, target -> decoder."""

    is_encoder_decoder = True
    lavis_prefix = "t5_model."
    lavis_projection_prefix = "t5_proj."

    def __init__(self, model: nn.Module, config: Mapping[str, Any]) -> None:
        super().__init__(model, config)
        self.rng = random.Random()  # split points; seed it for reproducible runs

    def cast_frozen(self, dtype: torch.dtype) -> None:
        """bf16 weights with the FFN output ``wo`` kept fp32 (HF ``_keep_in_fp32_modules``).

        Flan-T5 overflows in fp16 (HF docs; LAVIS #206), so fp16 is served as bf16.
        """
        if dtype == torch.float16:
            warnings.warn("Flan-T5 overflows in float16; casting the frozen T5 to bfloat16 instead")
            dtype = torch.bfloat16
        # Module by module, so wo is never rounded to half on its way (a cast back is not exact).
        for name, module in self.named_modules():
            target = torch.float32 if name.endswith(".wo") else dtype
            module._apply(lambda tensor, target=target: tensor.to(target) if tensor.is_floating_point()
                          else tensor, recurse=False)

    # -- tokens -----------------------------------------------------------------------------------

    def _device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def _tokenize(self, texts: Sequence[str], truncate: bool = True) -> dict[str, Tensor]:
        limit = {"truncation": True, "max_length": self.max_text_length} if truncate else {}
        tokens = self.tokenizer(list(texts), return_tensors="pt", padding="longest", **limit)
        return {"input_ids": tokens.input_ids.to(self._device()),
                "attention_mask": tokens.attention_mask.to(self._device())}

    def _pad(self, rows: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
        """Right-pad id lists -> (input_ids [B, T], attention_mask [B, T])."""
        width = max(len(row) for row in rows)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for index, row in enumerate(rows):
            ids[index, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[index, : len(row)] = 1
        return ids.to(self._device()), mask.to(self._device())

    def split_captions(self, captions: Sequence[str]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Prefix-LM split of each caption on token ids: (encoder tokens, decoder tokens), each
        ending with </s>. Splitting ids, not strings, keeps the two halves exactly the caption."""
        eos = self.tokenizer.eos_token_id
        encoder_rows, decoder_rows = [], []
        for caption in captions:
            ids = self.tokenizer(caption, add_special_tokens=False).input_ids[: self.max_text_length - 1]
            split = prefix_lm_split(len(ids), self.rng)
            encoder_rows.append(ids[:split] + [eos])
            decoder_rows.append(ids[split:] + [eos])
        encoder_ids, encoder_mask = self._pad(encoder_rows)
        decoder_ids, decoder_mask = self._pad(decoder_rows)
        return ({"input_ids": encoder_ids, "attention_mask": encoder_mask},
                {"input_ids": decoder_ids, "attention_mask": decoder_mask})

    # -- training ---------------------------------------------------------------------------------

    def loss(
        self,
        prefix_embeds: Tensor,
        prefix_mask: Tensor,
        input_text: Sequence[str],
        target_text: Sequence[str] | None = None,
    ) -> Tensor:
        """Prefix-LM loss: the decoder predicts the target from [queries ; input text]."""
        if target_text is not None:
            if len(target_text) != len(input_text):
                raise ValueError(
                    f"got {len(input_text)} input texts and {len(target_text)} targets; give one each"
                )
            encoder_tokens, decoder_tokens = self._tokenize(input_text), self._tokenize(target_text)
        elif self.prompt:
            encoder_tokens = self._tokenize([self.prompt] * len(input_text))
            decoder_tokens = self._tokenize(input_text)
        else:
            encoder_tokens, decoder_tokens = self.split_captions(input_text)

        inputs_embeds, attention_mask = self.prepend_soft_prompt(prefix_embeds, prefix_mask, encoder_tokens)
        labels = decoder_tokens["input_ids"].masked_fill(
            decoder_tokens["attention_mask"] == 0, IGNORE_INDEX
        )  # [B, T_out]
        return self.seq2seq_lm_loss(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            decoder_attention_mask=decoder_tokens["attention_mask"],
            labels=labels,
        )

    def seq2seq_lm_loss(
        self, *, inputs_embeds: Tensor, attention_mask: Tensor, decoder_attention_mask: Tensor, labels: Tensor
    ) -> Tensor:
        """Mean cross-entropy of the decoder's predictions of ``labels`` (-100 skipped), in fp32.

        The same loss as ``T5ForConditionalGeneration(labels=...)``: the decoder reads the labels
        shifted right behind its start token. But the LM head (d_model x vocabulary, the largest
        matmul per position) runs only where there is a label, not on the padding; and a half
        tower's loss is taken in fp32 (transformers' stays in half, 3 significant digits).
        """
        model = self.model
        encoded = model.encoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask).last_hidden_state
        decoded = model.decoder(
            input_ids=model.prepare_decoder_input_ids_from_labels(labels),
            attention_mask=decoder_attention_mask,
            encoder_hidden_states=encoded,
            encoder_attention_mask=attention_mask,
            use_cache=False,
        ).last_hidden_state  # (B, T_out, d_model)
        scored = labels != IGNORE_INDEX  # (B, T_out)
        hidden = decoded[scored]  # (K, d_model), K labelled positions
        if model.config.scale_decoder_outputs:  # original T5's tied head reads rescaled outputs
            hidden = hidden * model.model_dim**-0.5
        logits = model.lm_head(hidden)  # (K, V)
        return F.cross_entropy(logits.float(), labels[scored])

    # -- checkpoints ------------------------------------------------------------------------------

    def convert_external_state(self, state: Mapping[str, Tensor], source: CheckpointFormat) -> ConvertedState:
        """As the base class; a file without ``lm_head.weight`` gets the head transformers gives it.

        transformers 5 ties T5's head to ``shared`` whatever ``tie_word_embeddings`` says (the flag
        only turns the rescale off), so its saves omit the head; loading such a file, transformers
        uses the embedding table as the head, and so does this.
        """
        converted = super().convert_external_state(state, source)
        head, table = "model.lm_head.weight", "model.shared.weight"
        if head not in converted.state and table in converted.state:
            converted.state[head] = converted.state[table]
        return converted

    # -- generation -------------------------------------------------------------------------------

    def hf_config(self) -> dict[str, Any]:
        config = super().hf_config()
        # Older transformers read the untied head (and no rescale) from this flag.
        config["tie_word_embeddings"] = bool(self.model.config.scale_decoder_outputs)
        return config

    def generation_defaults(self, task: str) -> dict[str, Any]:
        defaults = super().generation_defaults(task)
        if task == "vqa":
            defaults["length_penalty"] = -1.0  # LAVIS predict_answers default for T5 (issue #99)
        return defaults

    @torch.no_grad()
    def generate(
        self,
        prefix_embeds: Tensor,
        prefix_mask: Tensor,
        prompts: Sequence[str],
        options: GenerationOptions,
    ) -> list[str]:
        """Decode from [queries ; prompt] in the encoder; stripped strings. Prompts are not truncated."""
        tokens = self._tokenize(list(prompts), truncate=False)
        return self.generate_after_soft_prompt(prefix_embeds, prefix_mask, tokens, options)

    def tokens_before_generation(self, prompt: str) -> int:
        """The decoder start token: what LAVIS' T5 ``min_length`` counts before new text."""
        return 1


def build_t5(config: Mapping[str, Any], device: torch.device | str | None = None) -> T5LanguageModel:
    """Factory of the Flan-T5 cards: random init from the built-in config, or ``pretrained`` weights."""
    from transformers import T5Config, T5ForConditionalGeneration

    pretrained = config.get("pretrained")
    fields = architecture_config(config)
    if pretrained and str(device) != "meta":
        # LAVIS runs Flan-T5 with plain gelu in the gated FFN (the checkpoint says gelu_new).
        overrides = {"dense_act_fn": fields["dense_act_fn"]} if "dense_act_fn" in fields else {}
        model = load_pretrained(T5ForConditionalGeneration, pretrained, **overrides)
    else:
        model = T5ForConditionalGeneration(T5Config(**fields))
    untie_lm_head(model)
    return T5LanguageModel(model, config)


def read_hf_text_config(
    text_config: Mapping[str, Any], blip2_config: Mapping[str, Any]
) -> tuple[str, dict[str, Any]]:
    """The Flan-T5 card and settings for an HF ``text_config`` of model_type "t5", with T5Config's
    defaults for omitted fields (the released sizes keep their card names)."""
    from transformers import T5Config

    # transformers 5 records a file's tie_word_embeddings=False as scale_decoder_outputs=False,
    # which build_t5 reads to give the head its own tensor (untie_lm_head).
    full = T5Config.from_dict(dict(text_config)).to_dict()
    name = {2048: "flant5_xl", 4096: "flant5_xxl"}.get(full["d_model"], "flant5_tiny")
    return name, text_config_overrides(T5_CONFIGS[name], full)


__all__ = ["T5_CONFIGS", "read_hf_text_config", "T5LanguageModel", "build_t5", "prefix_lm_split", "untie_lm_head"]
