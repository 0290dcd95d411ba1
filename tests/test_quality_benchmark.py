"""``python -m benchmarks quality``: the spread over seeds, which seeds' times count, and which
finished reports are read back instead of run again (the demo itself runs in tests/test_demo.py)."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from benchmarks.quality import METRICS, finished_report, summarise
from blip2kit.core.demo import FAST


def _report(vqa: float, seconds: float, reused: list[str]) -> dict:
    report = {name: 0.5 for name in METRICS}
    return {**report, "vqa_accuracy": vqa, "vqa_accuracy_without_stage1": 0.40, "seconds": seconds,
            "test_questions": 1000, "reused_runs": reused}


def test_spread_and_verdicts_over_seeds_by_hand() -> None:
    summary = summarise({0: _report(0.50, 200.0, []), 1: _report(0.60, 250.0, []), 2: _report(0.41, 30.0, ["stage1"])})
    vqa = summary["metrics"]["vqa_accuracy"]
    assert vqa["per_seed"] == {"0": 0.50, "1": 0.60, "2": 0.41}
    assert vqa["mean"] == pytest.approx(0.50333333)
    assert vqa["std"] == pytest.approx(0.09504385)  # sample standard deviation of 0.50, 0.60, 0.41
    assert (vqa["min"], vqa["max"]) == (0.41, 0.60)
    # Seed 2 kept a finished stage 1: its 30 s timed only the evaluation, so it is left out of the time.
    assert summary["metrics"]["seconds"]["per_seed"] == {"0": 200.0, "1": 250.0}
    assert summary["metrics"]["seconds"]["mean"] == 225.0
    # Against 0.40 on 1000 questions two standard errors of the difference are about 0.044: 0.41 is no gain.
    assert summary["ablation_reproduced_on_seeds"] == [0, 1]
    assert summary["ablation_reproduced"] == "2 of 3 seeds"


def test_no_seed_trained_from_scratch_gives_no_time() -> None:
    summary = summarise({0: _report(0.5, 30.0, ["stage2"])})
    assert "seconds" not in summary["metrics"]
    assert summary["metrics"]["vqa_accuracy"]["std"] == 0.0


@pytest.mark.parametrize("case", ["same", "other_settings", "kept_runs", "no_key", "missing"])
def test_a_finished_report_is_read_back_only_when_it_is_a_whole_run_of_these_settings(tmp_path: Path, case) -> None:
    settings = replace(FAST, seed=3)
    written = {"vqa_accuracy": 0.5, "settings": asdict(settings), "reused_runs": []}
    if case == "other_settings":
        written["settings"] = asdict(replace(settings, stage2_steps=settings.stage2_steps + 1))
    elif case == "kept_runs":
        written["reused_runs"] = ["ablation"]
    elif case == "no_key":  # a report from before blip2kit recorded kept runs
        del written["reused_runs"]
    if case != "missing":
        (tmp_path / "report.json").write_text(json.dumps(written))
    found = finished_report(tmp_path, settings)
    assert (found == written) if case == "same" else (found is None)
