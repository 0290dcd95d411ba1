"""The three component interfaces of a BLIP-2 style model: VisionEncoder, Bridge, LanguageModel.

Every concrete component (built in or from a third-party package) subclasses one of these. The
composed model in ``blip2kit.core.model`` talks to components only through what is declared here.

Checkpoint conversion is per component: ``convert_external_state`` picks a component's own keys
out of a whole external checkpoint (LAVIS ``.pth`` or Hugging Face ``Blip2*``) and renames them;
``export_external_state`` does the reverse. The composed model routes the rest.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

CheckpointFormat = Literal["lavis", "hf"]


@dataclass
class ConvertedState:
    """A component's share of an external checkpoint, renamed to its own ``state_dict`` keys."""

    state: dict[str, Tensor] = field(default_factory=dict)
    consumed: set[str] = field(default_factory=set)  # the external keys it used


class Component(nn.Module):
    """Shared behaviour of the three kinds: freezing that survives ``.train()``, key conversion."""

    def __init__(self) -> None:
        super().__init__()
        self._frozen = False

    # -- freezing -------------------------------------------------------------------------------

    @property
    def frozen(self) -> bool:
        return self._frozen

    def freeze(self) -> Component:
        """No gradients and eval mode (no dropout), kept even when a parent calls ``.train()``."""
        self._frozen = True
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        super().train(False)
        return self

    def unfreeze(self) -> Component:
        self._frozen = False
        for parameter in self.parameters():
            parameter.requires_grad_(True)
        return self

    def train(self, mode: bool = True) -> Component:
        # A frozen tower stays in eval mode, as LAVIS does with its disabled train().
        return super().train(mode and not self._frozen)

    def cast_frozen(self, dtype: torch.dtype) -> None:
        """Cast the weights to ``dtype`` for frozen inference; a component may keep parts in fp32.

        It may run on parameters still on the meta device (``from_pretrained`` fixes the dtypes
        before loading), so it must only cast, never compute with the values.
        """
        self.to(dtype)

    @property
    def no_split_modules(self) -> tuple[str, ...]:
        """Class names of modules ``device_map="auto"`` keeps whole on one device (their forward
        uses weights of several children at once). Default: the whole component."""
        return (type(self).__name__,)

    @property
    def input_dtype(self) -> torch.dtype:
        """The dtype the composed model hands this component's floating-point inputs in.

        Default: that of its first floating-point weight (fp32 without any); a component whose
        first weight is not the one that reads the input overrides it.
        """
        for parameter in self.parameters():
            if parameter.is_floating_point():
                return parameter.dtype
        return torch.float32

    # -- checkpoints ----------------------------------------------------------------------------

    # Set by ``build_component``: the card this component was built from and its merged config.
    card_name: str | None = None
    build_config: dict[str, Any] | None = None

    def settings(self) -> dict[str, Any]:
        """The config that rebuilds this component as it is now, recorded in ``blip2kit.json``.

        Default: the config it was built with. A component whose settings can change after
        building (a language model's ``prompt``) returns the current values, so a saved and
        reloaded model behaves exactly as the one saved.
        """
        return dict(self.build_config or {})

    def convert_external_state(
        self, state: Mapping[str, Tensor], source: CheckpointFormat
    ) -> ConvertedState:
        """Pick this component's keys out of a whole ``source`` checkpoint, renamed to own keys."""
        raise NotImplementedError(
            f"{type(self).__name__} does not read {source!r} checkpoints; implement "
            "convert_external_state to map its keys"
        )

    def export_external_state(self, target: CheckpointFormat) -> dict[str, Tensor]:
        """This component's weights under the whole-checkpoint key names of ``target``."""
        raise NotImplementedError(
            f"{type(self).__name__} does not write {target!r} checkpoints; implement "
            "export_external_state"
        )


