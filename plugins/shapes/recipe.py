"""The recipe that makes the shapes world's frozen towers (``blip2kit demo towers``).

1. A byte-level BPE tokenizer (the ``tokenizers`` library) trained on the world's train text.
2. ``shapes_vit``: a tiny EVA ViT pretrained CLIP-style (Radford et al. 2021): image vs caption,
   symmetric InfoNCE against a small text tower that exists only for this pretraining. The recipe
   trains one block more than it ships, so the frozen tower's output is the penultimate block, as
   BLIP-2 reads EVA-CLIP. Every step renders fresh scenes from the world's sampler (never a
   held-out pair, never a val or test composition; EVA-CLIP saw far more images than any
   downstream set), each with a twin in the same batch: the same background and noise with the
   shapes or one size changed, a hard negative that only those attributes tell apart.
3. ``shapes_opt``: a tiny ``OPTForCausalLM`` pretrained on text only. Each sequence is a scene
   description (any of its five captions; see ``RecipeSettings.description``), then BOS, then
   either another paraphrase of that scene, or several
   "Question: {q} Short answer: {a}" lines about it, each ended by a newline. The scenes are fresh compositions drawn by the
   world's own sampler (words only, never rendered; no val or test composition; the held-out
   (shape, colour) pairs may be named, as a web-text LLM has read every word pair),
   so the LLM learns to read a description rather than to remember 2000 train scenes, and every
   question type is drawn equally often. The description stands exactly where BLIP-2
   puts the Q-Former's soft prompt (before BOS), and the loss covers only the text after it, which
   is what stage 2 trains. The LLM never sees pixels.

   A second phase ("reading") goes on with the same text but gives the description as perturbed
   embeddings: scaled by up to 8x, with noise, and with runs of neighbouring tokens summed into one
   vector. BLIP-2's billion-parameter LLMs read a soft prompt whose vectors lie far from every
   token embedding (here the Q-Former's are about 5x their norm); a 875k-parameter LLM that saw only
   clean token embeddings does not: given the stage-2 soft prompt it answered "no" to every colour
   and count question while it still captioned. The phase trains in the robustness the large LLMs
   have from scale; it is still text only.
4. Its VQA accuracy on test scenes through the OPT plugin's own generate path, with the ground-truth
   description as the prefix (the ceiling) and with no prefix (the floor), by the official VQAv2
   accuracy.

Everything is seeded; reruns give the same files on the same machine and thread count.
"""

from __future__ import annotations

import json
import math
import random
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blip2kit.core.checkpoints.atomic import atomic_directory, atomic_write_bytes, atomic_write_json
from blip2kit.core.data import shapes
from blip2kit.core.data.images import load_image
from blip2kit.core.interfaces import GenerationOptions
from blip2kit.plugins.language.hf_base import VQA_PROMPT
from blip2kit.plugins.shapes import SHAPES_OPT_CONFIG, SHAPES_VIT_CONFIG
from blip2kit.plugins.shapes.towers import OPT_DIRECTORY, VIT_WEIGHTS, ShapesVisionEncoder, build_shapes_opt

SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2: pad, bos = eos (as OPT), unk
IGNORE_INDEX = -100


