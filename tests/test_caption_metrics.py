"""Captioning metrics through pycocoevalcap: CIDEr equals its own Cider, BLEU a hand computation."""

from __future__ import annotations

import pytest

from blip2kit.core.evaluation import caption_metrics
from blip2kit.core.evaluation.captioning import CaptionMetricsError

# Lower-case, no punctuation: the PTB tokeniser leaves these as they are, so the reference
# scorers below can be fed the same words split on spaces.
REFERENCES = {
    1: ["a dog runs on the grass", "a brown dog running in a park", "the dog is running outside"],
    2: ["two cats sleep on a sofa", "cats sleeping on the couch", "a pair of cats on a sofa"],
    3: ["a man rides a red bicycle", "a person cycling down the street", "a man on a bike"],
    4: ["a plate of food with broccoli", "a meal with rice and broccoli", "food on a white plate"],
}
PREDICTIONS = {
    1: "a dog running on the grass",
    2: "two cats on a couch",
    3: "a man riding a bike down the street",
    4: "a plate of rice",
}


@pytest.fixture(scope="module")
def report() -> dict:
    # One run for the whole module: the PTB tokeniser and METEOR each start a Java process.
    return caption_metrics(PREDICTIONS, REFERENCES)


@pytest.mark.slow
def test_cider_and_rouge_equal_pycocoevalcap_scorers(report: dict) -> None:
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    references = {i: list(c) for i, c in REFERENCES.items()}
    predictions = {i: [c] for i, c in PREDICTIONS.items()}
    cider, cider_per_image = Cider().compute_score(references, predictions)
    rouge, _ = Rouge().compute_score(references, predictions)
    assert report["CIDEr"] == pytest.approx(cider, rel=1e-12)
    assert [report["per_image"][i]["CIDEr"] for i in REFERENCES] == pytest.approx(list(cider_per_image))
    assert report["ROUGE_L"] == pytest.approx(rouge, rel=1e-12)
    assert report["CIDEr"] > 0


@pytest.mark.slow
def test_every_metric_reported_and_spice_never_estimated(report: dict) -> None:
    for name in ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr"):
        assert 0 < report[name] <= 10, name
    assert report["count"] == 4
    from blip2kit.core.evaluation.captioning import spice_unavailable_reason

    reason = spice_unavailable_reason()
    if reason is None:
        assert "SPICE" in report
    else:
        assert "SPICE" not in report
        assert report["unavailable"] == {"SPICE": reason}
        assert "stanford-corenlp-3.6.0" in reason


def test_bleu_on_a_hand_computed_case() -> None:
    # Punctuation and case are removed by the PTB tokeniser: both are "the cat ... mat", 6 words.
    # Clipped n-gram precisions 5/6, 3/5, 1/4, 0/3; equal lengths, so no brevity penalty.
    report = caption_metrics(
        {"img": "The cat sat on the mat."}, {"img": ["the cat is on the mat"]}, metrics=["BLEU"]
    )
    assert report["BLEU_1"] == pytest.approx(5 / 6, rel=1e-6)
    assert report["BLEU_2"] == pytest.approx((5 / 6 * 3 / 5) ** (1 / 2), rel=1e-6)
    assert report["BLEU_3"] == pytest.approx((5 / 6 * 3 / 5 * 1 / 4) ** (1 / 3), rel=1e-6)
    assert report["BLEU_4"] < 1e-3  # no 4-gram matches: only pycocoevalcap's 1e-15 smoothing
    assert set(report) == {"BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "count", "per_image"}


def test_caption_inputs_are_checked_before_java_starts() -> None:
    with pytest.raises(ValueError, match="1 images have references but no prediction"):
        caption_metrics({1: "a dog"}, {1: ["a dog"], 2: ["a cat"]})
    with pytest.raises(ValueError, match=r"1 predictions have no references \(e.g. \['1'\]\).*image_ids of the same type \(int vs str\)"):
        caption_metrics({"1": "a dog"}, {1: ["a dog"]})
    with pytest.raises(ValueError, match="prediction for image_id 1 is int, not a string caption"):
        caption_metrics({1: 7}, {1: ["a dog"]})
    with pytest.raises(ValueError, match="non-empty list of strings"):
        caption_metrics({1: "a dog"}, {1: "a dog"})
    with pytest.raises(ValueError, match="unknown caption metrics"):
        caption_metrics({1: "a dog"}, {1: ["a dog"]}, metrics=["BLEU", "CIDEr-D"])


def test_missing_java_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import blip2kit.core.evaluation.captioning as captioning

    monkeypatch.setattr(captioning.shutil, "which", lambda name: None)
    with pytest.raises(CaptionMetricsError, match="Java is not on PATH"):
        caption_metrics({1: "a dog"}, {1: ["a dog"]})
    assert "needs Java" in captioning.spice_unavailable_reason()
