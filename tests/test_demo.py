"""``blip2kit demo --fast`` end to end: the report holds every key with sane values, the plots are
PNG files, the runs are real ``blip2kit train`` run directories, and the demo's stage-2 model
serves ``blip2kit caption`` and ``blip2kit ask``."""

from __future__ import annotations

import json
import math

import pytest

from blip2kit.core.cli import main
from blip2kit.core.demo import REPORT_KEYS

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    assert main(["demo", "--fast", "--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_fast_demo_writes_report_with_every_key(demo_run, capsys):
    report = json.loads((demo_run / "report.json").read_text())
    missing = [key for key in REPORT_KEYS if key not in report]
    assert not missing, f"report.json lacks {missing}"
    for key in REPORT_KEYS:
        value = report[key]
        assert isinstance(value, float) and math.isfinite(value), (key, value)
        if key not in ("seconds", "caption_cider"):
            assert 0.0 <= value <= 1.0, (key, value)
    assert report["caption_cider"] >= 0.0
    assert report["seconds"] > 0
    # The counts come from the evaluation runners reading the world's test files.
    world = json.loads((demo_run / "world" / "world.json").read_text())
    assert report["test_images"] == world["sizes"]["test"]
    questions = json.loads((demo_run / "world" / world["files"]["test"]["vqa_questions"]).read_text())
    assert report["test_questions"] == len(questions["questions"])


@pytest.mark.slow
def test_fast_demo_draws_plots_and_keeps_real_runs(demo_run):
    report = json.loads((demo_run / "report.json").read_text())
    for name in ("losses", "grid"):
        path = demo_run / report["plots"][name].split("/")[-1]
        assert path.is_file() and path.read_bytes()[:8] == PNG_SIGNATURE, name
    for run in ("stage1", "stage2", "ablation"):
        assert (demo_run / run / "config.yaml").is_file()
        assert (demo_run / run / "metrics.jsonl").read_text().strip()
        assert list((demo_run / run / "checkpoints").glob("step-*/model/blip2kit.json"))
    stage2 = (demo_run / "stage2" / "config.yaml").read_text()
    ablation = (demo_run / "ablation" / "config.yaml").read_text()
    assert "stage1" in stage2 and "init_from: null" in ablation  # the ablation skips stage 1


@pytest.mark.slow
def test_fast_demo_trains_every_stage_on_one_feature_cache_of_the_train_images(demo_run):
    import yaml

    manifest = json.loads((demo_run / "features" / "manifest.json").read_text())
    world = json.loads((demo_run / "world" / "world.json").read_text())
    assert len(manifest["entries"]) == world["sizes"]["train"]  # one row per train image, encoded once
    for run in ("stage1", "stage2", "ablation"):
        config = yaml.safe_load((demo_run / run / "config.yaml").read_text())
        assert config["data"]["feature_cache"] == str(demo_run / "features"), run
    stage1 = yaml.safe_load((demo_run / "stage1" / "config.yaml").read_text())["model_overrides"]["bridge"]
    assert stage1["initializer_range"] == 0.1 and stage1["dropout"] == 0.0
    # Every run's Q-Former has the demo's 16 queries (the stage-2 runs start from stage 1's shapes).
    for run in ("stage1", "stage2", "ablation"):
        bridge = yaml.safe_load((demo_run / run / "config.yaml").read_text())["model_overrides"]["bridge"]
        assert bridge["num_queries"] == 16, run


@pytest.mark.slow
def test_demo_model_serves_caption_and_ask(demo_run, capsys):
    image = next((demo_run / "world" / "images" / "test").glob("*.png"))
    capsys.readouterr()
    assert main(["caption", "--model", str(demo_run / "stage2"), "--device", "cpu", "--json", str(image)]) == 0
    captioned = capsys.readouterr().out
    assert captioned.strip()
    assert main(["ask", "--model", str(demo_run / "stage2"), "--device", "cpu", "--json", str(image),
                 "what color is the circle?"]) == 0
    assert capsys.readouterr().out.strip()


@pytest.mark.slow
def test_fast_demo_gives_the_same_numbers_one_job_at_a_time(demo_run, tmp_path):
    """The default run trains and evaluates the ablation in a second process beside stage 1 and 2
    (its output in DIR/logs/); --sequential runs every job in turn, and every number is the same."""
    parallel = json.loads((demo_run / "report.json").read_text())
    assert parallel["parallel"] is True
    assert (demo_run / "logs" / "ablation.log").read_text().strip()
    assert parallel["timeline_seconds"]["ablation"][0] < parallel["timeline_seconds"]["stage1"][1]  # side by side
    assert main(["demo", "--fast", "--sequential", "--out", str(tmp_path / "run")]) == 0
    sequential = json.loads((tmp_path / "run" / "report.json").read_text())
    assert sequential["parallel"] is False and not (tmp_path / "run" / "logs").exists()
    for key in [k for k in REPORT_KEYS if k != "seconds"] + ["caption_cider_without_stage1", "final_losses",
                                                             "retrieval_metrics", "vqa_per_question_type_percent"]:
        assert sequential[key] == parallel[key], key


@pytest.mark.slow
def test_a_demo_run_again_keeps_its_finished_runs_and_says_its_time_leaves_them_out(demo_run, tmp_path, capsys):
    import shutil

    first = json.loads((demo_run / "report.json").read_text())
    assert first["reused_runs"] == []
    again_dir = tmp_path / "again"
    shutil.copytree(demo_run, again_dir)
    capsys.readouterr()
    assert main(["demo", "--fast", "--out", str(again_dir)]) == 0
    assert "finished runs kept from before, not trained now: stage1, stage2, ablation" in capsys.readouterr().out
    again = json.loads((again_dir / "report.json").read_text())
    assert again["reused_runs"] == ["stage1", "stage2", "ablation"]
    for key in [k for k in REPORT_KEYS if k != "seconds"] + ["final_losses", "retrieval_metrics"]:
        assert again[key] == first[key], key


def test_demo_refuses_a_directory_holding_another_world(tmp_path, capsys):
    from blip2kit.core.data import shapes

    shapes.write_world(tmp_path / "world", seed=3, sizes={"train": 4, "val": 2, "test": 2}, progress=False)
    assert main(["demo", "--fast", "--out", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert "seed 3" in error and "--out" in error


def test_figure5_verdict_needs_more_than_two_standard_errors() -> None:
    from blip2kit.core.demo import stage1_helps

    # Hand-computed: sqrt((.309*.691 + .302*.698) / 1484) = 0.01691, so a gain of 0.007 is noise...
    assert not stage1_helps(0.309, 0.302, 1484)
    # ...while 0.40 vs 0.30 (two standard errors = 0.0348) is the paper's effect.
    assert stage1_helps(0.40, 0.30, 1484)
    assert not stage1_helps(0.30, 0.40, 1484)  # stage 1 hurting is not the finding either
