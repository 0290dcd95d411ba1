"""Captioning metrics through pycocoevalcap, as COCO's ``COCOEvalCap`` (and so LAVIS) computes them.

Captions and references go through pycocoevalcap's Stanford PTB tokeniser (lower-cased,
punctuation tokens removed), then BLEU-1..4 (corpus level, "closest" reference length),
METEOR 1.5, ROUGE-L and CIDEr-D. SPICE runs only where Java and the Stanford CoreNLP 3.6.0 jars
it needs sit in pycocoevalcap's ``spice/lib``; otherwise the report says why under
``"unavailable"``. Nothing is downloaded (pycocoevalcap's own SPICE wrapper would fetch the jars)
and nothing is estimated. Scores are fractions in [0, 1] (CIDEr in [0, 10]), as COCOEvalCap gives.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from blip2kit.core.evaluation.predictions import check_prediction_ids

ALL_METRICS = ("BLEU", "METEOR", "ROUGE_L", "CIDEr", "SPICE")
SPICE_CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")


class CaptionMetricsError(RuntimeError):
    """A captioning metric cannot run here (no Java, no pycocoevalcap) or the inputs disagree."""


def caption_metrics(
    predictions: Mapping[Any, str],
    references: Mapping[Any, Sequence[str]],
    *,
    metrics: Collection[str] = ALL_METRICS,
) -> dict[str, Any]:
    """COCO caption metrics of one predicted caption per image against its reference captions.

    :param predictions: image_id -> generated caption.
    :param references: image_id -> the human captions (COCO has five per image). The image ids
        must be the same on both sides: score a subset by passing the subset of references.
    :param metrics: a subset of ``ALL_METRICS`` ("BLEU" gives BLEU_1..BLEU_4).
    Returns ``BLEU_1``..``BLEU_4``, ``METEOR``, ``ROUGE_L``, ``CIDEr`` (and ``SPICE`` where it can
    run), ``count``, ``per_image`` (image_id -> that image's scores; BLEU per image is the
    sentence-level value) and ``unavailable`` (metric -> reason) when SPICE cannot run.
    """
    unknown = set(metrics) - set(ALL_METRICS)
    if unknown:
        raise ValueError(f"unknown caption metrics {sorted(unknown)}; choose from {list(ALL_METRICS)}")
    image_ids = _check_inputs(predictions, references)
    _require_java("the PTB tokeniser that every caption metric reads its tokens from")
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # One tokeniser run (one Java start) for references and predictions together. The tokeniser
    # joins captions with newlines and splits its output on them, so a caption holding any other
    # line break would shift every caption after it onto the wrong image: those become spaces.
    captions = {("reference", i): [{"caption": _one_line(c)} for c in references[i]] for i in image_ids}
    captions.update({("prediction", i): [{"caption": _one_line(predictions[i])}] for i in image_ids})
    tokens = PTBTokenizer().tokenize(captions)
    for key, originals in captions.items():
        if len(tokens.get(key, [])) != len(originals):
            raise CaptionMetricsError(
                f"the PTB tokeniser returned {len(tokens.get(key, []))} captions for the {key[0]}s "
                f"of image {key[1]!r} instead of {len(originals)}; its Java output was cut short"
            )
    reference_tokens = {i: tokens[("reference", i)] for i in image_ids}
    prediction_tokens = {i: tokens[("prediction", i)] for i in image_ids}

    report: dict[str, Any] = {}
    per_image: dict[Any, dict[str, float]] = {i: {} for i in image_ids}
    unavailable: dict[str, str] = {}
    for metric in ALL_METRICS:
        if metric not in metrics:
            continue
        if metric == "SPICE":
            reason = spice_unavailable_reason()
            if reason is not None:
                unavailable["SPICE"] = reason
                continue
        score, scores = _score(metric, reference_tokens, prediction_tokens)
        names = [f"BLEU_{n}" for n in range(1, 5)] if metric == "BLEU" else [metric]
        if metric == "BLEU":
            for name, value, image_values in zip(names, score, scores, strict=True):
                report[name] = float(value)
                for image_id, image_value in zip(image_ids, image_values, strict=True):
                    per_image[image_id][name] = float(image_value)
        else:
            report[metric] = float(score)
            for image_id, image_value in zip(image_ids, scores, strict=True):
                # SPICE gives a dict of sub-scores per image; its headline is the "All" F-score.
                per_image[image_id][metric] = (
                    float(image_value["All"]["f"]) if isinstance(image_value, dict) else float(image_value)
                )
    report["count"] = len(image_ids)
    report["per_image"] = per_image
    if unavailable:
        report["unavailable"] = unavailable
    return report


def _score(
    metric: str, references: dict[Any, list[str]], predictions: dict[Any, list[str]]
) -> tuple[Any, Any]:
    if metric == "BLEU":
        from pycocoevalcap.bleu.bleu import Bleu

        return Bleu(4).compute_score(references, predictions, verbose=0)
    if metric == "METEOR":
        _require_java("METEOR")
        from pycocoevalcap.meteor.meteor import Meteor

        meteor = Meteor()
        try:
            return meteor.compute_score(references, predictions)
        finally:
            del meteor  # stops the METEOR Java process now, not at some later collection
    if metric == "ROUGE_L":
        from pycocoevalcap.rouge.rouge import Rouge

        return Rouge().compute_score(references, predictions)
    if metric == "CIDEr":
        from pycocoevalcap.cider.cider import Cider

        return Cider().compute_score(references, predictions)
    from pycocoevalcap.spice.spice import Spice

    return Spice().compute_score(references, predictions)


def spice_unavailable_reason() -> str | None:
    """Why SPICE cannot run here, or None when Java and its CoreNLP jars are present."""
    if shutil.which("java") is None:
        return "SPICE needs Java (a JRE 8 or newer on PATH)"
    spec = importlib.util.find_spec("pycocoevalcap.spice")
    if spec is None or not spec.submodule_search_locations:
        return "pycocoevalcap has no spice package"
    library = Path(next(iter(spec.submodule_search_locations))) / "lib"
    missing = [jar for jar in SPICE_CORENLP_JARS if not (library / jar).is_file()]
    if missing:
        return (
            f"SPICE needs the Stanford CoreNLP 3.6.0 jars in {library} ({', '.join(missing)} "
            "missing); copy them from stanford-corenlp-full-2015-12-09.zip. blip2kit never "
            "downloads them"
        )
    return None


def _require_java(what: str) -> None:
    if shutil.which("java") is None:
        raise CaptionMetricsError(
            f"Java is not on PATH, and pycocoevalcap runs {what} in Java; install a JRE "
            "(e.g. apt-get install default-jre-headless) and retry"
        )
    try:
        subprocess.run(["java", "-version"], capture_output=True, check=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as error:
        raise CaptionMetricsError(f"'java -version' failed ({error}); pycocoevalcap needs a working Java") from error


def _one_line(caption: str) -> str:
    return " ".join(caption.splitlines())


def _check_inputs(predictions: Mapping[Any, str], references: Mapping[Any, Sequence[str]]) -> list[Any]:
    if not predictions:
        raise ValueError("no predicted captions to evaluate")
    check_prediction_ids(
        predictions, references, id_name="image_id", what="caption",
        unpredicted="images have references but no prediction", unexpected="predictions have no references",
        fix="Pass the references of exactly the predicted images",
    )
    for image_id, captions in references.items():
        if isinstance(captions, str) or not captions or not all(isinstance(c, str) for c in captions):
            raise ValueError(
                f"references for image_id {image_id!r} must be a non-empty list of strings, got {captions!r}"
            )
    return list(predictions)


__all__ = ["ALL_METRICS", "CaptionMetricsError", "caption_metrics", "spice_unavailable_reason"]