@dataclass(frozen=True)
class RecipeSettings:
    seed: int = 0
    world_sizes: dict[str, int] = field(default_factory=lambda: dict(shapes.DEFAULT_SIZES))
    # On fresh scenes with twins the ViT's val R@1 went 0.30 -> 0.92 from 1000 to 4000 steps
    # (class-token head), its loss still falling.
    vision_steps: int = 6000
    vision_batch: int = 128  # contrastive learning wants many negatives per step
    vision_lr: float = 2e-3
    # "sampled": every step renders fresh scenes from the world's sampler (never a held-out pair,
    # never a val or test composition), as EVA-CLIP saw far more images than any downstream set;
    # "train": the train split's 2000 images. On the train split alone the CLIP loss is solved by
    # colours and sizes, and a linear probe read the leftmost shape at chance (0.31, majority 0.28).
    vision_images: str = "sampled"
    # Chance that a sampled scene comes with its twin in the same batch, a hard negative: the same
    # background and noise with the shapes (or one size) changed, so only those tell them apart.
    vision_twin_rate: float = 1.0
    # The CLIP image embedding: "mean" of the last block's patch tokens, or its class token
    # ("cls"). BLIP-2 reads the patch tokens of the block below, so the mean makes them carry
    # the scene: at 1000 steps a linear probe of the shipped (penultimate) tokens read shape /
    # colour / size of held-out test objects at 0.35 / 0.88 / 0.66 against 0.29 / 0.87 / 0.61
    # with the class token, and val R@1 was 0.42 / 0.39 against 0.39 / 0.31.
    vision_pool: str = "mean"
    language_steps: int = 3500
    language_batch: int = 32
    language_lr: float = 2e-3
    # "sampled": each description is a fresh composition from the world's sampler (text only, no
    # val/test composition; see reading_held_out_pairs); "train": the train split's scenes only.
    language_text: str = "sampled"
    vqa_share: float = 0.75  # share of sequences that are questions (the rest copy a paraphrase)
    # The description before BOS: "paraphrase", any of the scene's captions, or "canonical", its
    # first caption (the fixed form "a small red circle on the left, ..."); the paraphrases after
    # BOS come from every template either way. With one form the LLM reads text far better: at
    # 4000 steps its ceiling was 0.929 on all test questions (colour 100%, shape 99.7%), against
    # 0.749 for the shipped paraphrase run, and it jumps to reading between steps 1000 and 1750.
    # But it reads the Q-Former's soft prompt worse: on the same stage-1 run and 200 stage-2
    # steps the demo's VQA was 0.368 against 0.451, and 0.451 again (CIDEr 1.30 against 1.52)
    # when its reading phase took paraphrases. So the shipped tower keeps "paraphrase".
    description: str = "paraphrase"
    # Questions (and answers) after each description in a question sequence: the answer tokens are
    # what teaches the LLM to read the description, so several per sequence give it more signal.
    questions_per_description: int = 4
    # Phase 2, "reading": the same text, the description given as perturbed embeddings (see the
    # module docstring); a fresh AdamW and cosine schedule, its own seeded streams.
    reading_steps: int = 1200
    reading_lr: float = 1e-3
    reading_share: float = 0.7  # share of descriptions perturbed (the rest stay clean tokens)
    reading_max_scale: float = 8.0  # each perturbed description scaled by exp(U(0, ln max))
    reading_noise: float = 0.5  # noise std up to this x the mean token norm / sqrt(width)
    reading_max_merge: int = 3  # runs of 1..max neighbouring tokens summed into one vector
    # Whether the reading phase's descriptions may name a HELD_OUT (shape, colour) pair (phase 1's
    # never do). The held-out pairs test that the Q-Former composes attributes it saw apart in
    # images; the LLM, like BLIP-2's, has read every word pair, and no image of one reaches a tower.
    # Without them the LLM answered questions that name a held-out pair 16-57% right given the true
    # description, against 77-94% for the others.
    reading_held_out_pairs: bool = True
    eval_scenes: int | None = None  # test scenes for the ceiling/floor (None: all)
    # torch CPU threads; 1 is fastest on a machine shared with other jobs (no OpenMP spin-waiting).
    threads: int | None = 1
    parallel: bool = True  # train the two towers in two processes at once

    def __post_init__(self) -> None:
        # Checked here, before minutes of training: a bad value would otherwise surface as a bare
        # torch/math error mid-run (randint(1, 1), log(0)) or silently change what is trained.
        problems = [f"{name} must be at least {low}, got {getattr(self, name)!r}"
                    for name, low in (("vision_steps", 1), ("language_steps", 1), ("reading_steps", 0),
                                      ("vision_batch", 1), ("language_batch", 1), ("reading_max_merge", 1),
                                      ("questions_per_description", 1))
                    if getattr(self, name) < low]
        problems += [f"{name} must lie in [0, 1], got {getattr(self, name)!r}"
                     for name in ("vqa_share", "reading_share", "vision_twin_rate") if not 0 <= getattr(self, name) <= 1]
        problems += [f"{name} must be 'sampled' or 'train', got {getattr(self, name)!r}"
                     for name in ("vision_images", "language_text") if getattr(self, name) not in ("sampled", "train")]
        if self.vision_pool not in ("mean", "cls"):
            problems.append(f"vision_pool must be 'mean' or 'cls', got {self.vision_pool!r}")
        if self.description not in ("canonical", "paraphrase"):
            problems.append(f"description must be 'canonical' or 'paraphrase', got {self.description!r}")
        if self.reading_max_scale < 1:
            problems.append(f"reading_max_scale must be at least 1 (1: no scaling), got {self.reading_max_scale!r}")
        if self.reading_noise < 0:
            problems.append(f"reading_noise must not be negative, got {self.reading_noise!r}")
        if problems:
            raise ValueError("RecipeSettings: " + "; ".join(problems))