class VisionEncoder(Component, ABC):
    """A (usually frozen) image tower. ``forward`` returns the features BLIP-2 uses.

    For ViTs that is the output of the penultimate block, before any final norm: [B, N, width].
    """

    width: int  # feature width, e.g. 1408 for EVA ViT-g
    image_size: int  # square input side in pixels
    patch_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"

    @property
    def num_tokens(self) -> int:
        """Tokens per image: patches plus the class token."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @abstractmethod
    def forward(self, pixels: Tensor) -> Tensor:
        """pixels [B, 3, S, S] normalised -> image_embeds [B, num_tokens, width]."""

    def transform(self, train: bool = False) -> Any:
        """The image transform that belongs to this encoder (a torchvision callable, PIL -> tensor)."""
        raise NotImplementedError(f"{type(self).__name__} has no image transform")

    def hf_config(self) -> dict[str, Any]:
        """This encoder's part of a Hugging Face ``Blip2Config`` (``vision_config``)."""
        raise NotImplementedError(f"{type(self).__name__} cannot describe itself as an HF config")


class Bridge(Component, ABC):
    """Turns image features into a fixed number of query vectors for the language model."""

    input_width: int  # the encoder width it accepts
    hidden_size: int  # width of each output query
    num_queries: int

    @abstractmethod
    def forward(self, image_embeds: Tensor, image_mask: Tensor | None = None) -> Tensor:
        """image_embeds [B, N, input_width], image_mask [B, N] -> query_output [B, num_queries, hidden]."""

    def drop_text_branch(self) -> None:
        """Remove parts only stage 1 uses (text embeddings, text FFN, LM/ITC/ITM heads). In place."""

    def hf_config(self) -> dict[str, Any]:
        """This bridge's part of a Hugging Face ``Blip2Config`` (``qformer_config`` and friends)."""
        raise NotImplementedError(f"{type(self).__name__} cannot describe itself as an HF config")


@dataclass
class ImageKeyValues:
    """The cross-attention keys and values of a batch of images, per bridge layer.

    They depend on the image alone (and the layer's key/value projections), not on what attends
    to them, so stage 1 computes them once per image in the query pass and lets the 3B ITM pairs
    index them instead of projecting the image again per pair. ``layers[i]`` is layer i's
    (keys, values), each batch-first ([B, ...]), or None where the layer has no cross-attention.
    """

    layers: tuple[tuple[Tensor, Tensor] | None, ...]

    @property
    def batch_size(self) -> int:
        for pair in self.layers:
            if pair is not None:
                return pair[0].shape[0]
        raise ValueError("these ImageKeyValues hold no cross-attention layer, so no batch")

    def select(self, index: Tensor) -> ImageKeyValues:
        """The rows ``index`` [M] (repeats allowed): [M, ...] per layer; gradients flow back."""
        return ImageKeyValues(tuple(
            None if pair is None else (pair[0][index], pair[1][index]) for pair in self.layers
        ))

    @staticmethod
    def cat(parts: Sequence[ImageKeyValues]) -> ImageKeyValues:
        """Concatenate along the batch; every part must come from the same bridge."""
        if len({len(part.layers) for part in parts}) != 1:
            raise ValueError("ImageKeyValues of different bridges (layer counts differ) cannot be joined")
        layers = []
        for pairs in zip(*(part.layers for part in parts)):
            if any(pair is None for pair in pairs):
                layers.append(None)
            else:
                layers.append((torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])))
        return ImageKeyValues(tuple(layers))


@dataclass
class QueryState:
    """What the query-only pass of a representation bridge produces (LAVIS pass (a))."""

    query_output: Tensor  # [B, num_queries, hidden]
    past_key_values: Any  # per-layer self-attention K/V of the queries, reused by text decoding
    # The images' cross-attention K/V the pass computed, for ITM to reuse; None: the bridge does
    # not offer them (stage 1 then gives match_logits the image embeds of every pair).
    image_key_values: ImageKeyValues | None = None


