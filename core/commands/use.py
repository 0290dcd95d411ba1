"""Commands for people: ``caption``, ``ask``, ``retrieve`` and ``embed`` on any model blip2kit loads.

Every command reads its images (and checks its paths) before loading the model, so a wrong path
costs a second, not a model load; it batches, and prints text or, with ``--json``, JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from blip2kit.core.commands.common import add_model_options, batches, existing_files, load_model, one_line_errors

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
RETRIEVAL_DIRECTIONS = ("text-to-image", "image-to-text", "both")


def register(commands: argparse._SubParsersAction) -> None:
    caption = commands.add_parser("caption", help="caption images")
    caption.add_argument("images", nargs="+", metavar="IMAGE")
    caption.add_argument("--prompt", help="text the caption continues (default: the model's own prompt)")
    _add_decoding(caption, batch_size=8)
    caption.set_defaults(handler=one_line_errors(command_caption))

    ask = commands.add_parser("ask", help="answer a question about an image (zero-shot VQA)")
    ask.add_argument("image", metavar="IMAGE")
    ask.add_argument("question")
    ask.add_argument("--prompt", help='question template with {} (default "Question: {} Short answer:")')
    _add_decoding(ask, batch_size=1)
    ask.set_defaults(handler=one_line_errors(command_ask))

    retrieve = commands.add_parser("retrieve", help="rank a folder of images for each text, or the texts for "
                                   "each image (ITC + ITM)")
    retrieve.add_argument("--images", required=True, help="folder of images")
    retrieve.add_argument("--texts", required=True, help="text file, one text per line")
    retrieve.add_argument("--direction", choices=RETRIEVAL_DIRECTIONS, default="text-to-image",
                          help="text-to-image: the best images for each text (default); image-to-text: the best "
                               "texts for each image; both: the two, as {\"text_to_image\", \"image_to_text\"}")
    retrieve.add_argument("--top", type=int, default=5, help="matches listed per query (default 5)")
    retrieve.add_argument("--k-test", type=int, default=128, help="ITC candidates re-ranked by ITM")
    retrieve.add_argument("--batch-size", type=int, default=16)
    add_model_options(retrieve)
    retrieve.set_defaults(handler=one_line_errors(command_retrieve))

    embed = commands.add_parser("embed", help="ITC features (and the Q-Former outputs behind them) of images and "
                                "texts into a .safetensors file")
    embed.add_argument("inputs", nargs="+", metavar="IMAGE_OR_TEXT",
                       help="an existing file is an image; any other argument is a text")
    embed.add_argument("--out", required=True, help="FILE.safetensors to write")
    embed.add_argument("--batch-size", type=int, default=16)
    add_model_options(embed)
    embed.set_defaults(handler=one_line_errors(command_embed))


def _add_decoding(parser: argparse.ArgumentParser, *, batch_size: int) -> None:
    parser.add_argument("--num-beams", type=int)
    parser.add_argument("--max-len", type=int, help="new tokens at most")
    parser.add_argument("--min-len", type=int, help="LAVIS min_len (counts BOS/prompt or start token)")
    parser.add_argument("--batch-size", type=int, default=batch_size)
    add_model_options(parser)


def read_pixels(paths: list[Path], model: Any) -> Any:
    """[B, 3, S, S] pixels of ``paths`` on the model's device; an unreadable image is an ImageError."""
    import torch

    from blip2kit.core.data.images import load_image

    transform = model.vision.transform()
    device = next(model.parameters()).device
    return torch.stack([transform(load_image(path)) for path in paths]).to(device)


def _check_images(paths: list[Path]) -> None:
    """Decode every image once before the model loads: an unreadable one fails in a second."""
    from blip2kit.core.data.images import load_image

    for path in paths:
        load_image(path)


