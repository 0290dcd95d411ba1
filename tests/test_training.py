"""Training runs on the tiny components and fixture data: one process in this interpreter, and
(slow) several processes, kills and resumes through the ``blip2kit`` command line."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from blip2kit.core.config import config_from_dict
from blip2kit.core.training import latest_checkpoint
from training_fixtures import (
    cli_environment,
    final_weights,
    job,
    read_metrics,
    run_cli,
    write_caption_data,
    write_job,
    write_tokenizers,
)


@pytest.fixture(scope="module")
def fixture_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("training-data")
    bert, opt = write_tokenizers(root)
    return {"data": write_caption_data(root / "clean"), "bad_data": write_caption_data(root / "bad", corrupt=2),
            "bert": bert, "opt": opt}


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_one_process_run_writes_metrics_plot_summary_checkpoints_reports_bad_samples_and_exports(
    fixture_data, tmp_path, capsys
):
    from blip2kit.core.training import train

    out = tmp_path / "run"
    config = config_from_dict(job(fixture_data["bad_data"], fixture_data["bert"], out,
                                  train__max_steps=6, train__save_every=2, train__keep_last=2))
    summary = train(config, progress=False)

    assert summary.steps == 6 and summary.samples == 24
    # Two unreadable images, named in the summary, never stopped the run.
    assert summary.bad_samples == 2
    assert "broken0.png" in summary.bad_sample_summary and "broken1.png" in summary.bad_sample_summary
    printed = capsys.readouterr().out
    assert "bad samples  2" in printed and "broken0.png" in printed
    # Checkpoints every 2 steps, the last 2 kept, each complete with the resolved config beside it.
    names = sorted(path.name for path in (out / "checkpoints").iterdir() if not path.name.startswith("."))
    assert names == ["step-00000004", "step-00000006"]
    newest = out / "checkpoints" / "step-00000006"
    assert config_from_dict(__import__("yaml").safe_load((newest / "config.yaml").read_text())) == config
    assert {p.name for p in newest.iterdir()} >= {"model", "deepspeed", "rng", "data", "trainer_state.json"}
    assert latest_checkpoint(out) == newest / "model"
    # Only trainable weights are saved; the frozen encoder is not.
    saved = load_file(str(newest / "model" / "model.safetensors"))
    assert saved and not any(key.startswith("vision.") for key in saved)
    # 18 samples (2 bad, replaced) make 4 global batches of 4 per epoch: step 6 ends epoch 1's 2nd.
    position = json.loads((newest / "data" / "rank-0.json").read_text())
    assert (position["epoch"], position["batches_done"]) == (1, 2)
    # Metrics: one line per step, with the losses, the lr schedule and throughput.
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    assert {"loss", "loss_itc", "loss_itm", "loss_itg", "lr", "samples_per_second"} <= set(metrics[0])
    assert metrics[0]["lr"] == pytest.approx(2e-3)  # warmup of one step
    assert metrics[-1]["lr"] < metrics[1]["lr"]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "summary.json").read_text())["bad_samples"] == 2

    # blip2kit export writes full checkpoints that load back with the trained weights.
    from blip2kit.core.checkpoints import from_pretrained
    from blip2kit.core.cli import main

    for fmt in ("hf", "lavis"):
        assert main(["export", str(out), "--format", fmt, str(tmp_path / fmt)]) == 0
    assert (tmp_path / "lavis" / "checkpoint.pth").is_file()
    exported = from_pretrained(tmp_path / "hf").state_dict()
    for key, value in saved.items():
        # HF's Blip2 has no place for the Q-Former's ITC temperature and LM head (the plugin says so).
        if key != "bridge.temp" and not key.startswith("bridge.lm_head."):
            torch.testing.assert_close(exported[key], value, msg=key)
    lavis = torch.load(tmp_path / "lavis" / "checkpoint.pth", weights_only=True)["model"]
    assert "temp" in lavis and torch.equal(lavis["temp"], saved["bridge.temp"])


def test_existing_run_is_not_overwritten_without_resume(fixture_data, tmp_path):
    from blip2kit.core.training import train

    out = tmp_path / "run"
    (out / "checkpoints" / "step-00000002").mkdir(parents=True)
    (out / "checkpoints" / "step-00000002" / "trainer_state.json").write_text("{}")
    config = config_from_dict(job(fixture_data["data"], fixture_data["bert"], out))
    with pytest.raises(FileExistsError, match="pass --resume"):
        train(config, progress=False)


def test_cli_config_error_is_one_line_naming_the_field(fixture_data, tmp_path):
    from blip2kit.core.cli import main

    path = write_job(tmp_path / "job.yaml", {**job(fixture_data["data"], fixture_data["bert"], tmp_path / "o"),
                                             "optimiser": {"betas": [0.9, 0.98]}})
    assert main(["train", str(path), "--set", "train.lr=-1"]) == 2


# -- several processes, kills and resumes (through the command line) ------------------------------


def _train(config_path: Path, *sets: str, processes: int = 1, resume: bool = False) -> subprocess.CompletedProcess:
    args = ["train", str(config_path), "--no-progress", *[f"--set={item}" for item in sets]]
    if resume:
        args.append("--resume")
    result = run_cli(*args, processes=processes)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def _assert_loss_falls_and_ranks_agree(run_dir: Path, processes: int) -> None:
    losses = [m["loss"] for m in read_metrics(run_dir)]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == processes
    assert len(summary["trainable_digests"]) == processes and len(set(summary["trainable_digests"])) == 1


@pytest.mark.slow
@pytest.mark.parametrize(("stage1_zero", "stage2_zero"), [(2, 3), (3, 2)])
def test_two_processes_train_stage1_then_stage2_from_it(fixture_data, tmp_path, stage1_zero, stage2_zero):
    stage1_dir, stage2_dir = tmp_path / "stage1", tmp_path / "stage2"
    stage1 = write_job(tmp_path / "stage1.yaml", job(
        fixture_data["data"], fixture_data["bert"], stage1_dir, train__max_steps=10, train__save_every=10,
        deepspeed={"zero_stage": stage1_zero}))
    _train(stage1, processes=2)
    _assert_loss_falls_and_ranks_agree(stage1_dir, 2)

    stage2 = write_job(tmp_path / "stage2.yaml", job(
        fixture_data["data"], fixture_data["bert"], stage2_dir, stage=2, opt=fixture_data["opt"],
        init_from=str(stage1_dir), train__max_steps=10, train__save_every=10,
        deepspeed={"zero_stage": stage2_zero}))
    _train(stage2, processes=2)
    _assert_loss_falls_and_ranks_agree(stage2_dir, 2)
    # Stage 2 started from stage 1's bridge: the query tokens it saved moved on from those.
    start, end = final_weights(stage1_dir), final_weights(stage2_dir)
    assert "projection.weight" in end and "bridge.query_tokens" in end
    assert not any(key.startswith(("vision.", "language.")) for key in end)
    assert set(end) - {"projection.weight", "projection.bias"} <= set(start)


@pytest.mark.slow
def test_one_process_equals_two_processes_at_the_same_global_batch(fixture_data, tmp_path):
    # Deterministic model (no bridge dropout, frozen LLM in eval mode) and equal-length captions.
    base = job(fixture_data["data"], fixture_data["bert"], tmp_path / "unused", stage=2, opt=fixture_data["opt"],
               frozen_llm_dropout="off", train__max_steps=4, train__save_every=4)
    base["model_overrides"]["bridge"] = {"dropout": 0.0}
    one = write_job(tmp_path / "one.yaml", {**base, "output_dir": str(tmp_path / "one"),
                                            "train": {**base["train"], "batch_size": 8}})
    two = write_job(tmp_path / "two.yaml", {**base, "output_dir": str(tmp_path / "two"),
                                            "train": {**base["train"], "batch_size": 4}})
    _train(one, processes=1)
    _train(two, processes=2)
    single, double = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    assert single.keys() == double.keys()
    for key in single:
        torch.testing.assert_close(double[key], single[key], rtol=1e-5, atol=1e-6, msg=key)
    losses_one = [m["loss"] for m in read_metrics(tmp_path / "one")]
    losses_two = [m["loss"] for m in read_metrics(tmp_path / "two")]
    assert losses_one == pytest.approx(losses_two, rel=1e-5)


def _killed_then_resumed(config_path: Path, run_dir: Path, processes: int, seed: int) -> None:
    """Start a run, SIGKILL it at a random moment after its first checkpoint, resume it to the end."""
    rng = random.Random(seed)
    if processes == 1:
        command = [sys.executable, "-m", "blip2kit.core.cli"]
    else:
        from training_fixtures import _free_port

        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                   "--master_port", str(_free_port()), "-m", "blip2kit.core.cli"]
    process = subprocess.Popen([*command, "train", str(config_path), "--no-progress"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=cli_environment(),
                               start_new_session=True)
    # The moment is drawn in steps, not seconds, so a fast machine cannot finish the run first: after
    # the first checkpoint (step 3), a random number of further steps (none to four: at the latest during
    # step 8, and maybe during the save at step 6), then up to a tenth of a second more.
    deadline = time.monotonic() + 600

    def steps_logged() -> int:
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "the run did not reach the chosen step within 600 s"
        metrics = run_dir / "metrics.jsonl"
        return metrics.read_text().count("\n") if metrics.exists() else 0

    while not (run_dir / "checkpoints" / "step-00000003").exists():
        steps_logged()
        time.sleep(0.01)
    target = 3 + rng.randint(0, 4)
    while steps_logged() < target:
        time.sleep(0.01)
    time.sleep(rng.uniform(0.0, 0.1))
    os.killpg(process.pid, signal.SIGKILL)  # the whole group: the launcher and every rank
    process.wait()
    assert not (run_dir / "summary.json").exists(), "the kill came after the run finished; nothing was tested"
    _train(config_path, processes=processes, resume=True)


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_a_run_killed_at_a_random_moment_resumes_to_exactly_the_uninterrupted_weights(
    fixture_data, tmp_path, processes
):
    settings = dict(train__max_steps=9, train__save_every=3, train__keep_last=2,
                    deepspeed={"zero_stage": 2})
    straight = write_job(tmp_path / "straight.yaml",
                         job(fixture_data["data"], fixture_data["bert"], tmp_path / "straight", **settings))
    killed = write_job(tmp_path / "killed.yaml",
                       job(fixture_data["data"], fixture_data["bert"], tmp_path / "killed", **settings))
    _train(straight, processes=processes)
    _killed_then_resumed(killed, tmp_path / "killed", processes, seed=processes)

    expected, resumed = final_weights(tmp_path / "straight"), final_weights(tmp_path / "killed")
    assert expected.keys() == resumed.keys()
    for key in expected:
        assert torch.equal(resumed[key], expected[key]), key
    # The metrics read as one run: each step once, the same losses.
    straight_metrics, killed_metrics = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "killed")
    assert [m["step"] for m in killed_metrics] == list(range(1, 10))
    assert [m["loss"] for m in killed_metrics] == [m["loss"] for m in straight_metrics]


@pytest.mark.slow
def test_cache_features_command_then_training_from_the_cache(fixture_data, tmp_path):
    from blip2kit.core.cli import main
    from blip2kit.core.training import train

    config_path = write_job(tmp_path / "job.yaml", job(fixture_data["data"], fixture_data["bert"], tmp_path / "run",
                                                       train__max_steps=2, train__save_every=2))
    assert main(["cache-features", str(config_path), "--out", str(tmp_path / "cache"), "--batch-size", "8"]) == 0
    config = config_from_dict({**job(fixture_data["data"], fixture_data["bert"], tmp_path / "run",
                                     train__max_steps=2, train__save_every=2),
                               "data": {"train": [{"format": "jsonl", "path": str(fixture_data["data"])}],
                                        "feature_cache": str(tmp_path / "cache")}})
    summary = train(config, progress=False)
    assert summary.steps == 2 and summary.final_loss is not None
    # A cache made by another encoder (other weights: another seed) is refused before training.
    other = config.model_copy(update={"train": config.train.model_copy(update={"seed": 8}),
                                      "output_dir": str(tmp_path / "other")})
    with pytest.raises(Exception, match="(?i)weights"):
        train(other, progress=False)


def test_a_lone_cpu_process_does_not_build_deepspeeds_shared_memory_op(tmp_path):
    """DeepSpeed compiles its shared-memory all-reduce op for a new CPU process group (about 40 s
    on a fresh machine); a world of one has nothing to reduce, so blip2kit's process group skips it.
    A fresh extensions folder shows whether anything was compiled or loaded."""
    script = (
        "import os, deepspeed.comm.comm as comm\n"
        "from blip2kit.core.training.engine import init_distributed\n"
        "info = init_distributed('auto')\n"
        "assert info.world_size == 1, info\n"
        "print('shm_op', comm.cdb.shm_comm_op)\n"
    )
    environment = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    environment["TORCH_EXTENSIONS_DIR"] = str(tmp_path / "extensions")
    done = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "shm_op None" in done.stdout
    built = list((tmp_path / "extensions").rglob("*.so")) if (tmp_path / "extensions").exists() else []
    assert built == []