class RepresentationBridge(Bridge):
    """A bridge that can learn vision-language representations (BLIP-2 stage 1).

    The stage-1 objectives in ``blip2kit.core.objectives`` need only these methods, so any bridge
    implementing them trains with ITC + ITM + ITG.

    Image inputs: ``prepare_image`` applies the bridge's own trainable input norm (LAVIS
    ``ln_vision``) to the encoder features; ``encode_image`` and ``match_logits`` take its output
    (the objectives gather these prepared embeds across ranks with gradient, as LAVIS does).
    ``forward`` takes raw encoder features and does both steps.
    """

    tokenizer: Any  # text tokenizer with a decoder bos token ([DEC] for the Q-Former)
    embed_dim: int  # width of the ITC feature space (256)
    temp: nn.Parameter  # learnable ITC temperature
    max_text_length: int

    @property
    def bos_token_id(self) -> int:
        """The decoder bos id that replaces the first ([CLS]) token for ITG."""
        return self.tokenizer.bos_token_id

    @property
    def pad_token_id(self) -> int:
        """The padding id; padded positions are not ITG targets."""
        return self.tokenizer.pad_token_id

    @abstractmethod
    def tokenize(self, texts: Sequence[str], max_length: int | None = None) -> dict[str, Tensor]:
        """Tokenise captions: {'input_ids': [B, T], 'attention_mask': [B, T]}."""

    def prepare_image(self, image_features: Tensor) -> Tensor:
        """Encoder features [B, N, input_width] -> image_embeds the other methods read (default: as is)."""
        return image_features

    @abstractmethod
    def encode_image(self, image_embeds: Tensor, image_mask: Tensor | None = None) -> QueryState:
        """Queries alone, cross-attending to prepared image_embeds (bidirectional among queries)."""

    @abstractmethod
    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Text alone with a padding mask, no image -> text_output [B, T, hidden]."""

    @abstractmethod
    def image_features(self, query_output: Tensor) -> Tensor:
        """Normalised ITC image features [B, num_queries, embed_dim]."""

    @abstractmethod
    def text_features(self, text_output: Tensor) -> Tensor:
        """Normalised ITC text feature of the [CLS] position [B, embed_dim]."""

    @abstractmethod
    def match_logits(
        self, image_embeds: Tensor, image_mask: Tensor | None, input_ids: Tensor, attention_mask: Tensor
    ) -> Tensor:
        """ITM: [queries ; text] fully bidirectional, head averaged over queries -> [B, 2]."""

    @abstractmethod
    def caption_logits(
        self, query_state: QueryState, input_ids: Tensor, attention_mask: Tensor
    ) -> Tensor:
        """ITG: causal text attending to all cached query K/V -> vocabulary logits [B, T, V]."""

    # -- optional: reuse of the images' cross-attention K/V across ITM pairs ---------------------
    # A bridge that fills QueryState.image_key_values implements both methods below; stage 1 then
    # scores the 3B ITM pairs from those K/V instead of calling match_logits. A bridge without
    # them (the default) keeps working through match_logits.

    def image_key_values(self, image_embeds: Tensor) -> ImageKeyValues:
        """Cross-attention K/V of prepared image_embeds [B, N, input_width], per layer.

        Stage 1 calls it under data parallel for hard-negative images gathered from other ranks,
        whose K/V the local query pass did not compute.
        """
        raise NotImplementedError(
            f"{type(self).__name__} fills QueryState.image_key_values but does not implement "
            "image_key_values(image_embeds); implement both, or leave image_key_values None"
        )

    def match_logits_from_key_values(
        self,
        image_key_values: ImageKeyValues,
        image_mask: Tensor | None,
        input_ids: Tensor,
        attention_mask: Tensor,
    ) -> Tensor:
        """ITM as ``match_logits``, reading each pair's image through its precomputed K/V."""
        raise NotImplementedError(
            f"{type(self).__name__} fills QueryState.image_key_values but does not implement "
            "match_logits_from_key_values; implement it, or leave image_key_values None"
        )


# Beam-search scoring conventions: "transformers" (transformers 5: scores over the generated length)
# and "lavis" (transformers 4.26, which LAVIS ran for BLIP-2's published numbers: scores over the
# whole decoder sequence, BOS and prompt included, with its own early stop).
BEAM_CONVENTIONS = ("transformers", "lavis")
# Who runs beam search: blip2kit's own (prefill once per image) or transformers' generate.
BEAM_SEARCH_ENGINES = ("blip2kit", "transformers")