def _generate(model: Any, recipe: Any, paths: list[Path], prompts: list[str], batch_size: int) -> list[str]:
    import torch

    from blip2kit.core.evaluation.recipes import generation_options

    texts: list[str] = []
    with torch.inference_mode():
        for path_batch, prompt_batch in zip(batches(paths, batch_size), batches(prompts, batch_size)):
            options = generation_options(model.language, recipe, prompt_batch)
            pixels = read_pixels(path_batch, model)
            texts += model.generate(pixels, prompt_batch, task=recipe.kind, **options)
    return texts


def _needs_language(model: Any, command: str) -> None:
    if model.language is None:
        raise ValueError(f"{command} generates text; {model.name or 'this model'} has no language model "
                         "(use a vision+bridge+language model)")


def command_caption(args: argparse.Namespace) -> int:
    from blip2kit.core.evaluation.recipes import recipe

    paths = existing_files(args.images, "image")
    _check_images(paths)
    model = load_model(args.model, device=args.device, precision=args.precision)
    _needs_language(model, "caption")
    prompt = args.prompt if args.prompt is not None else getattr(model.language, "prompt", "")
    settings = recipe("coco_caption", prompt=prompt, num_beams=args.num_beams, max_len=args.max_len,
                      min_len=args.min_len)
    captions = _generate(model, settings, paths, [settings.prompt] * len(paths), args.batch_size)
    records = [{"image": str(path), "caption": text} for path, text in zip(args.images, captions)]
    if args.json:
        print(json.dumps(records, indent=2))
    else:
        for record in records:
            print(f"{record['image']}\t{record['caption']}")
    return 0


def command_ask(args: argparse.Namespace) -> int:
    from blip2kit.core.evaluation.recipes import process_question, recipe

    paths = existing_files([args.image], "image")
    _check_images(paths)
    model = load_model(args.model, device=args.device, precision=args.precision)
    _needs_language(model, "ask")
    settings = recipe("vqav2", prompt=args.prompt, num_beams=args.num_beams, max_len=args.max_len,
                      min_len=args.min_len)
    if "{}" not in settings.prompt:
        raise ValueError(f"--prompt {settings.prompt!r} has no {{}} for the question")
    answer = _generate(model, settings, paths, [settings.prompt.format(process_question(args.question))], 1)[0]
    if args.json:
        print(json.dumps({"image": args.image, "question": args.question, "answer": answer}, indent=2))
    else:
        print(answer)
    return 0


