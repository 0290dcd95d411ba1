"""What the transformers-backed language models (OPT, Flan-T5) share: building from a built-in config
or from pretrained weights, the lazy tokenizer, checkpoint key routing and the tied-weight bookkeeping.

The concrete models live in ``opt.py`` (decoder-only) and ``t5.py`` (encoder-decoder); this file
holds no model-specific loss or generation code.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from blip2kit.core.errors import InputError
from blip2kit.core.checkpoints import CheckpointError
from blip2kit.core.interfaces import CheckpointFormat, ConvertedState, GenerationOptions, LanguageModel
from blip2kit.plugins.language.beam_search import (
    BeamSettings,
    DecoderOnlySteps,
    EncoderDecoderSteps,
    beam_search,
)

# Keys of a card config that are blip2kit settings; every other key is a transformers config field.
BLIP2KIT_KEYS = frozenset(
    {"pretrained", "tokenizer", "prompt", "max_text_length", "extra_config", "newline_token_id"}
)

# Fields of a saved transformers config that describe the file, not the architecture.
_CONFIG_BOOKKEEPING = frozenset(
    {"_name_or_path", "architectures", "transformers_version", "torch_dtype", "dtype", "model_type",
     "_attn_implementation_autoset", "output_attentions", "output_hidden_states", "return_dict"}
)

# Per-task decoding defaults of LAVIS (captioning: beams 5, max 30 new tokens; VQA: beams 5,
# max 10, min 1). Models adjust them (T5 uses length penalty -1 for VQA).
VQA_PROMPT = "Question: {} Short answer:"


# The spaces transformers 4.x removed on decode (``clean_up_tokenization_spaces=True``), in order.
TOKENIZATION_SPACES = (
    (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
    (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"),
)


def clean_tokenization_spaces(text: str) -> str:
    """``"a dog ."`` -> ``"a dog."``: the decoded-text clean-up LAVIS' numbers were made with."""
    for spaced, joined in TOKENIZATION_SPACES:
        text = text.replace(spaced, joined)
    return text


