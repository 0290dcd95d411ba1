"""The composed BLIP-2 model: frozen vision encoder -> trainable bridge -> projection -> frozen LLM.

A stage-1 model ("vision+bridge") has no projection and no language model; its loss is the sum of
the stage-1 objectives. A stage-2 model projects the bridge's queries into the LLM as a soft prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from blip2kit.core import validation
from blip2kit.core.interfaces import Bridge, Component, LanguageModel, VisionEncoder
from blip2kit.core.precision import FP32, PrecisionPolicy, check_frozen_llm_dropout, resolve_precision


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
    """Vision encoder + bridge (+ projection + language model), with BLIP-2's freeze policy.

    Dtypes are decided here, at the boundaries between towers, by a precision policy
    (``blip2kit.core.precision``): ``set_precision("bf16")`` puts the frozen towers in bf16 and runs
    the bridge and projection (fp32 weights) under bf16 autocast; ``precision`` names the policy.

    ``frozen_llm_dropout``: "as_released" lets the frozen LLM's own dropout act in training mode
    (LAVIS keeps only the ViT in eval mode); "off" keeps the frozen LLM in eval mode. Its weights
    stay frozen either way.
    """

    def __init__(
        self,
        vision: VisionEncoder,
        bridge: Bridge,
        language: LanguageModel | None = None,
        *,
        name: str = "",
        freeze_vision: bool = True,
        freeze_language: bool = True,
        frozen_llm_dropout: str = "as_released",
    ) -> None:
        super().__init__()
        self.name = name
        self.frozen_llm_dropout = check_frozen_llm_dropout(frozen_llm_dropout)
        self.policy: PrecisionPolicy = FP32
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

    # -- precision and modes --------------------------------------------------------------------

    @property
    def precision(self) -> str:
        """The precision policy's name: "fp32", "bf16", "fp16" (or "frozen-bf16" from dtype=)."""
        return self.policy.name

    def set_precision(
        self,
        precision: str | None = None,
        *,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
    ) -> Blip2:
        """Apply a precision policy: cast the frozen towers (each by its own ``cast_frozen`` rules)
        and keep the bridge and projection in fp32 master weights, run under autocast.

        ``precision`` is "fp32", "bf16", "fp16" or "half" (bf16 where the device has it); ``dtype``
        is the older setting (frozen towers cast, bridge computing in fp32). Casting half towers
        back to fp32 does not restore the rounded-away bits; load the weights again for that.
        ``device``: where the model will run (default: where its first weight is), for "half";
        given when the weights are still on the meta device, to be loaded in these dtypes.
        """
        if device is None:
            first = next(self.parameters(), None)
            device = None if first is None else first.device
        policy = resolve_precision(precision, dtype=dtype, device=device)
        for tower in (self.vision, self.language):
            if tower is not None and tower.frozen:
                tower.cast_frozen(policy.frozen_dtype)
        # What trains keeps fp32 weights whatever the policy (autocast computes in half).
        for part in (self.bridge, self.projection):
            if part is not None:
                part.to(torch.float32)
        for tower in (self.vision, self.language):
            if tower is not None and not tower.frozen:
                tower.to(torch.float32)
        self.policy = policy
        return self

    def _autocast(self, reference: Tensor) -> Any:
        """The policy's autocast context for the trainable parts, on ``reference``'s device."""
        return self.policy.autocast(reference.device.type)

    def train(self, mode: bool = True) -> Blip2:
        super().train(mode)
        if self.language is not None and self.language.frozen and self.frozen_llm_dropout == "as_released":
            # Bypass the frozen tower's eval lock: its dropout acts, its weights stay frozen.
            nn.Module.train(self.language, mode)
        return self

    # -- forward pieces -------------------------------------------------------------------------

    def encode_image(self, pixels: Tensor | None = None, *, image_features: Tensor | None = None) -> Tensor:
        """pixels [B, 3, S, S] -> image_embeds [B, N, vision.width].

        ``image_features`` [B, N, vision.width] (the encoder's outputs, e.g. from a feature cache)
        skip the encoder; give exactly one of the two.

        A frozen encoder runs in its own (policy) dtype, without autocast and without gradient.
        A trained encoder runs under the policy's autocast like the bridge. The features come
        back in the dtype the bridge reads: its own weights' under fp32 compute, the autocast
        dtype under a half policy.
        """
        if (pixels is None) == (image_features is None):
            raise ValueError(
                "give exactly one of pixels (images for the vision encoder) or image_features "
                "(the encoder's outputs, e.g. from a feature cache), got "
                + ("both" if pixels is not None else "neither")
            )
        # The bridge reads its own dtype; under autocast the half features go in as they are.
        target = self.policy.compute_dtype or self.bridge.input_dtype
        if image_features is not None:
            expected = (self.vision.num_tokens, self.vision.width)
            if image_features.dim() != 3 or tuple(image_features.shape[1:]) != expected:
                raise ValueError(
                    f"image_features must be [B, {expected[0]}, {expected[1]}] for this model's encoder, "
                    f"got {list(image_features.shape)}; was the feature cache made for another encoder?"
                )
            bridge_weight = next(self.bridge.parameters())
            return image_features.to(device=bridge_weight.device, dtype=target)
        validation.check_pixels(pixels, self.vision)
        pixels = pixels.to(self.vision.input_dtype)
        if self.vision.frozen:
            with torch.no_grad(), torch.autocast(pixels.device.type, enabled=False):
                image_embeds = self.vision(pixels)  # (B, N, W)
        else:
            with self._autocast(pixels):
                image_embeds = self.vision(pixels)
        return image_embeds.to(target)

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
        with self._autocast(image_embeds):
            query_output = self.bridge(image_embeds)  # [B, Q, bridge.hidden]
            prefix_embeds = self.projection(query_output)  # [B, Q, lm.hidden]
        prefix_mask = torch.ones(prefix_embeds.shape[:2], dtype=torch.long, device=prefix_embeds.device)
        # The LLM runs outside autocast in its own dtypes (T5 keeps wo in fp32).
        return prefix_embeds.to(self.language.input_dtype), prefix_mask

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
        if pixels is not None:
            validation.check_pixels(pixels, self.vision)  # before any other work
        images = pixels if pixels is not None else image_features
        batch = images.shape[0] if images is not None else len(text_input)  # encode_image names a missing one
        text_input = validation.check_texts(text_input, batch, name="text_input")
        if text_output is not None:
            text_output = validation.check_texts(text_output, batch, name="text_output")
        if self.language is None:
            from blip2kit.core.objectives import stage1_losses

            with self._autocast(next(self.bridge.parameters())):  # encode_image checks the inputs
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
        """Captions (no prompt: the language model's configured one), answers or instructions for
        a batch of images; stripped strings.

        ``task`` picks the language model's decoding defaults ('caption': 5 beams, at most 30 new
        tokens; 'vqa': 5 beams, at most 10); ``options`` (GenerationOptions fields) override them.
        """
        if self.language is None:
            raise RuntimeError(
                f"{self.name or 'this model'} has no language model; compose "
                "'vision+bridge+language' to generate text"
            )
        validation.check_pixels(pixels, self.vision)  # before any other work
        # No prompt: the language model's configured one, as the released models use it.
        prompts = validation.broadcast_texts(self.language.prompt if prompts is None else prompts, len(pixels), name="prompts")
        checked_options = validation.generation_options(self.language.generation_defaults(task), options)
        prefix_embeds, prefix_mask = self.soft_prompt(pixels)
        return self.language.generate(prefix_embeds, prefix_mask, prompts, checked_options)

    def answer(
        self,
        pixels: Tensor,
        questions: Sequence[str] | str,
        *,
        prompt: str = "Question: {} Short answer:",
        **options: Any,
    ) -> list[str]:
        """Zero-shot VQA with LAVIS' prompt and decoding (5 beams, max 10; T5 length penalty -1).

        ``prompt`` must hold one '{}', where each question goes.
        """
        validation.check_pixels(pixels, self.vision, values=False)
        prompt = validation.check_answer_prompt(prompt)
        questions = validation.broadcast_texts(questions, len(pixels), name="questions")
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

    # -- features (stage 1): the work is in blip2kit.core.features --------------------------------

    def embed_images(self, pixels: Tensor) -> Any:
        """pixels [B, 3, S, S] -> ``.features`` [B, Q, D] normalised ITC features, ``.query_output`` [B, Q, H]."""
        from blip2kit.core.features import embed_images

        return embed_images(self, pixels)

    def embed_texts(self, texts: Sequence[str] | str, *, max_length: int | None = None) -> Any:
        """Texts -> ``.features`` [B, D] normalised ITC features, ``.token_output`` [B, T, H]."""
        from blip2kit.core.features import embed_texts

        return embed_texts(self, texts, max_length=max_length)

    def match(self, pixels: Tensor, texts: Sequence[str] | str, *, max_length: int | None = None) -> Any:
        """Pairs (pixels[i], texts[i]) -> ``.itm_probability``, ``.itm_logit``, ``.itc_similarity`` [B]."""
        from blip2kit.core.features import match

        return match(self, pixels, texts, max_length=max_length)


__all__ = ["Blip2", "Component", "ParameterCount", "count_parameters"]