def _image_folder(folder: str) -> list[Path]:
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"images folder {folder!r} does not exist")
    paths = sorted(path for path in root.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ValueError(f"images folder {folder!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return paths


def best_matches(scores: Any, top: int) -> list[list[tuple[int, float]]]:
    """scores [queries, candidates] (higher = better) -> per query, its ``top`` best (candidate, score)."""
    import torch

    scores = torch.as_tensor(scores).float()
    best = scores.topk(min(top, scores.shape[1]), dim=1)
    return [list(zip(indices, values)) for indices, values in zip(best.indices.tolist(), best.values.tolist())]


def command_retrieve(args: argparse.Namespace) -> int:
    import torch

    from blip2kit.core.evaluation import retrieval_scores

    paths = _image_folder(args.images)
    text_file = existing_files([args.texts], "texts file")[0]
    texts = [line.strip() for line in text_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise ValueError(f"texts file {args.texts!r} holds no text; give one text per line")
    if args.top < 1:
        raise ValueError(f"--top must be at least 1, got {args.top}")
    _check_images(paths)
    model = load_model(args.model, device=args.device, precision=args.precision)
    with torch.inference_mode():
        image_batches = [read_pixels(batch, model) for batch in batches(paths, args.batch_size)]
        # Both directions come out of one call: the ITC matrix is shared, each re-ranks its own top k.
        scores_i2t, scores_t2i = retrieval_scores(model, image_batches, texts, k_test=args.k_test,
                                                  batch_size=args.batch_size)  # [I, T], [T, I]
    results: dict[str, list[dict[str, Any]]] = {}
    if args.direction in ("text-to-image", "both"):
        results["text_to_image"] = [
            {"text": text, "images": [{"image": str(paths[index]), "score": score} for index, score in hits]}
            for text, hits in zip(texts, best_matches(scores_t2i, args.top))
        ]
    if args.direction in ("image-to-text", "both"):
        results["image_to_text"] = [
            {"image": str(path), "texts": [{"text": texts[index], "score": score} for index, score in hits]}
            for path, hits in zip(paths, best_matches(scores_i2t, args.top))
        ]
    if args.json:
        print(json.dumps(results if args.direction == "both" else next(iter(results.values())), indent=2))
        return 0
    for direction, records in results.items():
        if args.direction == "both":
            print(f"# {direction.replace('_', ' ')}")
        query, match = ("text", "image") if direction == "text_to_image" else ("image", "text")
        for record in records:
            print(record[query])
            for rank, hit in enumerate(record[f"{match}s"], start=1):
                print(f"  {rank}. {hit[match]}  {hit['score']:.4f}")
    return 0


def split_inputs(inputs: list[str]) -> tuple[list[Path], list[str]]:
    """(images, texts): an existing file is an image; an argument that looks like an image file but
    does not exist is an error, not a text."""
    images, texts = [], []
    for value in inputs:
        path = Path(value)
        if path.is_file():
            images.append(path)
        elif path.suffix.lower() in IMAGE_SUFFIXES and " " not in value:
            raise FileNotFoundError(f"image {value!r} does not exist (to embed it as text, add a space)")
        else:
            texts.append(value)
    return images, texts


def _cat_padded(parts: list[Any]) -> Any:
    """Concatenate batches [b, L_i, ...] along the batch, zero-padding dimension 1 to the longest L_i
    (a bridge may pad each batch only to its own longest text)."""
    import torch
    import torch.nn.functional as F

    length = max(part.shape[1] for part in parts)
    padded = []
    for part in parts:
        pad = [0, 0] * (part.dim() - 2) + [0, length - part.shape[1]]  # F.pad lists the last dimension first
        padded.append(F.pad(part, pad))
    return torch.cat(padded)


def command_embed(args: argparse.Namespace) -> int:
    import torch
    from safetensors.torch import save

    from blip2kit.core.checkpoints.atomic import atomic_write_bytes

    if not args.out.endswith(".safetensors"):
        raise ValueError(f"--out {args.out!r} should end in .safetensors")
    images, texts = split_inputs(args.inputs)
    _check_images(images)
    model = load_model(args.model, device=args.device, precision=args.precision)
    tensors: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        if images:
            outputs = [model.embed_images(read_pixels(batch, model)) for batch in batches(images, args.batch_size)]
            tensors["image_features"] = torch.cat([o.features for o in outputs])  # [I, Q, 256]
            tensors["image_query_output"] = torch.cat([o.query_output for o in outputs])  # [I, Q, H]
        if texts:
            outputs = [model.embed_texts(batch) for batch in batches(texts, args.batch_size)]
            tensors["text_features"] = torch.cat([o.features for o in outputs])  # [T, 256]
            # LAVIS extract_features(mode="text")'s text_embeds: the text-only output of every token,
            # with the mask that says which tokens are padding.
            tensors["text_token_output"] = _cat_padded([o.token_output for o in outputs])  # [T, L, H]
            tensors["text_attention_mask"] = _cat_padded([o.attention_mask for o in outputs])  # [T, L]
    tensors = {name: (value.float() if value.is_floating_point() else value).cpu().contiguous()
               for name, value in tensors.items()}
    metadata = {"images": json.dumps([str(path) for path in images]), "texts": json.dumps(texts),
                "model": args.model}
    atomic_write_bytes(args.out, save(tensors, metadata=metadata))
    summary = {"out": args.out, "images": [str(path) for path in images], "texts": texts,
               "tensors": {name: list(value.shape) for name, value in tensors.items()}}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for name, shape in summary["tensors"].items():
            print(f"{name}: {shape}")
        print(f"written: {args.out}")
    return 0


__all__ = ["IMAGE_SUFFIXES", "RETRIEVAL_DIRECTIONS", "best_matches", "command_ask", "command_caption",
           "command_embed", "command_retrieve", "register", "split_inputs"]
