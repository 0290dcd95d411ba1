"""Small test doubles of the three interfaces, and a plugin that registers them.

They do real (tiny) computation so composition, freezing and the training path can be checked
without the built-in towers. They live under tests/ only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from blip2kit.core.interfaces import Bridge, GenerationOptions, LanguageModel, VisionEncoder
from blip2kit.registry import ComponentCard, Registry, hookimpl


class PatchVision(VisionEncoder):
    """Linear patch embedding plus one transformer layer: [B,3,S,S] -> [B, N+1, width]."""

    def __init__(self, width: int = 16, image_size: int = 32, patch_size: int = 8) -> None:
        super().__init__()
        self.width, self.image_size, self.patch_size = width, image_size, patch_size
        self.mean, self.std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
        self.patch_embed = nn.Conv2d(3, width, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.block = nn.TransformerEncoderLayer(width, 2, 2 * width, dropout=0.1, batch_first=True)

    def forward(self, pixels: Tensor) -> Tensor:
        patches = self.patch_embed(pixels).flatten(2).transpose(1, 2)  # [B, N, width]
        tokens = torch.cat([self.cls_token.expand(len(pixels), -1, -1), patches], dim=1)
        return self.block(tokens)


class MeanQueryBridge(Bridge):
    """Learned queries that attend to the image once: [B, N, in] -> [B, Q, hidden]."""

    def __init__(self, encoder_width: int = 16, hidden_size: int = 12, num_queries: int = 4) -> None:
        super().__init__()
        self.input_width, self.hidden_size, self.num_queries = encoder_width, hidden_size, num_queries
        self.input_norm = nn.LayerNorm(encoder_width)
        self.queries = nn.Parameter(torch.randn(1, num_queries, hidden_size) * 0.02)
        self.key = nn.Linear(encoder_width, hidden_size)
        self.value = nn.Linear(encoder_width, hidden_size)
        self.text_head = nn.Linear(hidden_size, 5)  # stands for a stage-1-only part

    def forward(self, image_embeds: Tensor, image_mask: Tensor | None = None) -> Tensor:
        image_embeds = self.input_norm(image_embeds)
        keys, values = self.key(image_embeds), self.value(image_embeds)  # [B, N, hidden]
        weights = torch.softmax(self.queries @ keys.transpose(1, 2), dim=-1)  # [B, Q, N]
        return weights @ values  # [B, Q, hidden]

    def drop_text_branch(self) -> None:
        self.text_head = None


class BagOfWordsLM(LanguageModel):
    """Predicts each word of the target from the mean soft prompt: enough to train on."""

    is_encoder_decoder = False

    def __init__(self, hidden_size: int = 10, vocabulary: Sequence[str] = ("a", "cat", "dog", "red")) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.tokenizer = {word: index for index, word in enumerate(vocabulary)}
        self.head = nn.Linear(hidden_size, len(vocabulary))

    def loss(
        self,
        prefix_embeds: Tensor,
        prefix_mask: Tensor,
        input_text: Sequence[str],
        target_text: Sequence[str] | None = None,
    ) -> Tensor:
        logits = self.head(prefix_embeds.mean(dim=1))  # [B, V]
        targets = torch.zeros_like(logits)
        for row, text in enumerate(target_text or input_text):
            for word in text.split():
                targets[row, self.tokenizer[word]] = 1.0
        return nn.functional.binary_cross_entropy_with_logits(logits, targets)

    def generate(
        self, prefix_embeds: Tensor, prefix_mask: Tensor, prompts: Sequence[str], options: GenerationOptions
    ) -> list[str]:
        words = list(self.tokenizer)
        best = self.head(prefix_embeds.mean(dim=1)).argmax(dim=-1)
        return [f"{prompt} {words[i]}".strip() for prompt, i in zip(prompts, best.tolist())]


def build_patch_vision(config: Mapping[str, Any], device: Any = None) -> PatchVision:
    return PatchVision(**config)


def build_mean_query_bridge(config: Mapping[str, Any], device: Any = None) -> MeanQueryBridge:
    return MeanQueryBridge(**config)


def build_bag_of_words_lm(config: Mapping[str, Any], device: Any = None) -> BagOfWordsLM:
    return BagOfWordsLM(**config)


def build_not_a_component(config: Mapping[str, Any], device: Any = None) -> nn.Module:
    return nn.Linear(2, 2)


class DoublesPlugin:
    """Registers the doubles under names that no built-in uses."""

    @hookimpl
    def blip2kit_register(self, registry: Registry) -> None:
        registry.add_vision_encoder(
            ComponentCard(
                name="double_vision",
                kind="vision",
                factory="doubles:build_patch_vision",
                config={"width": 16, "image_size": 32, "patch_size": 8},
                width=16,
                description="test double",
            )
        )
        registry.add_vision_encoder(
            ComponentCard(
                name="double_vision_wide",
                kind="vision",
                factory="doubles:build_patch_vision",
                config={"width": 24, "image_size": 32, "patch_size": 8},
                width=24,
            )
        )
        registry.add_bridge(
            ComponentCard(
                name="double_bridge",
                kind="bridge",
                factory="doubles:build_mean_query_bridge",
                config={"encoder_width": 16, "hidden_size": 12, "num_queries": 4},
                width=12,
            )
        )
        registry.add_language_model(
            ComponentCard(
                name="double_lm",
                kind="language",
                factory="doubles:build_bag_of_words_lm",
                config={"hidden_size": 10},
                width=10,
            )
        )
        registry.add_language_model(
            ComponentCard(
                name="not_a_component",
                kind="language",
                factory="doubles:build_not_a_component",
            )
        )