# Seconds, not minutes: for tests and CI. Same architectures, so the files load into the cards.
FAST = RecipeSettings(
    world_sizes={"train": 24, "val": 4, "test": 4},
    vision_steps=2, vision_batch=8, language_steps=2, language_batch=8, reading_steps=2, eval_scenes=2,
    parallel=False,
)


# -- tokenizer ---------------------------------------------------------------------------------


def world_texts(scenes: Sequence[shapes.Scene]) -> list[str]:
    """Every caption, and every question with its answer in the VQA prompt format."""
    texts = []
    for scene in scenes:
        texts += scene.captions
        texts += [f"{VQA_PROMPT.format(q['question'])} {q['answer']}" for q in scene.questions]
    return texts


def train_tokenizer(texts: Sequence[str], vocab_size: int) -> Any:
    """A byte-level BPE (GPT-2 / OPT style) as a transformers fast tokenizer that adds BOS first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte, so "\n" is one token
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    bos = SPECIAL_TOKENS[1]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=bos, eos_token=bos, pad_token=SPECIAL_TOKENS[0],
        unk_token=SPECIAL_TOKENS[2], model_max_length=int(SHAPES_OPT_CONFIG["max_position_embeddings"]),
    )


# -- vision: CLIP-style pretraining --------------------------------------------------------------


class TextTower(nn.Module):
    """The pretraining-only text encoder: tokens [B, T] -> normalised features [B, D]."""

    def __init__(self, vocab_size: int, width: int, embed_dim: int, max_length: int, layers: int = 2) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.position_embedding = nn.Parameter(torch.zeros(1, max_length, width))
        layer = nn.TransformerEncoderLayer(width, 4, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.projection = nn.Linear(width, embed_dim, bias=False)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        tokens = self.token_embedding(input_ids) + self.position_embedding[:, : input_ids.shape[1]]  # [B, T, W]
        tokens = self.transformer(tokens, src_key_padding_mask=attention_mask == 0)
        mask = attention_mask.unsqueeze(-1).to(tokens.dtype)  # [B, T, 1]
        pooled = (tokens * mask).sum(1) / mask.sum(1)  # [B, W]: mean over real tokens
        return F.normalize(self.projection(self.norm(pooled)), dim=-1)


def _image_tensor(world_dir: Path, scenes: Sequence[shapes.Scene], transform: Any) -> Tensor:
    images = [transform(load_image(world_dir / "images" / s.file_name)) for s in scenes]
    return torch.stack(images)  # [N, 3, S, S]


def pool_image_tokens(tokens: Tensor, pool: str) -> Tensor:
    """[B, 1 + P, W] -> [B, W]: the class token ("cls") or the mean of the patch tokens ("mean")."""
    return tokens[:, 0] if pool == "cls" else tokens[:, 1:].mean(1)


def _cosine_lr(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def twin_scene(scene: shapes.Scene, rng: random.Random, exclude: set[tuple]) -> shapes.Scene | None:
    """A hard negative for ``scene``: the same background, noise, colours and places, with new
    shapes (two attempts in three) or one object's other size; None when no such twin stays outside
    ``exclude`` and the held-out pairs."""
    from dataclasses import replace

    image_size = int(SHAPES_VIT_CONFIG["image_size"])  # the size the world is rendered at for the ViT
    for _attempt in range(20):
        objects = list(scene.objects)
        if rng.random() < 2 / 3:  # drawn per attempt: a refused shape twin may come back as a size twin
            new_shapes = rng.sample(shapes.SHAPES, len(objects))
            if new_shapes == [o.shape for o in objects]:
                continue
            objects = [replace(o, shape=new) for o, new in zip(objects, new_shapes)]
        else:
            index = rng.randrange(len(objects))
            old = objects[index]
            size = "large" if old.size == "small" else "small"
            radius = old.radius * (shapes.RADIUS_SHARE[size] / shapes.RADIUS_SHARE[old.size])
            slot_width = image_size / len(shapes.SLOTS)
            centre = slot_width * (shapes.SLOTS.index(old.slot) + 0.5)
            room = max(slot_width / 2 - radius - 1, 0)  # keep the resized shape inside its slot and the image
            x = min(max(old.x, centre - room), centre + room)
            y = min(max(old.y, radius + 2), image_size - radius - 2)
            objects[index] = replace(old, size=size, radius=radius, x=x, y=y)
        composition = tuple((o.shape, o.colour, o.size, o.slot) for o in objects)
        if composition in exclude or any((o.shape, o.colour) in shapes.HELD_OUT for o in objects):
            continue
        twin = shapes.Scene(image_id=-1, split="text", file_name="", objects=objects, texture_seed=scene.texture_seed)
        twin.captions = shapes.captions_for(objects, rng)
        return twin
    return None


def sampled_vision_batch(rng: random.Random, batch: int, twin_rate: float, exclude: set[tuple]) -> list[shapes.Scene]:
    """``batch`` freshly sampled scenes, each followed by its twin (a hard negative) with chance
    ``twin_rate``."""
    scenes: list[shapes.Scene] = []
    while len(scenes) < batch:
        scene = shapes.sample_text_scene(rng, exclude, rendered=True)
        scenes.append(scene)
        if len(scenes) < batch and rng.random() < twin_rate:
            twin = twin_scene(scene, rng, exclude)
            if twin is not None:
                scenes.append(twin)
    return scenes


def pretrain_vision(
    world_dir: Path, scenes: Sequence[shapes.Scene], tokenizer: Any, settings: RecipeSettings, progress: bool
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """CLIP-style pretraining; returns the shipped tower's state (its own ``vit.*`` keys) and a log."""
    from tqdm import tqdm

    config = dict(SHAPES_VIT_CONFIG)
    shipped_depth = int(config["depth"])
    tower = ShapesVisionEncoder(
        image_size=config["image_size"], patch_size=config["patch_size"], width=config["width"],
        depth=shipped_depth + 1, num_heads=config["num_heads"], mlp_dim=config["mlp_dim"],
        layer_norm_eps=config["layer_norm_eps"],
    )
    embed_dim = 64
    image_head = nn.Sequential(nn.LayerNorm(tower.width), nn.Linear(tower.width, embed_dim, bias=False))
    text_tower = TextTower(len(tokenizer), 64, embed_dim, max_length=64)
    logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    parameters = [*tower.parameters(), *image_head.parameters(), *text_tower.parameters(), logit_scale]
    optimizer = torch.optim.AdamW(parameters, lr=settings.vision_lr, weight_decay=0.05)

    train = [s for s in scenes if s.split == "train"]
    val = [s for s in scenes if s.split == "val"]
    transform = tower.transform(train=False)
    train_pixels = _image_tensor(world_dir, train, transform) if settings.vision_images == "train" else None  # [N, 3, S, S]
    unseen = {s.composition for s in scenes if s.split in ("val", "test")}
    rng = random.Random(f"shapes-vit-{settings.seed}")

    def encode_images(pixels: Tensor) -> Tensor:
        pooled = pool_image_tokens(tower(pixels), settings.vision_pool)  # of the last (pretraining-only) block
        return F.normalize(image_head(pooled), dim=-1)  # [B, D]

    def encode_texts(texts: Sequence[str]) -> Tensor:
        tokens = tokenizer(list(texts), padding=True, return_tensors="pt", add_special_tokens=False)
        return text_tower(tokens.input_ids, tokens.attention_mask)

    losses = []
    tower.train()
    batch = min(settings.vision_batch, len(train)) if settings.vision_images == "train" else settings.vision_batch
    for step in tqdm(range(settings.vision_steps), desc="shapes_vit (CLIP-style)", disable=not progress):
        for group in optimizer.param_groups:
            group["lr"] = _cosine_lr(step, settings.vision_steps, settings.vision_lr, warmup=max(1, settings.vision_steps // 20))
        if settings.vision_images == "sampled":
            drawn = sampled_vision_batch(rng, settings.vision_batch, settings.vision_twin_rate, unseen)
            pixels = torch.stack([transform(shapes.render(scene)) for scene in drawn])
            captions = [rng.choice(scene.captions) for scene in drawn]
        else:
            index = rng.sample(range(len(train)), batch)
            pixels, captions = train_pixels[index], [rng.choice(train[i].captions) for i in index]
        batch = len(captions)
        image_features, text_features = encode_images(pixels), encode_texts(captions)
        logits = logit_scale.exp().clamp(max=100) * image_features @ text_features.T  # [B, B]
        targets = torch.arange(batch)
        loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())

    # Held-out check of what the tower learned: val image <-> its first caption, R@1 both ways.
    tower.eval()
    with torch.no_grad():
        val_images = encode_images(_image_tensor(world_dir, val, transform))
        val_texts = encode_texts([s.captions[0] for s in val])
        similarity = val_images @ val_texts.T  # [N, N]
        truth = torch.arange(len(val))
        image_to_text = (similarity.argmax(1) == truth).float().mean().item()
        text_to_image = (similarity.argmax(0) == truth).float().mean().item()
    shipped = {
        key: value.detach().clone().contiguous()
        for key, value in tower.state_dict().items()
        if not key.startswith(f"vit.blocks.{shipped_depth}.")  # the extra pretraining block
    }
    log = {
        "steps": settings.vision_steps, "batch": batch, "first_loss": losses[0], "last_loss": losses[-1],
        "loss_curve": losses[:: max(1, len(losses) // 50)],
        "val_r1_image_to_text": image_to_text, "val_r1_text_to_image": text_to_image, "val_images": len(val),
    }
    return shipped, log


# -- language: text-only pretraining ----------------------------------------------------------


QUESTION_TYPES = ("what color is the", "what shape is the", "how many", "is the", "is there a")


Segment = tuple[str, str]  # (prompt, scored target); the prompt "" for a paraphrase to copy


def language_examples(scene: shapes.Scene, rng: random.Random, vqa_share: float = 0.7,
                      question_type: str | None = None, questions: int = 1,
                      description: str = "paraphrase") -> tuple[str, list[Segment]]:
    """(description, segments after BOS): a paraphrase of the description to copy, or ``questions``
    questions about it in the VQA prompt format with their answers, the first of ``question_type``
    where given. The later ones are fresh draws of the world's questions for the same objects: more
    answers to learn from per description, at the cost of a few tokens each. The description is
    the scene's first caption ("canonical") or any of them ("paraphrase")."""
    description = scene.captions[0] if description == "canonical" else rng.choice(scene.captions)
    if rng.random() >= vqa_share:
        return description, [("", rng.choice(scene.captions))]
    first = rng.choice([q for q in scene.questions if question_type in (None, q["question_type"])])
    asked = [first] + [rng.choice(shapes.questions_for(scene.objects, rng)) for _ in range(questions - 1)]
    return description, [(VQA_PROMPT.format(q["question"]), " " + q["answer"]) for q in asked]


def language_scenes(scenes: Sequence[shapes.Scene], settings: RecipeSettings, rng: random.Random,
                    held_out_pairs: bool = False) -> Any:
    """An endless stream of scenes to describe: fresh compositions from the world's sampler (text
    only; never a val or test composition, a held-out pair only with ``held_out_pairs``), or the
    train split's scenes."""
    if settings.language_text == "train":
        train = [s for s in scenes if s.split == "train"]
        while True:
            yield rng.choice(train)
    excluded = {s.composition for s in scenes if s.split in ("val", "test")}
    while True:
        yield shapes.sample_text_scene(rng, excluded, allow_held_out=held_out_pairs)


def language_batch_examples(stream: Any, rng: random.Random, settings: RecipeSettings) -> list[tuple[str, list[Segment]]]:
    """One batch; every question type equally often (relative position needs a two-shape scene,
    so its scene is redrawn until it has one)."""
    examples = []
    for _ in range(settings.language_batch):
        question_type = rng.choice(QUESTION_TYPES)
        scene = next(stream)
        while not any(q["question_type"] == question_type for q in scene.questions):
            scene = next(stream)
        examples.append(language_examples(scene, rng, settings.vqa_share, question_type,
                                          settings.questions_per_description, settings.description))
    return examples


def _language_batch(examples: Sequence[tuple[str, list[Segment]]], tokenizer: Any) -> dict[str, Tensor]:
    """[description ; BOS ; prompt ; target ; "\n" ; prompt ; target ; "\n" ...] right-padded.
    Scored: a caption whole (as stage 2 scores captions), of a question only the answer (as VQA is
    answered)."""
    rows, label_rows = [], []
    bos = tokenizer.bos_token_id
    for description, segments in examples:
        row = tokenizer(description, add_special_tokens=False).input_ids
        labels = [IGNORE_INDEX] * len(row)
        for index, (prompt, target) in enumerate(segments):
            prompt_ids = ([bos] if index == 0 else []) + tokenizer(prompt, add_special_tokens=False).input_ids if prompt else []
            target_ids = tokenizer(target + "\n", add_special_tokens=not prompt).input_ids  # BOS if no prompt
            row += prompt_ids + target_ids
            labels += [IGNORE_INDEX] * len(prompt_ids) + target_ids
        rows.append(row)
        label_rows.append(labels)
    length = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([r + [pad] * (length - len(r)) for r in rows])  # [B, T]
    attention_mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows])
    labels = torch.tensor([r + [IGNORE_INDEX] * (length - len(r)) for r in label_rows])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _reading_batch(
    examples: Sequence[tuple[str, list[Segment]]], tokenizer: Any, embed: nn.Embedding, settings: RecipeSettings,
    generator: torch.Generator,
) -> dict[str, Tensor]:
    """``_language_batch`` as input embeddings, with ``reading_share`` of the descriptions perturbed:
    runs of k ~ U{1..reading_max_merge} neighbouring token embeddings summed into one vector, noise
    of std up to ``reading_noise`` x the mean token norm / sqrt(width), then everything scaled by
    exp(U(0, ln reading_max_scale)). The text after the description and its labels are unchanged."""
    batch = _language_batch(examples, tokenizer)
    token_embeds = embed(batch["input_ids"])  # [B, T, hidden]
    mean_norm = token_embeds.detach().norm(dim=-1).mean()
    rows, label_rows = [], []
    for (description, _), embeds, labels, mask in zip(examples, token_embeds, batch["labels"], batch["attention_mask"]):
        length, prefix_length = int(mask.sum()), len(tokenizer(description, add_special_tokens=False).input_ids)
        prefix = embeds[:prefix_length]
        if torch.rand(1, generator=generator).item() < settings.reading_share:
            run = int(torch.randint(1, settings.reading_max_merge + 1, (1,), generator=generator))
            prefix = torch.stack([chunk.sum(0) for chunk in prefix.split(run)])
            noise_std = torch.rand(1, generator=generator).item() * settings.reading_noise * mean_norm / math.sqrt(prefix.shape[-1])
            prefix = prefix + torch.randn(prefix.shape, generator=generator) * noise_std
            prefix = prefix * math.exp(torch.rand(1, generator=generator).item() * math.log(settings.reading_max_scale))
        rows.append(torch.cat([prefix, embeds[prefix_length:length]]))
        label_rows.append(torch.cat([torch.full((len(prefix),), IGNORE_INDEX), labels[prefix_length:length]]))
    width = max(len(row) for row in rows)
    return {
        "inputs_embeds": torch.stack([F.pad(row, (0, 0, 0, width - len(row))) for row in rows]),
        "attention_mask": torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows]),
        "labels": torch.stack([F.pad(labels, (0, width - len(labels)), value=IGNORE_INDEX) for labels in label_rows]),
    }


