"""OPT as BLIP-2's frozen decoder-only language model (LAVIS ``blip2_opt.py``), on transformers.

The projected queries are prepended to the token embeddings as a soft prompt. Training is plain
language modelling on caption + "\\n" with the queries, the prompt and the padding masked out of the
labels; generation stops at "\\n" and pads batched prompts on the left.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from blip2kit.core.interfaces import GenerationOptions
from blip2kit.plugins.language.configs import OPT_CONFIGS
from blip2kit.plugins.language.hf_base import HFLanguageModel, architecture_config, load_pretrained

IGNORE_INDEX = -100  # label value cross-entropy skips

class OPTLanguageModel(HFLanguageModel):
    """Frozen ``OPTForCausalLM`` that reads [queries ; tokens]."""

    is_encoder_decoder = False
    lavis_prefix = "opt_model."

    # -- tokens -----------------------------------------------------------------------------------

    @property
    def newline_token_id(self) -> int:
        """Generation stops at "\\n" (LAVIS and the HF config use its id, 50118, as eos)."""
        configured = self.card_config.get("newline_token_id")
        if configured is not None:
            return int(configured)
        ids = self.tokenizer("\n", add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise ValueError(
                f"the tokenizer splits '\\n' into {len(ids)} tokens {ids}; OPT generation needs one "
                "token to stop at. Set language={'newline_token_id': <id>}."
            )
        return ids[0]

    def _tokenize(self, texts: Sequence[str], padding_side: str, truncate: bool = True) -> dict[str, Tensor]:
        tokenizer = self.tokenizer
        tokenizer.padding_side = padding_side
        limit = {"truncation": True, "max_length": self.max_text_length} if truncate else {}
        tokens = tokenizer(list(texts), return_tensors="pt", padding="longest", **limit)
        device = self.model.get_input_embeddings().weight.device
        return {"input_ids": tokens.input_ids.to(device), "attention_mask": tokens.attention_mask.to(device)}

    def _prompt_length(self, text: str) -> int:
        """Tokens of ``text`` as the tokenizer starts a sequence with it (BOS included)."""
        return len(self.tokenizer(text, truncation=True, max_length=self.max_text_length).input_ids)

    def tokens_before_generation(self, prompt: str) -> int:
        """BOS plus the prompt's tokens: what LAVIS' OPT ``min_length`` counts before new text."""
        return len(self.tokenizer(prompt).input_ids)

    def with_prompt(self, caption: str, prompt: str | None = None) -> str:
        """A prompt in front of a caption, with one space between ("a photo of" + " " + caption).

        ``prompt`` defaults to the configured one."""
        prompt = self.prompt if prompt is None else prompt
        if not prompt:
            return caption
        separator = "" if prompt[-1].isspace() or caption[:1].isspace() else " "
        return prompt + separator + caption

    # -- training ---------------------------------------------------------------------------------

    def build_labels(
        self, input_ids: Tensor, attention_mask: Tensor, masked_lengths: Sequence[int]
    ) -> Tensor:
        """Labels for the text part: padding and the first ``masked_lengths[b]`` tokens -> -100."""
        labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)  # [B, T]
        for row, length in enumerate(masked_lengths):
            labels[row, :length] = IGNORE_INDEX
        return labels

    def loss(
        self,
        prefix_embeds: Tensor,
        prefix_mask: Tensor,
        input_text: Sequence[str],
        target_text: Sequence[str] | None = None,
    ) -> Tensor:
        """LM loss on caption + "\\n" after the soft prompt (LAVIS ``Blip2OPT.forward``).

        With ``target_text`` the model reads input_text + target_text and only the target is
        scored; otherwise the caption is scored after the configured prompt (if any).
        """
        if target_text is not None:
            if len(target_text) != len(input_text):
                raise ValueError(
                    f"got {len(input_text)} input texts and {len(target_text)} targets; give one each"
                )
            texts = [self.with_prompt(target, source) + "\n" for source, target in zip(input_text, target_text)]
            masked = [self._prompt_length(source) for source in input_text]
        else:
            texts = [self.with_prompt(caption) + "\n" for caption in input_text]
            # The prompt (BOS included) is masked only when a prompt is set, as LAVIS does.
            masked = [self._prompt_length(self.prompt) if self.prompt else 0] * len(texts)
        tokens = self._tokenize(texts, padding_side="right")
        text_labels = self.build_labels(tokens["input_ids"], tokens["attention_mask"], masked)

        inputs_embeds, attention_mask = self.prepend_soft_prompt(prefix_embeds, prefix_mask, tokens)
        query_labels = torch.full(prefix_mask.shape, IGNORE_INDEX, dtype=torch.long, device=text_labels.device)
        labels = torch.cat([query_labels, text_labels], dim=1)  # [B, Q+T]
        return self.causal_lm_loss(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels)

    def causal_lm_loss(self, *, inputs_embeds: Tensor, attention_mask: Tensor, labels: Tensor) -> Tensor:
        """Mean next-token cross-entropy (position t predicts labels[t+1]; -100 is skipped), in fp32.

        The same loss as ``OPTForCausalLM(labels=...)``, but the LM head (hidden x vocabulary, the
        largest matmul per position) runs only at positions that predict a label: not over the
        soft prompt, the masked prompt or the padding.
        """
        hidden = self.model.model.decoder(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask
        ).last_hidden_state  # [B, L, H]
        targets = labels[:, 1:]  # [B, L-1]
        scored = targets != IGNORE_INDEX  # [B, L-1]
        logits = self.model.lm_head(hidden[:, :-1][scored])  # [K, V], K scored positions
        return F.cross_entropy(logits.float(), targets[scored])

    # -- generation -------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        prefix_embeds: Tensor,
        prefix_mask: Tensor,
        prompts: Sequence[str],
        options: GenerationOptions,
    ) -> list[str]:
        """Continue [queries ; left-padded prompt]; stops at "\\n"; stripped strings."""
        # Generation prompts are never truncated (LAVIS): a cut question would be answered wrong.
        tokens = self._tokenize(list(prompts), padding_side="left", truncate=False)
        return self.generate_after_soft_prompt(
            prefix_embeds, prefix_mask, tokens, options,
            eos_token_id=self.newline_token_id, pad_token_id=self.tokenizer.pad_token_id,
        )


def build_opt(config: Mapping[str, Any], device: torch.device | str | None = None) -> OPTLanguageModel:
    """Factory of the OPT cards: random init from the built-in config, or ``pretrained`` weights."""
    from transformers import OPTConfig, OPTForCausalLM

    pretrained = config.get("pretrained")
    if pretrained and str(device) != "meta":
        model = load_pretrained(OPTForCausalLM, pretrained)
    else:
        # On meta (parameter counts, planning) the built-in config stands in for the checkpoint's.
        model = OPTForCausalLM(OPTConfig(**architecture_config(config)))
    return OPTLanguageModel(model, config)


__all__ = ["IGNORE_INDEX", "OPT_CONFIGS", "OPTLanguageModel", "build_opt"]