@dataclass
class GenerationOptions:
    """Decoding options shared by all language models.

    ``beam_convention`` picks how beam search scores and stops (see ``BEAM_CONVENTIONS``);
    ``beam_search`` who runs it ("transformers" only supports the "transformers" convention).
    """

    num_beams: int = 5
    max_new_tokens: int = 30
    min_new_tokens: int = 1
    do_sample: bool = False
    top_p: float = 0.9
    temperature: float = 1.0
    length_penalty: float = 1.0
    repetition_penalty: float = 1.0
    num_return_sequences: int = 1
    beam_convention: str = "transformers"
    beam_search: str = "blip2kit"


class LanguageModel(Component, ABC):
    """A (usually frozen) language model that reads a soft prompt of projected query vectors."""

    hidden_size: int  # width of its input embeddings
    tokenizer: Any
    is_encoder_decoder: bool
    # The configured prompt: what generate() reads when no prompt is given, as LAVIS does (the
    # -coco OPT models caption after "a photo of"); "" for none.
    prompt: str = ""
    # Key prefix of the projection into this LLM in LAVIS files (LAVIS: opt_proj., t5_proj.).
    lavis_projection_prefix: str = "llm_proj."
    # Files of a tokenizer in a checkpoint directory; when one is there, load_tokenizer reads it.
    tokenizer_files: tuple[str, ...] = ()

    @property
    def vocab_size(self) -> int:
        """Rows of the input embedding table; HF export puts the image token in the last one."""
        raise NotImplementedError(f"{type(self).__name__} does not declare vocab_size")

    @abstractmethod
    def loss(
        self,
        prefix_embeds: Tensor,
        prefix_mask: Tensor,
        input_text: Sequence[str],
        target_text: Sequence[str] | None = None,
    ) -> Tensor:
        """Stage-2 loss of text given the soft prompt [B, Q, hidden] and its mask [B, Q].

        Decoder-only models train on ``input_text`` with the prompt part masked; encoder-decoder
        models read ``input_text`` with the prefix and predict ``target_text`` (prefix-LM).
        """

    @abstractmethod
    def generate(
        self,
        prefix_embeds: Tensor,
        prefix_mask: Tensor,
        prompts: Sequence[str],
        options: GenerationOptions,
    ) -> list[str]:
        """Text continuing each prompt after its soft prompt; stripped strings, one per prompt."""

    def generation_defaults(self, task: str) -> dict[str, Any]:
        """Decoding defaults for ``task`` ('caption' or 'vqa') as GenerationOptions fields."""
        if task not in ("caption", "vqa"):
            raise ValueError(f"unknown generation task {task!r}; use 'caption' or 'vqa'")
        return {}

    def tokens_before_generation(self, prompt: str) -> int:
        """How many tokens the decoded sequence holds before the first new one, given ``prompt``.

        Decoders count their start and prompt tokens in a total ``min_length`` (LAVIS' setting):
        a decoder-only model counts its BOS and the prompt's tokens, an encoder-decoder model the
        decoder start token. The evaluation recipes turn LAVIS ``min_len`` into new tokens with it.
        Default: 0 (every token counted is new).
        """
        return 0

    def save_tokenizer(self, directory: Any) -> bool:
        """Write the tokenizer's files into ``directory`` (a checkpoint being saved) if one is
        loaded; return whether it wrote. Default: nothing to write."""
        return False

    def load_tokenizer(self, directory: Any) -> None:
        """Use the tokenizer files that ``save_tokenizer`` wrote into ``directory``."""
        raise NotImplementedError(
            f"{type(self).__name__} saved tokenizer files but does not implement load_tokenizer"
        )

    def hf_config(self) -> dict[str, Any]:
        """This LLM's part of a Hugging Face ``Blip2Config`` (``text_config``)."""
        raise NotImplementedError(f"{type(self).__name__} cannot describe itself as an HF config")
