"""The `blip2kit list` and `blip2kit plan` commands, and the ZeRO memory arithmetic behind plan."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from blip2kit.core.cli import main
from blip2kit.core.planning import memory_per_device, plan
from blip2kit.registry import Registry


def test_list_json_has_every_card(registry: Registry, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["problems"] == []
    records = listing["components"]
    by_name = {record["name"]: record for record in records}
    assert by_name["double_vision"]["kind"] == "vision"
    assert by_name["double_vision"]["width"] == 16
    assert by_name["double_bridge"]["distribution"] == "(registered in process)"
    assert {r["name"] for r in records} >= set(registry.names("vision"))


def test_list_table_and_kind_filter(registry: Registry, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "--kind", "bridge"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["name", "kind", "width", "params", "weights", "distribution"]
    assert "double_bridge" in out and "double_vision" not in out


def test_console_script_is_installed() -> None:
    # The script sits beside the interpreter of the environment blip2kit is installed in.
    executable = Path(sys.executable).parent / "blip2kit"
    assert executable.exists(), f"no console script at {executable}; reinstall with pip install -e ."
    result = subprocess.run([executable, "list", "--json"], capture_output=True, text=True, check=True)
    assert isinstance(json.loads(result.stdout)["components"], list)


def test_plan_json_reports_parameter_counts(registry: Registry, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "double_vision+double_bridge+double_lm", "--json", "--devices", "4"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["stage"] == 2
    assert report["trainable_params"] == report["parts"]["bridge"]["trainable"] + report["parts"]["projection"]["total"]
    assert report["total_params"] == sum(part["total"] for part in report["parts"].values())
    assert {(row["dtype"], row["zero_stage"]) for row in report["memory"]} == {
        (d, s) for d in ("fp32", "bf16") for s in (0, 1, 2, 3)
    }
    assert all(row["devices"] == 4 for row in report["memory"])


def test_plan_of_a_two_part_name_is_the_stage1_model(registry: Registry) -> None:
    report = plan("double_vision+double_bridge")
    assert report.stage == 1 and "language" not in report.parts


def test_plan_table_and_errors(registry: Registry, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "double_vision+double_bridge"]) == 0
    assert "ZeRO" in capsys.readouterr().out
    assert main(["plan", "double_vision+qformerr"]) == 2
    assert "unknown bridge 'qformerr'" in capsys.readouterr().err


def test_zero_memory_arithmetic_by_hand() -> None:
    trainable, frozen = 1_000, 10_000
    plain = memory_per_device(trainable, frozen, dtype="fp32", zero_stage=0, devices=4)
    assert (plain.weights_bytes, plain.gradients_bytes, plain.optimizer_bytes) == (44_000, 4_000, 8_000)
    mixed = memory_per_device(trainable, frozen, dtype="bf16", zero_stage=0, devices=4)
    assert (mixed.weights_bytes, mixed.gradients_bytes, mixed.optimizer_bytes) == (22_000, 2_000, 12_000)
    stage1 = memory_per_device(trainable, frozen, dtype="bf16", zero_stage=1, devices=4)
    assert stage1.optimizer_bytes == 3_000 and stage1.gradients_bytes == 2_000
    stage2 = memory_per_device(trainable, frozen, dtype="bf16", zero_stage=2, devices=4)
    assert stage2.gradients_bytes == 500 and stage2.weights_bytes == 22_000
    stage3 = memory_per_device(trainable, frozen, dtype="bf16", zero_stage=3, devices=4)
    # frozen towers stay whole on every device; only the trainable part is sharded
    assert stage3.weights_bytes == 20_000 + 500
    assert stage3.total_bytes == 20_500 + 500 + 3_000
    with pytest.raises(ValueError, match="ZeRO stage"):
        memory_per_device(1, 1, dtype="fp32", zero_stage=4, devices=1)


@pytest.mark.parametrize(
    ("name", "stage", "trainable"),
    [("vit_g+qformer", 1, 186.7e6), ("vit_g+qformer+opt_2.7b", 2, 107.1e6), ("blip2-flan-t5-xxl", 2, 108.3e6)],
)
def test_plan_json_reports_the_paper_trainable_counts(
    name: str, stage: int, trainable: float, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["plan", name, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["stage"] == stage
    assert report["trainable_params"] == pytest.approx(trainable, rel=0.01)
    assert report["total_params"] > report["trainable_params"]


def test_list_does_not_import_torch() -> None:
    # Cards name their factories lazily, so listing stays instant.
    code = (
        "import sys, io, contextlib\n"
        "from blip2kit.core.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    main(['list', '--json'])\n"
        "print('torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