def architecture_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The transformers config fields of a card config: its architecture keys plus ``extra_config``."""
    fields = {key: value for key, value in config.items() if key not in BLIP2KIT_KEYS}
    extra = dict(config.get("extra_config") or {})
    fields.update({key: value for key, value in extra.items() if key not in _CONFIG_BOOKKEEPING})
    return fields


def tied_groups(module: nn.Module) -> list[list[str]]:
    """Names of parameters that are the same tensor (tied embeddings), grouped, in module order."""
    groups: dict[int, list[str]] = {}
    for name, parameter in module.named_parameters(remove_duplicate=False):
        groups.setdefault(id(parameter), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


class HFLanguageModel(LanguageModel):
    """A frozen transformers LLM (``self.model``) reading a soft prompt through ``inputs_embeds``."""

    lavis_prefix: str  # "opt_model." or "t5_model."
    hf_prefix = "language_model."
    default_tokenizer: str | None = None
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "spiece.model")

    def __init__(self, model: nn.Module, config: Mapping[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.card_config = dict(config)
        self.prompt: str = config.get("prompt", "") or ""
        self.max_text_length: int = int(config.get("max_text_length", 32))
        self._tokenizer: Any = None

    # -- sizes ------------------------------------------------------------------------------------

    @property
    def hidden_size(self) -> int:  # type: ignore[override]
        return self.model.get_input_embeddings().embedding_dim

    @property
    def vocab_size(self) -> int:
        return self.model.get_input_embeddings().num_embeddings

    @property
    def no_split_modules(self) -> tuple[str, ...]:
        """transformers' own answer: its decoder (and encoder) layers stay whole."""
        return tuple(getattr(self.model, "_no_split_modules", None) or ())

    # -- tokenizer --------------------------------------------------------------------------------

    @property
    def tokenizer(self) -> Any:  # type: ignore[override]
        """The tokenizer, loaded on first use from config ``tokenizer`` (hub id or local directory)."""
        if self._tokenizer is None:
            source = self.card_config.get("tokenizer") or self.card_config.get("pretrained")
            if not source:
                raise RuntimeError(
                    f"{type(self).__name__} has no tokenizer configured; pass "
                    "language={'tokenizer': '<hub id or local directory>'} or assign .tokenizer"
                )
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(source))
            self._check_vocabulary(self._tokenizer)
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer: Any) -> None:
        if tokenizer is not None:
            self._check_vocabulary(tokenizer)
        self._tokenizer = tokenizer

    def settings(self) -> dict[str, Any]:
        """The build config with the prompt and text length as they are now (they may be set
        after building, e.g. the captioning prompt of a named model)."""
        settings = super().settings()
        settings.update(prompt=self.prompt, max_text_length=self.max_text_length)
        return settings

    def save_tokenizer(self, directory: Any) -> bool:
        """Write the tokenizer files if a tokenizer is loaded (or assigned)."""
        if self._tokenizer is None:
            return False
        self._tokenizer.save_pretrained(str(directory))
        return True

    def load_tokenizer(self, directory: Any) -> None:
        """Read the tokenizer from ``directory`` on first use (lazily, as from config)."""
        self.card_config["tokenizer"] = str(directory)
        self._tokenizer = None

    def _check_vocabulary(self, tokenizer: Any) -> None:
        if len(tokenizer) > self.vocab_size:
            raise ValueError(
                f"tokenizer has {len(tokenizer)} tokens but {type(self).__name__} embeds only "
                f"{self.vocab_size}; use the tokenizer that belongs to these weights"
            )

    # -- shared plumbing --------------------------------------------------------------------------

    def embed_tokens(self, input_ids: Tensor) -> Tensor:
        """Token ids [B, T] -> input embeddings [B, T, hidden] (frozen table)."""
        return self.model.get_input_embeddings()(input_ids)

    def prepend_soft_prompt(
        self, prefix_embeds: Tensor, prefix_mask: Tensor, tokens: Mapping[str, Tensor]
    ) -> tuple[Tensor, Tensor]:
        """[queries ; token embeddings] and their mask, the input BLIP-2 feeds the LLM."""
        text_embeds = self.embed_tokens(tokens["input_ids"])  # [B, T, hidden]
        # Under a device_map the projection and the embeddings may sit on different devices.
        prefix_embeds = prefix_embeds.to(device=text_embeds.device, dtype=text_embeds.dtype)
        inputs_embeds = torch.cat([prefix_embeds, text_embeds], dim=1)  # [B, Q+T, hidden]
        attention_mask = torch.cat([prefix_mask.to(text_embeds.device),
                                    tokens["attention_mask"].to(text_embeds.device)], dim=1)  # [B, Q+T]
        return inputs_embeds, attention_mask

    @property
    def max_positions(self) -> int | None:
        """Longest sequence the model's learned positions cover (None: relative positions)."""
        if self.is_encoder_decoder:
            return None
        return getattr(self.model.config, "max_position_embeddings", None)

    def generate_after_soft_prompt(
        self,
        prefix_embeds: Tensor,
        prefix_mask: Tensor,
        tokens: Mapping[str, Tensor],
        options: GenerationOptions,
        **model_kwargs: Any,
    ) -> list[str]:
        """Decode from [queries ; prompt tokens] with transformers' generate; stripped strings.

        Given embeddings alone, generate returns only new tokens (decoder-only) or the decoder
        sequence from its start token (encoder-decoder); skip_special_tokens drops the latter.
        """
        inputs_embeds, attention_mask = self.prepend_soft_prompt(prefix_embeds, prefix_mask, tokens)
        limit = self.max_positions
        if limit is not None and inputs_embeds.shape[1] + options.max_new_tokens > limit:
            raise InputError(
                f"{prefix_embeds.shape[1]} query tokens + a prompt of {tokens['input_ids'].shape[1]} "
                f"tokens + max_new_tokens={options.max_new_tokens} need "
                f"{inputs_embeds.shape[1] + options.max_new_tokens} positions, but "
                f"{type(self).__name__} has {limit} (max_position_embeddings); lower max_new_tokens "
                "or shorten the prompt (generation prompts are never truncated, as in LAVIS)"
            )
        if self.runs_own_beam_search(options):
            output_ids = self.beam_search(inputs_embeds, attention_mask, tokens, options, **model_kwargs)
        else:
            output_ids = self.model.generate(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                **model_kwargs,
                **self.generation_kwargs(options),
            )  # [B * num_return_sequences, tokens]
        return self.decode_generated(output_ids)

    def runs_own_beam_search(self, options: GenerationOptions) -> bool:
        """Beam search without sampling runs in blip2kit unless ``beam_search="transformers"``."""
        return options.num_beams > 1 and not options.do_sample and options.beam_search == "blip2kit"

    def beam_search(
        self,
        inputs_embeds: Tensor,
        attention_mask: Tensor,
        tokens: Mapping[str, Tensor],
        options: GenerationOptions,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
    ) -> Tensor:
        """blip2kit's beam search from [queries ; prompt] -> new token ids [B * returned, G].

        The decoder-only prefill (or the encoder) runs once per image, not once per beam. The
        scoring follows ``options.beam_convention``; ``tokens`` are the prompt's (what transformers
        4.26 counted in the length and penalised repetitions of, for a decoder-only model).
        """
        config = self.model.generation_config
        eos = _single_id(config.eos_token_id if eos_token_id is None else eos_token_id, "eos_token_id")
        pad = _single_id(config.pad_token_id if pad_token_id is None else pad_token_id, "pad_token_id")
        settings = BeamSettings(
            num_beams=options.num_beams, max_new_tokens=options.max_new_tokens,
            min_new_tokens=options.min_new_tokens, length_penalty=options.length_penalty,
            repetition_penalty=options.repetition_penalty,
            num_return_sequences=options.num_return_sequences, eos_token_id=eos, pad_token_id=pad,
            convention=options.beam_convention,
        )
        batch = inputs_embeds.shape[0]
        if self.is_encoder_decoder:
            start = int(self.model.config.decoder_start_token_id)
            steps: Any = EncoderDecoderSteps(self.model, inputs_embeds, attention_mask, options.num_beams, start)
            prefix = torch.full((batch, 1), start, dtype=torch.long, device=inputs_embeds.device)
            return beam_search(steps, prefix, settings)
        steps = DecoderOnlySteps(self.model, inputs_embeds, attention_mask, options.num_beams)
        if options.beam_convention == "lavis":
            return beam_search(steps, tokens["input_ids"], settings)
        # transformers 5 sees no input ids (only embeddings) and skips leading padding's length.
        no_ids = tokens["input_ids"][:, :0]
        return beam_search(steps, no_ids, settings, penalty_skip=(attention_mask != 0).int().argmax(dim=1))

    def decode_generated(self, output_ids: Tensor) -> list[str]:
        """Generated ids [B, T] -> stripped strings without specials, tokenisation spaces cleaned
        ("a dog ." -> "a dog."), as LAVIS' decoding did (transformers 4.x cleaned by default;
        5.x refuses to for BPE tokenizers, so the same replacements are made here)."""
        texts = self.tokenizer.batch_decode(
            output_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        return [clean_tokenization_spaces(text).strip() for text in texts]

    def generation_kwargs(self, options: GenerationOptions) -> dict[str, Any]:
        """GenerationOptions -> keyword arguments of transformers' ``generate``."""
        kwargs: dict[str, Any] = {
            "num_beams": options.num_beams,
            "max_new_tokens": options.max_new_tokens,
            "min_new_tokens": options.min_new_tokens,
            "repetition_penalty": options.repetition_penalty,
            "num_return_sequences": options.num_return_sequences,
            "do_sample": options.do_sample,
        }
        if options.num_beams > 1:  # only beam scores are length-normalised; transformers warns otherwise
            kwargs["length_penalty"] = options.length_penalty
        if options.do_sample:
            kwargs.update(top_p=options.top_p, temperature=options.temperature)
        return kwargs

    def generation_defaults(self, task: str) -> dict[str, Any]:
        """LAVIS' decoding defaults for ``task`` ('caption' or 'vqa'), as GenerationOptions fields."""
        super().generation_defaults(task)  # rejects unknown tasks
        if task == "caption":
            return {"num_beams": 5, "max_new_tokens": 30, "min_new_tokens": 1}
        return {"num_beams": 5, "max_new_tokens": 10, "min_new_tokens": 1, "length_penalty": 0.0}

    def hf_config(self) -> dict[str, Any]:
        """The ``text_config`` of a Hugging Face ``Blip2Config``."""
        config = self.model.config.to_dict()
        for key in ("_name_or_path", "architectures", "transformers_version", "dtype", "torch_dtype"):
            config.pop(key, None)
        return config

    # -- checkpoints ------------------------------------------------------------------------------

    def _prefix(self, source: CheckpointFormat) -> str:
        if source == "hf":
            return self.hf_prefix
        if source == "lavis":
            return self.lavis_prefix
        raise ValueError(f"unknown checkpoint format {source!r}; use 'hf' or 'lavis'")

    def convert_external_state(
        self, state: Mapping[str, Tensor], source: CheckpointFormat
    ) -> ConvertedState:
        """``language_model.*`` (hf) or ``opt_model.*``/``t5_model.*`` (lavis) -> ``model.*``.

        A tied weight stored under one of its names (HF saves ``shared.weight`` for T5's three
        embedding tables) fills every name that shares the tensor.
        """
        prefix = self._prefix(source)
        converted = ConvertedState()
        for key, value in state.items():
            if key.startswith(prefix):
                converted.state["model." + key[len(prefix):]] = value
                converted.consumed.add(key)
        for group in tied_groups(self):
            present = [name for name in group if name in converted.state]
            for name in present[1:]:
                first, other = converted.state[present[0]], converted.state[name]
                # Meta tensors (a checkpoint's shapes, before it is read) have no values to compare.
                if not (first.is_meta or other.is_meta) and not torch.equal(other, first):
                    raise CheckpointError(
                        f"{source} checkpoint holds tied tensors {prefix}{name[len('model.'):]} and "
                        f"{prefix}{present[0][len('model.'):]} with different values; in this model "
                        "they are one tensor. Untie them in the config (tie_word_embeddings=False) "
                        "if the file is right, or re-export it"
                    )
            if present:
                for name in group:
                    converted.state.setdefault(name, converted.state[present[0]])
        return converted

    def export_external_state(self, target: CheckpointFormat) -> dict[str, Tensor]:
        """``model.*`` -> ``language_model.*`` (hf) / ``opt_model.*``/``t5_model.*`` (lavis).

        Each tied tensor is written once, under its first name (safetensors refuses shared storage;
        transformers re-ties the missing names when it loads).
        """
        prefix = self._prefix(target)
        aliases = {name for group in tied_groups(self) for name in group[1:]}
        exported = {}
        for name, value in self.state_dict().items():
            if name in aliases or not name.startswith("model."):
                continue
            exported[prefix + name[len("model."):]] = value
        return exported


def _single_id(value: Any, name: str) -> int:
    """A generation config's token id as one int (transformers allows lists)."""
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise InputError(
                f"blip2kit's beam search stops at one {name}, but the model's generation config has "
                f"{list(value)}; pass beam_search='transformers' to use transformers' generate"
            )
        value = value[0]
    if value is None:
        raise InputError(f"the model's generation config has no {name}; beam search needs one")
    return int(value)


def text_config_overrides(
    card_config: Mapping[str, Any], full_config: Mapping[str, Any]
) -> dict[str, Any]:
    """Card settings for a checkpoint's complete ``text_config`` (as its transformers config class
    filled it): every architecture key of the card from it, and the rest as ``extra_config``."""
    overrides = {key: full_config[key] for key in card_config
                 if key in full_config and key not in BLIP2KIT_KEYS}
    overrides["extra_config"] = {key: value for key, value in full_config.items()
                                 if key not in _CONFIG_BOOKKEEPING}
    return overrides


def load_pretrained(model_class: type, pretrained: str, **config_overrides: Any) -> nn.Module:
    """Weights from a hub id or a local directory (safetensors or torch weights-only), fp32."""
    try:
        return model_class.from_pretrained(str(pretrained), dtype=torch.float32, **config_overrides)
    except OSError as error:
        raise OSError(
            f"could not load {model_class.__name__} weights from {pretrained!r}: {error}. Give a "
            "local directory with config.json and model.safetensors, or a hub id reachable from here."
        ) from error


__all__ = [
    "HFLanguageModel",
    "TOKENIZATION_SPACES",
    "VQA_PROMPT",
    "architecture_config",
    "clean_tokenization_spaces",
    "load_pretrained",
    "text_config_overrides",
    "tied_groups",
]
