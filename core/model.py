"""The composed BLIP-2 model: frozen vision encoder -> trainable bridge -> projection -> frozen LLM.

A stage-1 model ("vision+bridge") has no projection and no language model; its loss is the sum of
the stage-1 objectives. A stage-2 model projects the bridge's queries into the LLM as a soft prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from blip2kit.core.interfaces import Bridge, Component, GenerationOptions, LanguageModel, VisionEncoder


@dataclass(frozen=True)
class ParameterCount:
    total: int
    trainable: int

    @property
    def frozen(self) -> int:
        return self.total - self.trainable


def count_parameters(module: nn.Module) -> ParameterCount:
    """Total and trainable parameter counts; works on the meta device (numel needs no storage)."""
    total = trainable = 0
    for parameter in module.parameters():
        count = parameter.ds_numel if hasattr(parameter, "ds_numel") else parameter.numel()
        total += count
        if parameter.requires_grad:
            trainable += count
    return ParameterCount(total, trainable)


class Blip2(nn.Module):
    """Vision encoder + bridge (+ projection + language model), with BLIP-2's freeze policy."""

    def __init__(
        self,
        vision: VisionEncoder,
        bridge: Bridge,
        language: LanguageModel | None = None,
        *,
        name: str = "",
        freeze_vision: bool = True,
        freeze_language: bool = True,
    ) -> None:
        super().__init__()
        self.name = name
        self.vision = vision
        self.bridge = bridge
        self.language = language
        # The projection lives outside the bridge so any bridge fits any LLM (LAVIS opt_proj/t5_proj).
        self.projection = (
            nn.Linear(bridge.hidden_size, language.hidden_size) if language is not None else None
        )
        if freeze_vision:
            vision.freeze()
        if language is not None and freeze_language:
            language.freeze()

    @property
    def stage(self) -> int:
        return 1 if self.language is None else 2

    # -- forward pieces -------------------------------------------------------------------------

    def encode_image(self, pixels: Tensor | None = None, *, image_features: Tensor | None = None) -> Tensor:
        """pixels [B, 3, S, S] -> image_embeds [B, N, vision.width] in the bridge's dtype.

        ``image_features`` [B, N, vision.width] (the encoder's outputs, e.g. from a feature cache)
        skip the encoder; give exactly one of the two.
        """
        if (pixels is None) == (image_features is None):
            raise ValueError(
                "give exactly one of pixels (images for the vision encoder) or image_features "
                "(the encoder's outputs, e.g. from a feature cache), got "
                + ("both" if pixels is not None else "neither")
            )
        if image_features is not None:
            expected = (self.vision.num_tokens, self.vision.width)
            if image_features.dim() != 3 or tuple(image_features.shape[1:]) != expected:
                raise ValueError(
                    f"image_features must be [B, {expected[0]}, {expected[1]}] for this model's encoder, "
                    f"got {list(image_features.shape)}; was the feature cache made for another encoder?"
                )
            bridge_weight = next(self.bridge.parameters())
            return image_features.to(device=bridge_weight.device, dtype=_dtype_of(self.bridge))
        frozen = self.vision.frozen
        with torch.no_grad() if frozen else nullcontext():
            image_embeds = self.vision(pixels.to(_dtype_of(self.vision)))
        return image_embeds.to(_dtype_of(self.bridge))

    def soft_prompt(
        self, pixels: Tensor | None = None, *, image_features: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """pixels (or cached image_features) -> (prefix_embeds [B, Q, lm.hidden], prefix_mask [B, Q])."""
        if self.language is None or self.projection is None:
            raise RuntimeError(
                f"{self.name or 'this model'} is a stage-1 model (vision+bridge) and has no "
                "language model; compose 'vision+bridge+language' to get a soft prompt"
            )
        image_embeds = self.encode_image(pixels, image_features=image_features)
        query_output = self.bridge(image_embeds)  # [B, Q, bridge.hidden]
        prefix_embeds = self.projection(query_output)  # [B, Q, lm.hidden]
        prefix_mask = torch.ones(prefix_embeds.shape[:2], dtype=torch.long, device=prefix_embeds.device)
        return prefix_embeds.to(_dtype_of(self.language)), prefix_mask

    def forward(
        self,
        pixels: Tensor | None = None,
        text_input: Sequence[str] | None = None,
        text_output: Sequence[str] | None = None,
        *,
        image_features: Tensor | None = None,
        **objective_options: Any,
    ) -> dict[str, Tensor]:
        """Training losses. Stage 1: ITC + ITM + ITG; stage 2: the language model's loss.

        Give images as ``pixels`` or, from a feature cache, as ``image_features`` (exactly one).
        Returns a dict with 'loss' (what to back-propagate) and the parts it is made of.
        """
        if text_input is None:
            raise ValueError("text_input is required: one caption (or prompt) per image")
        if self.language is None:
            from blip2kit.core.objectives import stage1_losses

            return stage1_losses(self, pixels, text_input, image_features=image_features, **objective_options)
        prefix_embeds, prefix_mask = self.soft_prompt(pixels, image_features=image_features)
        loss = self.language.loss(prefix_embeds, prefix_mask, text_input, text_output)
        return {"loss": loss, "loss_lm": loss.detach()}

    @torch.no_grad()
    def generate(
        self,
        pixels: Tensor,
        prompts: Sequence[str] | str | None = None,
        *,
        task: str = "caption",
        **options: Any,
    ) -> list[str]:
        """Captions (no prompt), answers or instructions for a batch of images; stripped strings.

        ``task`` picks the language model's decoding defaults ('caption': 5 beams, at most 30 new
        tokens; 'vqa': 5 beams, at most 10); ``options`` (GenerationOptions fields) override them.
        """
        if self.language is None:
            raise RuntimeError(
                f"{self.name or 'this model'} has no language model; compose "
                "'vision+bridge+language' to generate text"
            )
        batch = pixels.shape[0]
        if prompts is None:
            prompts = [""] * batch
        elif isinstance(prompts, str):
            prompts = [prompts] * batch
        if len(prompts) != batch:
            raise ValueError(f"got {len(prompts)} prompts for {batch} images; give one per image")
        defaults = self.language.generation_defaults(task)
        prefix_embeds, prefix_mask = self.soft_prompt(pixels)
        return self.language.generate(
            prefix_embeds, prefix_mask, list(prompts), GenerationOptions(**{**defaults, **options})
        )

    def answer(
        self,
        pixels: Tensor,
        questions: Sequence[str] | str,
        *,
        prompt: str = "Question: {} Short answer:",
        **options: Any,
    ) -> list[str]:
        """Zero-shot VQA with LAVIS' prompt and decoding (5 beams, max 10; T5 length penalty -1)."""
        if isinstance(questions, str):
            questions = [questions] * pixels.shape[0]
        return self.generate(pixels, [prompt.format(q) for q in questions], task="vqa", **options)

    def save_pretrained(self, directory: Any, format: str = "hf", *, trainable_only: bool = False) -> None:
        """Write a checkpoint directory atomically: format "hf" is what transformers' Blip2* classes
        load, "lavis" a LAVIS checkpoint.pth, "blip2kit" the model's own keys (``trainable_only``
        keeps the parts that train). Each writes blip2kit.json, which ``from_pretrained`` reads."""
        from blip2kit.core.checkpoints import save_pretrained

        save_pretrained(self, directory, format=format, trainable_only=trainable_only)

    # -- bookkeeping ----------------------------------------------------------------------------

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def parameter_summary(self) -> dict[str, ParameterCount]:
        """Per part and in all: total and trainable parameters."""
        parts: dict[str, nn.Module | None] = {
            "vision": self.vision,
            "bridge": self.bridge,
            "projection": self.projection,
            "language": self.language,
        }
        summary = {name: count_parameters(part) for name, part in parts.items() if part is not None}
        summary["total"] = count_parameters(self)
        return summary

    def format_parameter_summary(self) -> str:
        rows = [f"{'part':<12}{'total':>16}{'trainable':>16}"]
        for part, count in self.parameter_summary().items():
            rows.append(f"{part:<12}{count.total:>16,}{count.trainable:>16,}")
        return "\n".join(rows)


def _dtype_of(module: nn.Module) -> torch.dtype:
    """The dtype of a module's floating-point weights (its first one; fp32 if it has none)."""
    for parameter in module.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return torch.float32


__all__ = ["Blip2", "Component", "ParameterCount", "count_parameters"]