def opt_config(tokenizer: Any) -> Any:
    from transformers import OPTConfig

    fields = {k: v for k, v in SHAPES_OPT_CONFIG.items() if k not in {
        "pretrained", "tokenizer", "prompt", "max_text_length", "newline_token_id", "extra_config"}}
    # No dropout: the tower is frozen in BLIP-2 and short pretraining converges faster without it.
    return OPTConfig(**fields, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)


def pretrain_language(
    scenes: Sequence[shapes.Scene], tokenizer: Any, settings: RecipeSettings, progress: bool
) -> tuple[Any, dict[str, Any]]:
    from transformers import OPTForCausalLM

    model = OPTForCausalLM(opt_config(tokenizer))
    model.train()
    # Phase 1: descriptions as tokens. Phase 2 ("reading"): the same text, descriptions perturbed;
    # each phase has its own optimizer, schedule and seeded streams.
    rng = random.Random(f"shapes-opt-{settings.seed}")
    losses = _language_phase(model, scenes, settings, rng, settings.language_steps, settings.language_lr,
                             lambda examples: _language_batch(examples, tokenizer), "shapes_opt (text only)", progress)
    rng = random.Random(f"shapes-opt-reading-{settings.seed}")
    generator = torch.Generator().manual_seed(settings.seed)
    embed = model.get_input_embeddings()
    reading_losses = _language_phase(
        model, scenes, settings, rng, settings.reading_steps, settings.reading_lr,
        lambda examples: _reading_batch(examples, tokenizer, embed, settings, generator),
        "shapes_opt (reading perturbed descriptions)", progress, settings.reading_held_out_pairs,
    )
    model.eval()
    log = {"steps": settings.language_steps, "batch": settings.language_batch, "first_loss": losses[0],
           "last_loss": losses[-1], "loss_curve": losses[:: max(1, len(losses) // 50)],
           "reading_steps": settings.reading_steps, "reading_last_loss": reading_losses[-1] if reading_losses else None,
           "reading_loss_curve": reading_losses[:: max(1, len(reading_losses) // 50)]}
    return model, log


def _language_phase(
    model: Any, scenes: Sequence[shapes.Scene], settings: RecipeSettings, rng: random.Random, steps: int, lr: float,
    make_batch: Any, description: str, progress: bool, held_out_pairs: bool = False,
) -> list[float]:
    """``steps`` AdamW steps (cosine schedule, 5% warm-up) on batches of ``make_batch(examples)``
    (descriptions that name a held-out pair only with ``held_out_pairs``)."""
    from tqdm import tqdm

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    stream = language_scenes(scenes, settings, rng, held_out_pairs)
    losses = []
    for step in tqdm(range(steps), desc=description, disable=not progress):
        for group in optimizer.param_groups:
            group["lr"] = _cosine_lr(step, steps, lr, warmup=max(1, steps // 20))
        examples = language_batch_examples(stream, rng, settings)
        loss = model(**make_batch(examples)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    return losses


# -- the LLM's ceiling and floor ----------------------------------------------------------------


@torch.no_grad()
def answer_from_descriptions(
    language_model: Any, descriptions: Sequence[str | None], questions: Sequence[str], num_beams: int = 1
) -> list[str]:
    """Answers of a blip2kit OPT language model with each description's token embeddings as the
    soft prompt (None: no prefix at all), through the same ``generate`` that BLIP-2 calls."""
    tokenizer = language_model.tokenizer
    token_ids = [tokenizer(d, add_special_tokens=False).input_ids if d else [] for d in descriptions]
    length = max(len(ids) for ids in token_ids)
    # Left-pad the prefix so it ends where the prompt starts, as the queries do.
    padded = torch.tensor([[tokenizer.pad_token_id] * (length - len(ids)) + ids for ids in token_ids], dtype=torch.long)
    prefix_mask = torch.tensor([[0] * (length - len(ids)) + [1] * len(ids) for ids in token_ids], dtype=torch.long)
    prefix_embeds = language_model.embed_tokens(padded)  # [B, L, hidden]
    options = GenerationOptions(num_beams=num_beams, max_new_tokens=5, min_new_tokens=1, length_penalty=0.0)
    prompts = [VQA_PROMPT.format(q) for q in questions]
    return language_model.generate(prefix_embeds, prefix_mask, prompts, options)


def llm_vqa_bounds(
    language_model: Any, world_dir: Path, scenes: Sequence[shapes.Scene], *, limit: int | None = None, batch_size: int = 64
) -> dict[str, Any]:
    """The text-only LLM's official VQA accuracy on test questions, given the ground-truth
    description (ceiling) and given nothing (floor)."""
    from blip2kit.core.evaluation import evaluate_vqa

    test = [s for s in scenes if s.split == "test"][:limit]
    questions, annotations = shapes.vqa_files(test, "shapes_test")
    descriptions = {s.image_id: s.captions[0] for s in test}
    records = questions["questions"]
    result: dict[str, Any] = {"questions": len(records)}
    for name, use_description in (("ceiling", True), ("floor", False)):
        predictions = {}
        for start in range(0, len(records), batch_size):
            chunk = records[start:start + batch_size]
            answers = answer_from_descriptions(
                language_model,
                [descriptions[r["image_id"]] if use_description else None for r in chunk],
                [r["question"] for r in chunk],
            )
            predictions.update({r["question_id"]: a for r, a in zip(chunk, answers)})
        scores = evaluate_vqa(predictions, records, annotations["annotations"])
        # A fraction in [0, 1] (the demo's report convention); the breakdown stays in percent as
        # the official evaluation prints it.
        result[name] = {"accuracy": scores["raw"]["accuracy"] / 100,
                        "per_question_type_percent": scores["per_question_type"]}
    return result


# -- what `blip2kit demo` asks of a towers recipe ---------------------------------------------------


def packaged_seed() -> int | None:
    """The world seed of the towers shipped in this package, or None when none are shipped."""
    from blip2kit.plugins.shapes.towers import ASSETS

    report = ASSETS / "towers.json"
    if not ((ASSETS / VIT_WEIGHTS).is_file() and (ASSETS / OPT_DIRECTORY).is_dir() and report.is_file()):
        return None
    return int(json.loads(report.read_text())["settings"]["seed"])


def made_tower_settings(directory: str | Path) -> dict[str, dict[str, Any]]:
    """Per-slot settings that point the cards at towers ``make_towers`` wrote into ``directory``."""
    vit, opt = str(Path(directory) / VIT_WEIGHTS), str(Path(directory) / OPT_DIRECTORY)
    return {"vision": {"pretrained": vit}, "language": {"pretrained": opt, "tokenizer": opt}}


# -- the whole recipe -----------------------------------------------------------------------------


def _train_vision_tower(world: Path, scenes: Any, tokenizer: Any, settings: RecipeSettings, progress: bool) -> Any:
    if settings.threads:
        torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    tick = time.perf_counter()
    state, log = pretrain_vision(world, scenes, tokenizer, settings, progress)
    return state, {**log, "seconds": time.perf_counter() - tick}


def _train_language_tower(scenes: Any, tokenizer: Any, settings: RecipeSettings, progress: bool) -> Any:
    if settings.threads:
        torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed + 1)
    tick = time.perf_counter()
    model, log = pretrain_language(scenes, tokenizer, settings, progress)
    state = {key: value.detach().clone() for key, value in model.state_dict().items()}
    return state, {**log, "seconds": time.perf_counter() - tick}


def _in_parallel(*jobs: tuple[Any, tuple[Any, ...]], parallel: bool) -> list[Any]:
    """Run (function, args) jobs in spawned processes (or here, in order); results in job order.
    Each job seeds itself, so the results do not depend on which way they ran."""
    if not parallel:
        return [function(*args) for function, args in jobs]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(len(jobs), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(function, *args) for function, args in jobs]
        return [future.result() for future in futures]


def make_towers(
    out_dir: str | Path, *, settings: RecipeSettings = RecipeSettings(), world_dir: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Make both towers under ``out_dir`` (``shapes_vit.safetensors``, ``shapes_opt/``,
    ``towers.json``) and return the report. The world is written to a temporary folder unless
    ``world_dir`` holds one already (its seed must match ``settings.seed``)."""
    threads_before = torch.get_num_threads()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    try:
        return _make_towers(Path(out_dir), settings, world_dir, progress)
    finally:
        torch.set_num_threads(threads_before)


def _make_towers(out: Path, settings: RecipeSettings, world_dir: str | Path | None, progress: bool) -> dict[str, Any]:
    import safetensors.torch

    started = time.perf_counter()
    torch.manual_seed(settings.seed)
    with tempfile.TemporaryDirectory(prefix="shapes-world-") as scratch:
        world = Path(world_dir) if world_dir is not None else Path(scratch)
        if not (world / "scenes.json").is_file():
            shapes.write_world(world, seed=settings.seed, sizes=settings.world_sizes, progress=progress)
        manifest = json.loads((world / "world.json").read_text())
        if manifest["seed"] != settings.seed:
            raise ValueError(
                f"world {world} was written with seed {manifest['seed']}, the recipe runs seed "
                f"{settings.seed}; pass a world of the same seed or none"
            )
        scenes = shapes.read_scenes(world)
        timings = {"world_seconds": time.perf_counter() - started}

        tokenizer = train_tokenizer(world_texts([s for s in scenes if s.split == "train"]), int(SHAPES_OPT_CONFIG["vocab_size"]))
        # The towers are independent: each trains in its own process (one core each on 2 cores).
        tick = time.perf_counter()
        (vision_state, vision_log), (language_state, language_log) = _in_parallel(
            (_train_vision_tower, (world, scenes, tokenizer, settings, progress)),
            (_train_language_tower, (scenes, tokenizer, settings, progress)),
            parallel=settings.parallel,
        )
        timings["towers_seconds"] = time.perf_counter() - tick
        timings["vision_seconds"], timings["language_seconds"] = vision_log.pop("seconds"), language_log.pop("seconds")
        from transformers import OPTForCausalLM

        opt_model = OPTForCausalLM(opt_config(tokenizer))
        opt_model.load_state_dict(language_state)

        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / VIT_WEIGHTS, safetensors.torch.save(vision_state))
        with atomic_directory(out / OPT_DIRECTORY) as staging:
            opt_model.save_pretrained(staging, safe_serialization=True)
            tokenizer.save_pretrained(staging)

        # Measure through the component the card builds, from the files just written.
        tick = time.perf_counter()
        language_model = build_shapes_opt({**SHAPES_OPT_CONFIG, "pretrained": str(out / OPT_DIRECTORY),
                                           "tokenizer": str(out / OPT_DIRECTORY)})
        language_model.eval()
        bounds = llm_vqa_bounds(language_model, world, scenes, limit=settings.eval_scenes)
        timings["evaluation_seconds"] = time.perf_counter() - tick
    timings["total_seconds"] = time.perf_counter() - started
    report = {
        "settings": asdict(settings),
        "threads": torch.get_num_threads(),
        "timings": timings,
        "vision": vision_log,
        "language": language_log,
        "llm_vqa_ceiling": bounds["ceiling"]["accuracy"],
        "llm_vqa_floor": bounds["floor"]["accuracy"],
        "llm_vqa": bounds,
        "tokenizer_size": len(tokenizer),
    }
    atomic_write_json(out / "towers.json", report)
    return report


__all__ = [
    "FAST", "RecipeSettings", "answer_from_descriptions", "llm_vqa_bounds", "made_tower_settings", "make_towers",
    "packaged_seed", "train_tokenizer",
]
