"""``blip2kit eval`` end to end on tiny datasets in the public formats, with a tiny model saved as a
Hugging Face checkpoint: outputs, metrics equal to the metric functions on the written predictions,
skipped images, resume, and the torchrun split. A random model's scores mean nothing; structure,
counts and agreement with the metric functions do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from blip2kit.core import build_model
from blip2kit.core.cli import main
from blip2kit.core.evaluation import caption_metrics, evaluate_gqa, evaluate_okvqa, evaluate_vqa
from blip2kit.core.model import Blip2
from blip2kit.plugins.language.testing import make_opt_tokenizer
from eval_fixtures import QUESTIONS, write_coco_images, write_gqa, write_karpathy, write_nocaps, write_vqa

FAST = ["--num-beams", "1", "--max-len", "3", "--no-progress", "--device", "cpu"]
# METEOR starts a 2 GB Java process (tens of seconds on a busy machine); the rest run in a second.
CHEAP_METRICS = ("BLEU", "ROUGE_L", "CIDEr")
CHEAP = ["--metrics", ",".join(CHEAP_METRICS)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """vit_tiny+qformer_tiny+opt_tiny with random weights, saved as an HF Blip2 directory."""
    root = tmp_path_factory.mktemp("model")
    make_opt_tokenizer(root / "tokenizer")
    model = build_model("vit_tiny+qformer_tiny+opt_tiny", language={"tokenizer": str(root / "tokenizer")})
    assert model.language.tokenizer is not None  # loaded, so save_pretrained writes it beside the weights
    with pytest.warns(UserWarning, match="ln_vision eps"):
        model.save_pretrained(root / "hf", format="hf")
    return root / "hf"


@pytest.fixture
def vqa_files(tmp_path):
    images = write_coco_images(tmp_path / "images")
    (images / "COCO_val2014_000000000285.jpg").write_bytes(b"\x89PNG\r\n\x1a\n broken")  # unreadable
    questions, annotations = write_vqa(tmp_path)
    return images, questions, annotations


def _run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured


def _json(path: Path):
    return json.loads(path.read_text())


def test_vqav2_end_to_end(model_dir, vqa_files, tmp_path, capsys):
    images, questions, annotations = vqa_files
    out = tmp_path / "out"
    captured = _run(["eval", "--task", "vqav2", "--model", str(model_dir), "--questions", str(questions),
                     "--annotations", str(annotations), "--images", str(images), "--out", str(out),
                     "--batch-size", "2", "--json", *FAST], capsys)
    document = json.loads(captured.out)
    assert document == _json(out / "metrics.json")

    answers = _json(out / "answers.json")  # the official submission format
    readable = [qid for _, qid, *_ in QUESTIONS if qid != 28500]
    assert [a["question_id"] for a in answers] == readable
    assert all(set(a) == {"question_id", "answer"} and isinstance(a["answer"], str) for a in answers)
    assert document["total"] == 5 and document["evaluated"] == 4
    assert document["skipped"]["count"] == 1
    assert document["skipped"]["items"][0]["id"] == 28500
    assert "COCO_val2014_000000000285.jpg" in document["skipped"]["items"][0]["image"]

    # The metrics are the official metric on the written predictions (the skipped question left out).
    predicted = {a["question_id"]: a["answer"] for a in answers}
    all_questions = _json(questions)["questions"]
    all_annotations = _json(annotations)["annotations"]
    expected = evaluate_vqa(predicted, [q for q in all_questions if q["question_id"] in predicted],
                            [a for a in all_annotations if a["question_id"] in predicted])
    assert document["metrics"] == json.loads(json.dumps(expected))
    assert document["settings"]["prompt"] == "Question: {} Short answer:"
    assert document["settings"]["num_beams"] == 1 and document["settings"]["min_len"] == 1


@pytest.mark.slow
def test_interrupted_eval_resumes_where_it_stopped(model_dir, vqa_files, tmp_path, capsys, monkeypatch):
    images, questions, annotations = vqa_files
    out = tmp_path / "out"
    config = tmp_path / "vqa.yaml"
    config.write_text(yaml.safe_dump({
        "task": "vqav2", "model": str(model_dir), "questions": str(questions), "annotations": str(annotations),
        "images": str(images), "out": str(out), "batch_size": 1, "num_beams": 1, "max_len": 3,
        "device": "cpu",
    }))
    _run(["eval", str(config), "--no-progress"], capsys)
    complete = _json(out / "answers.json")
    metrics = _json(out / "metrics.json")

    # Kill mid-run: the last two answers never written, the third-last cut mid-line.
    log = out / "predictions.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    assert len(lines) == 5  # four answers and one skipped image
    log.write_text("".join(lines[:2]) + lines[2][:17])
    (out / "answers.json").unlink()
    (out / "metrics.json").unlink()

    asked = []
    generate = Blip2.generate

    def counting(self, pixels, prompts=None, **options):
        asked.extend(prompts)
        return generate(self, pixels, prompts, **options)

    monkeypatch.setattr(Blip2, "generate", counting)
    _run(["eval", str(config), "--no-progress"], capsys)
    assert len(asked) == 2  # the two questions whose answers were lost (the skipped one is known)
    assert _json(out / "answers.json") == complete
    assert _json(out / "metrics.json") == metrics
    assert len(log.read_text().splitlines()) == 5


def test_okvqa_and_gqa_end_to_end(model_dir, tmp_path, capsys):
    images = write_coco_images(tmp_path / "images")
    questions, annotations = write_vqa(tmp_path)
    out = tmp_path / "okvqa"
    _run(["eval", "--task", "okvqa", "--model", str(model_dir), "--questions", str(questions),
          "--annotations", str(annotations), "--images", str(images), "--out", str(out), "--batch-size", "5",
          *FAST], capsys)
    predicted = {a["question_id"]: a["answer"] for a in _json(out / "answers.json")}
    assert list(predicted) == [q[1] for q in QUESTIONS]
    expected = evaluate_okvqa(predicted, _json(questions)["questions"], _json(annotations)["annotations"])
    assert _json(out / "metrics.json")["metrics"] == json.loads(json.dumps(expected))

    gqa_questions = write_gqa(tmp_path, tmp_path / "gqa_images")
    out = tmp_path / "gqa"
    _run(["eval", "--task", "gqa", "--model", str(model_dir), "--questions", str(gqa_questions),
          "--images", str(tmp_path / "gqa_images"), "--out", str(out), "--batch-size", "5", *FAST], capsys)
    submission = _json(out / "answers.json")  # GQA's official format
    assert [set(record) for record in submission] == [{"questionId", "prediction"}] * len(QUESTIONS)
    predicted = {record["questionId"]: record["prediction"] for record in submission}
    expected = evaluate_gqa(predicted, _json(gqa_questions))
    assert _json(out / "metrics.json")["metrics"] == json.loads(json.dumps(expected))


@pytest.mark.slow
def test_coco_karpathy_and_nocaps_captions_end_to_end(model_dir, tmp_path, capsys, monkeypatch):
    karpathy = write_karpathy(tmp_path, tmp_path / "coco")
    out = tmp_path / "coco_out"
    calls = []
    generate = Blip2.generate

    def recording(self, pixels, prompts=None, **options):
        calls.append((list(prompts), options, self.language.tokens_before_generation("a photo of")))
        return generate(self, pixels, prompts, **options)

    monkeypatch.setattr(Blip2, "generate", recording)
    _run(["eval", "--task", "coco_caption", "--model", str(model_dir), "--annotations", str(karpathy),
          "--images", str(tmp_path / "coco"), "--out", str(out), "--batch-size", "3", *FAST, *CHEAP,
          "--max-len", "6"], capsys)
    # LAVIS min_len 8 counts BOS and the prompt's tokens: "a photo of" leaves 8 - (1 + 3) new ones.
    prompts, options, counted = calls[0]
    assert prompts == ["a photo of"] * 3 and counted == 4
    assert options["min_new_tokens"] == 8 - counted and options["max_new_tokens"] == 6
    captions = _json(out / "captions.json")
    assert [c["image_id"] for c in captions] == [42, 73, 139]  # the test split only
    references = {r["cocoid"]: [s["raw"] for s in r["sentences"]] for r in _json(karpathy)["images"]}
    predicted = {c["image_id"]: c["caption"] for c in captions}
    expected = caption_metrics(predicted, {key: references[key] for key in predicted}, metrics=CHEAP_METRICS)
    document = _json(out / "metrics.json")
    assert document["metrics"] == json.loads(json.dumps(expected))
    assert document["settings"]["prompt"] == "a photo of" and document["settings"]["min_len"] == 8
    assert "METEOR" not in document["metrics"] and "CIDEr" in document["metrics"]

    nocaps = write_nocaps(tmp_path, tmp_path / "nocaps")
    out = tmp_path / "nocaps_out"
    _run(["eval", "--task", "nocaps", "--model", str(model_dir), "--annotations", str(nocaps),
          "--images", str(tmp_path / "nocaps"), "--out", str(out), "--batch-size", "4", *FAST, *CHEAP], capsys)
    metrics = _json(out / "metrics.json")["metrics"]
    assert set(metrics) == {"overall", "in-domain", "near-domain", "out-domain"}
    captions = {c["image_id"]: c["caption"] for c in _json(out / "captions.json")}
    references = {}
    for annotation in _json(nocaps)["annotations"]:
        references.setdefault(annotation["image_id"], []).append(annotation["caption"])
    near = [1, 3]
    expected = caption_metrics({k: captions[k] for k in near}, {k: references[k] for k in near},
                               metrics=CHEAP_METRICS)
    assert metrics["near-domain"] == json.loads(json.dumps(expected))
    assert metrics["overall"]["count"] == 4


def test_eval_errors_are_one_line(model_dir, tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({"task": "vqav2", "model": "x", "images": str(tmp_path), "beams": 3}))
    assert main(["eval", str(config)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("blip2kit eval: error:") and "beams" in error and "\n" not in error

    assert main(["eval", "--task", "vqav2", "--model", str(model_dir), "--images", str(tmp_path / "nope"),
                 "--questions", "q.json"]) == 2
    error = capsys.readouterr().err.strip()
    assert "images folder" in error and "nope" in error and "\n" not in error


@pytest.mark.slow
def test_torchrun_splits_questions_across_two_processes(model_dir, vqa_files, tmp_path, capsys):
    images, questions, annotations = vqa_files
    arguments = ["--task", "vqav2", "--model", str(model_dir), "--questions", str(questions),
                 "--annotations", str(annotations), "--images", str(images), "--batch-size", "1", *FAST]
    _run(["eval", *arguments, "--out", str(tmp_path / "single")], capsys)

    environment = {**os.environ, "OMP_NUM_THREADS": "1", "BLIP2KIT_DISABLE_PLUGIN_AUTOLOAD": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
         "-m", "blip2kit.core.cli", "eval", *arguments, "--out", str(tmp_path / "two")],
        capture_output=True, text=True, env=environment, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    two = tmp_path / "two"
    assert sorted(path.name for path in two.glob("predictions*.jsonl")) == [
        "predictions.rank0.jsonl", "predictions.rank1.jsonl"]
    per_rank = [len(path.read_text().splitlines()) for path in sorted(two.glob("predictions*.jsonl"))]
    assert per_rank == [3, 2]  # five questions (one unreadable image), every second one per rank
    assert _json(two / "answers.json") == _json(tmp_path / "single" / "answers.json")
    assert _json(two / "metrics.json") == _json(tmp_path / "single" / "metrics.json")
