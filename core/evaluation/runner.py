"""Task runners: a model and a dataset in a public format -> predictions, submission file, metrics.

Generation tasks (VQA, GQA, captions) append each batch's predictions to a JSONL file as they come,
so an interrupted run resumes where it stopped; under ``torchrun`` every rank answers its share of
the questions into its own file and rank 0 gathers the files. Retrieval embeds everything and
scores all pairs, on rank 0. Unreadable images are skipped, counted and listed in the metrics JSON.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blip2kit.core.checkpoints.atomic import atomic_write_json
from blip2kit.core.evaluation.datasets import (
    CaptionDataset,
    RetrievalDataset,
    VQADataset,
    read_captions,
    read_gqa,
    read_retrieval,
    read_vqa,
)
from blip2kit.core.evaluation.recipes import Recipe, generation_options, process_question

METRICS_FILE = "metrics.json"
RANKS_FILE = "ranks.json"
SUBMISSION_FILES = {"vqa": "answers.json", "caption": "captions.json"}


# -- distribution ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ranks:
    """Where this process stands among the evaluation processes (1 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    barrier: Callable[[], None] = lambda: None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# -- the append-only predictions file -------------------------------------------------------------


class PredictionLog:
    """JSONL of ``{"id", "prediction"}`` and ``{"id", "image", "skipped"}`` records, appended per batch.

    A run killed mid-write leaves a last line without its newline: reading ignores it and opening
    for append cuts it off, so the record is simply made again.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle: Any = None

    @staticmethod
    def read(paths: Iterable[Path]) -> tuple[dict[Any, str], dict[Any, dict[str, str]]]:
        """(id -> prediction, id -> {"image", "reason"}) of every complete record in ``paths``."""
        predictions: dict[Any, str] = {}
        skipped: dict[Any, dict[str, str]] = {}
        for path in paths:
            lines = path.read_bytes().split(b"\n")[:-1]  # the piece after the last newline is partial
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    key = record["id"]
                except (json.JSONDecodeError, KeyError, TypeError) as error:
                    raise ValueError(
                        f"{path}:{number}: not a predictions record ({error}); the file is damaged, "
                        "delete it (or the line) to make those predictions again"
                    ) from error
                if "skipped" in record:
                    skipped[key] = {"image": record.get("image", ""), "reason": record["skipped"]}
                    predictions.pop(key, None)
                else:
                    predictions[key] = record["prediction"]
                    skipped.pop(key, None)
        return predictions, skipped

    def __enter__(self) -> PredictionLog:
        if self.path.exists():
            content = self.path.read_bytes()
            complete = content.rfind(b"\n") + 1
            if complete != len(content):
                with self.path.open("r+b") as handle:  # drop a partial last line before appending
                    handle.truncate(complete)
        self._handle = self.path.open("a", encoding="utf-8")
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._handle.close()

    def write(self, records: Sequence[dict[str, Any]]) -> None:
        self._handle.write("".join(json.dumps(record) + "\n" for record in records))
        self._handle.flush()
        os.fsync(self._handle.fileno())


def log_paths(out_dir: Path) -> list[Path]:
    """Every rank's predictions file in ``out_dir`` (a resumed run may use another world size)."""
    return sorted(out_dir.glob("predictions*.jsonl"))


def log_path(out_dir: Path, ranks: Ranks) -> Path:
    return out_dir / ("predictions.jsonl" if ranks.world_size == 1 else f"predictions.rank{ranks.rank}.jsonl")


# -- images ---------------------------------------------------------------------------------------


def load_pixels(
    paths: Sequence[Path], transform: Callable[[Any], Any]
) -> tuple[list[Any], list[int], list[tuple[int, str]]]:
    """(pixel tensors, indices of the images read, (index, reason) of the others) of ``paths``."""
    from blip2kit.core.data.images import ImageError, load_image

    pixels, kept, failures = [], [], []
    for index, path in enumerate(paths):
        try:
            pixels.append(transform(load_image(path)))
            kept.append(index)
        except ImageError as error:
            failures.append((index, str(error)))
    return pixels, kept, failures


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _progress(total: int, description: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit="item", disable=not enabled, dynamic_ncols=True)


# -- generation tasks -----------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationItem:
    key: Any  # question_id or image_id
    image: Path
    prompt: str


def generate_into_log(
    model: Any,
    recipe: Recipe,
    items: Sequence[GenerationItem],
    out_dir: Path,
    *,
    batch_size: int,
    ranks: Ranks = Ranks(),
    progress: bool = True,
) -> None:
    """Predict every item not already in ``out_dir``'s predictions files; this rank takes every
    ``world_size``-th of the remaining ones and appends to its own file."""
    import torch

    done, skipped = PredictionLog.read(log_paths(out_dir))
    ranks.barrier()  # every rank splits the same pending list: none may write before all have read
    pending = [item for item in items if item.key not in done and item.key not in skipped]
    mine = pending[ranks.rank :: ranks.world_size]
    device = next(model.parameters()).device
    transform = model.vision.transform()
    bar = _progress(len(mine), recipe.task, progress and ranks.is_main)
    if done or skipped:
        bar.write(f"resuming: {len(done) + len(skipped)} of {len(items)} already in {out_dir}")
    with PredictionLog(log_path(out_dir, ranks)) as log, torch.inference_mode():
        for batch in _batches(mine, batch_size):
            pixels, kept, failures = load_pixels([item.image for item in batch], transform)
            records = [{"id": batch[index].key, "image": str(batch[index].image), "skipped": reason}
                       for index, reason in failures]
            if kept:
                prompts = [batch[index].prompt for index in kept]
                options = generation_options(model.language, recipe, prompts)
                texts = model.generate(torch.stack(pixels).to(device), prompts, task=recipe.kind, **options)
                records += [{"id": batch[index].key, "prediction": text} for index, text in zip(kept, texts)]
            log.write(records)
            bar.update(len(batch))
    bar.close()


def _skipped_report(skipped: dict[Any, dict[str, str]]) -> dict[str, Any]:
    return {"count": len(skipped),
            "items": [{"id": key, "image": value["image"], "reason": value["reason"]} for key, value in skipped.items()]}


def _finish(out_dir: Path, document: dict[str, Any]) -> dict[str, Any]:
    atomic_write_json(out_dir / METRICS_FILE, document)
    return document


def _generate_all(
    model: Any, recipe: Recipe, items: Sequence[GenerationItem], out_dir: Path, *,
    batch_size: int, ranks: Ranks, progress: bool,
) -> tuple[dict[Any, str], dict[Any, dict[str, str]], list[Any]] | None:
    """Every rank generates its share into the log; rank 0 then reads all of it back and gets
    (predictions, skipped unreadable images, the predicted keys in dataset order). Other ranks: None."""
    generate_into_log(model, recipe, items, out_dir, batch_size=batch_size, ranks=ranks, progress=progress)
    ranks.barrier()
    if not ranks.is_main:
        return None
    predictions, skipped = PredictionLog.read(log_paths(out_dir))
    return predictions, skipped, [item.key for item in items if item.key in predictions]


def run_vqa(
    model: Any,
    recipe: Recipe,
    dataset: VQADataset,
    out_dir: Path,
    *,
    batch_size: int = 8,
    ranks: Ranks = Ranks(),
    progress: bool = True,
) -> dict[str, Any] | None:
    """VQAv2, OK-VQA or GQA: answers -> ``answers.json`` and the official metric -> ``metrics.json``.

    Returns the metrics document on rank 0, None on the other ranks.
    """
    from blip2kit.core.evaluation import evaluate_gqa, evaluate_okvqa, evaluate_vqa

    items = [GenerationItem(s.question_id, s.image, recipe.prompt.format(process_question(s.question)))
             for s in dataset.samples]
    generated = _generate_all(model, recipe, items, out_dir, batch_size=batch_size, ranks=ranks, progress=progress)
    if generated is None:
        return None
    predictions, skipped, order = generated
    if recipe.task == "gqa":  # GQA's official submission format
        submission = [{"questionId": key, "prediction": predictions[key]} for key in order]
    else:
        submission = [{"question_id": key, "answer": predictions[key]} for key in order]
    atomic_write_json(out_dir / SUBMISSION_FILES["vqa"], submission)

    answered = {key: predictions[key] for key in order}
    metrics, reason = None, None
    if not answered:
        reason = "no question was answered (every image was unreadable)"
    elif recipe.task == "gqa":
        graded = [q for q in dataset.questions if q["question_id"] in answered and q.get("answer") is not None]
        if graded:
            metrics = evaluate_gqa({q["question_id"]: answered[q["question_id"]] for q in graded}, graded)
        else:
            reason = "the questions file holds no answers (a test split): submission only"
    elif dataset.annotations:
        # Questions whose image was unreadable have no prediction; they are left out and listed.
        questions = [q for q in dataset.questions if q["question_id"] in answered]
        annotations = [a for a in dataset.annotations if a["question_id"] in answered]
        evaluate = evaluate_okvqa if recipe.task == "okvqa" else evaluate_vqa
        metrics = evaluate(answered, questions, annotations)
    else:
        reason = "no annotations file given: submission only"
    return _finish(out_dir, _document(recipe, len(items), len(answered), skipped, metrics, reason))


def run_captions(
    model: Any,
    recipe: Recipe,
    dataset: CaptionDataset,
    out_dir: Path,
    *,
    batch_size: int = 8,
    ranks: Ranks = Ranks(),
    progress: bool = True,
    caption_metric_names: Sequence[str] | None = None,
) -> dict[str, Any] | None:
    """COCO Karpathy or NoCaps: captions -> ``captions.json``, pycocoevalcap metrics -> ``metrics.json``
    (NoCaps also per domain). ``caption_metric_names`` picks a subset of ``caption_metrics``' metrics
    (METEOR alone starts a 2 GB Java process). Returns the metrics document on rank 0, None on the others."""
    from blip2kit.core.evaluation import caption_metrics

    items = [GenerationItem(s.image_id, s.image, recipe.prompt) for s in dataset.samples]
    generated = _generate_all(model, recipe, items, out_dir, batch_size=batch_size, ranks=ranks, progress=progress)
    if generated is None:
        return None
    predictions, skipped, order = generated
    atomic_write_json(out_dir / SUBMISSION_FILES["caption"],
                      [{"image_id": key, "caption": predictions[key]} for key in order])

    graded = [key for key in order if dataset.references.get(key)]
    metrics, reason = None, None
    if not order:
        reason = "no image was captioned (every image was unreadable)"
    elif not graded:
        reason = "the annotation file holds no reference captions (a test split): submission only"
    else:
        chosen = {} if caption_metric_names is None else {"metrics": tuple(caption_metric_names)}

        def score(keys: Sequence[Any]) -> dict[str, Any]:
            return caption_metrics({k: predictions[k] for k in keys}, {k: dataset.references[k] for k in keys},
                                   **chosen)

        metrics = score(graded)
        if dataset.domains:  # NoCaps reports in-, near- and out-domain besides the whole
            metrics = {"overall": metrics}
            for domain in sorted({dataset.domains[key] for key in graded if key in dataset.domains}):
                metrics[domain] = score([key for key in graded if dataset.domains.get(key) == domain])
    return _finish(out_dir, _document(recipe, len(items), len(order), skipped, metrics, reason))


def run_retrieval(
    model: Any,
    recipe: Recipe,
    dataset: RetrievalDataset,
    out_dir: Path,
    *,
    batch_size: int = 32,
    ranks: Ranks = Ranks(),
    progress: bool = True,
) -> dict[str, Any] | None:
    """Karpathy retrieval with BLIP-2's protocol (ITC top-``k_test`` re-ranked by ITM): Recall@K ->
    ``metrics.json``, the rank of the true match of every query -> ``ranks.json``.

    Under torchrun every rank embeds everything and re-ranks its block of the queries
    (``retrieval_scores``); rank 0 writes. Returns the metrics document on rank 0, None elsewhere.
    """
    import torch

    from blip2kit.core.evaluation import recall_at_k, retrieval_scores

    transform = model.vision.transform()
    device = next(model.parameters()).device
    image_batches, kept, skipped = [], [], {}
    bar = _progress(len(dataset.images), f"{recipe.task} images", progress and ranks.is_main)
    for start in range(0, len(dataset.images), batch_size):
        paths = dataset.images[start : start + batch_size]
        pixels, read, failures = load_pixels(paths, transform)
        if pixels:
            image_batches.append(torch.stack(pixels).to(device))
        kept += [start + index for index in read]
        for index, reason in failures:
            skipped[dataset.image_ids[start + index]] = {"image": str(paths[index]), "reason": reason}
        bar.update(len(paths))
    bar.close()
    if not kept:
        document = _document(recipe, len(dataset.images), 0, skipped, None, "no image could be read")
        return _finish(out_dir, document) if ranks.is_main else None
    # An unreadable image leaves the gallery with its captions, so every query keeps a true match.
    texts, img2txt, txt2img, text_ids = [], [], [], []
    for new_index, old_index in enumerate(kept):
        img2txt.append([])
        for text_index in dataset.img2txt[old_index]:
            img2txt[-1].append(len(texts))
            txt2img.append(new_index)
            texts.append(dataset.texts[text_index])
            text_ids.append(text_index)
    with torch.inference_mode():
        scores_i2t, scores_t2i = retrieval_scores(model, image_batches, texts, k_test=recipe.k_test,
                                                  batch_size=batch_size, show_progress=progress,
                                                  split_across_ranks=ranks.world_size > 1)
    if not ranks.is_main:
        return None
    metrics = recall_at_k(scores_i2t, scores_t2i, img2txt, txt2img)
    image_ranks = metrics.pop("image_to_text_ranks")
    text_ranks = metrics.pop("text_to_image_ranks")
    atomic_write_json(out_dir / RANKS_FILE, {
        "note": "1-based rank of the true match; an image's is that of its best-ranked caption",
        "image_to_text": [{"image_id": dataset.image_ids[old], "rank": rank} for old, rank in zip(kept, image_ranks)],
        "text_to_image": [{"text_index": old, "text": dataset.texts[old], "rank": rank}
                          for old, rank in zip(text_ids, text_ranks)],
    })
    document = _document(recipe, len(dataset.images), len(kept), skipped, metrics, None)
    document["texts"] = len(texts)
    return _finish(out_dir, document)


def _document(
    recipe: Recipe, total: int, predicted: int, skipped: dict[Any, dict[str, str]],
    metrics: dict[str, Any] | None, reason: str | None,
) -> dict[str, Any]:
    document: dict[str, Any] = {
        "task": recipe.task,
        "settings": recipe.settings(),
        "total": total,
        "evaluated": predicted,
        "skipped": _skipped_report(skipped),
        "metrics": metrics,
    }
    if reason is not None:
        document["metrics_unavailable"] = reason
    return document


# -- one entry point per task ---------------------------------------------------------------------


def load_dataset(recipe: Recipe, *, images: str | Path, questions: str | Path | None = None,
                 annotations: str | Path | None = None) -> Any:
    """The dataset of ``recipe.task`` from its public files (``questions``: the questions JSON for
    VQA tasks; ``annotations``: VQA annotations, the captions file, or the retrieval file)."""
    if recipe.kind == "vqa":
        if questions is None:
            raise ValueError(f"task {recipe.task} needs --questions (the questions JSON)")
        if recipe.task == "gqa":
            return read_gqa(questions, images)
        return read_vqa(questions, annotations, images)
    if annotations is None:
        what = "the captions JSON" if recipe.kind == "caption" else "the Karpathy retrieval JSON"
        raise ValueError(f"task {recipe.task} needs --annotations ({what})")
    if recipe.kind == "caption":
        return read_captions(annotations, images, split=recipe.split)
    return read_retrieval(annotations, images, split=recipe.split)


def run_task(model: Any, recipe: Recipe, dataset: Any, out_dir: str | Path, **options: Any) -> dict[str, Any] | None:
    """Run ``recipe`` on ``dataset`` (from ``load_dataset``) into ``out_dir``; see the run_* functions."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runner = {"vqa": run_vqa, "caption": run_captions, "retrieval": run_retrieval}[recipe.kind]
    if recipe.kind != "caption":
        options.pop("caption_metric_names", None)
    if recipe.kind != "retrieval" and model.language is None:
        raise ValueError(f"task {recipe.task} generates text; {model.name or 'this model'} has no "
                         "language model (compose vision+bridge+language)")
    return runner(model, recipe, dataset, out_dir, **options)


__all__ = [
    "GenerationItem",
    "METRICS_FILE",
    "PredictionLog",
    "RANKS_FILE",
    "Ranks",
    "SUBMISSION_FILES",
    "generate_into_log",
    "load_dataset",
    "load_pixels",
    "run_captions",
    "run_retrieval",
    "run_task",
    "run_vqa",
]
