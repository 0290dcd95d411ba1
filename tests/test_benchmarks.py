"""The benchmarks run end to end on a small setting and compare equal work (outputs agree)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.__main__ import main


def test_qformer_benchmark_writes_a_result(tmp_path: Path) -> None:
    main(["qformer", "--batch", "1", "--tokens", "17", "--repeats", "1", "--warmup", "0",
          "--output-dir", str(tmp_path)])
    (path,) = tmp_path.glob("qformer_forward-b1-t17-fp32-*.json")
    result = json.loads(path.read_text())
    assert result["max_abs_diff"] <= 1e-5, "blip2kit and transformers did different work"
    assert set(result["seconds_per_batch"]) == {"transformers", "blip2kit"}
    assert result["speedup_vs_transformers"] > 0
    assert result["environment"]["torch"]


@pytest.mark.slow
def test_speed_suite_writes_every_row_and_column(tmp_path: Path) -> None:
    from benchmarks.speed import COLUMNS, ROWS

    main(["speed", "--small", "--output-dir", str(tmp_path)])
    (path,) = tmp_path.glob("speed-small-*.json")
    result = json.loads(path.read_text())
    assert path.with_suffix(".png").stat().st_size > 0
    assert set(result["rows"]) == set(ROWS) and result["columns"] == list(COLUMNS)
    for row in ROWS:
        assert set(result["rows"][row]) == set(COLUMNS), row
        assert all(cell["per_second"] > 0 for cell in result["rows"][row].values()), row
        assert set(result["ratios"][row]) == {f"{a} / {b}" for a in COLUMNS[2:] for b in COLUMNS[:2]}
        assert set(result["peak_memory"][row]) == set(COLUMNS), row
    # Same weights, same work: the fp32 columns agree; the half ones within rounding.
    assert result["agreement"]["encode"]["transformers fp32"] <= 1e-4
    assert result["agreement"]["train_step"]["transformers fp32"] <= 1e-4
    assert result["agreement"]["greedy"]["transformers fp32"] == 1.0
    assert result["agreement"]["beam5"]["transformers fp32"] == 1.0
    assert result["agreement"]["encode"]["blip2kit policy"] <= 0.1
    assert {"fp32", "bf16"} <= set(result["matmul_peak_flop_per_s"])
    assert 0 < result["encode_utilisation"]["blip2kit policy"]["fraction_of_peak"]


@pytest.mark.slow
def test_encode_profile_splits_each_columns_call_into_ops_and_the_vision_tower(tmp_path: Path) -> None:
    main(["encode-profile", "--small", "--top", "8", "--output-dir", str(tmp_path)])
    (path,) = tmp_path.glob("encode-profile-small-*.json")
    result = json.loads(path.read_text())
    assert result["max_abs_diff"] <= 1e-5, "blip2kit and transformers did different work"
    assert set(result["profiles"]) == {"transformers fp32", "blip2kit fp32"}
    for name, profile in result["profiles"].items():
        assert 0 < profile["vision_tower_seconds"] < profile["call_seconds"], name
        assert abs(profile["vision_tower_share"] + profile["rest_share"] - 1) < 1e-9, name
        ops = profile["top_ops"]
        assert len(ops) == 8 and sum(op["share"] for op in ops) <= 1, name
        assert [op["self_seconds"] for op in ops] == sorted((op["self_seconds"] for op in ops), reverse=True)
        # Both are linear layers around attention: the matmuls and SDPA show up by name.
        assert {"aten::addmm", "aten::_scaled_dot_product_flash_attention_for_cpu"} <= {op["op"] for op in ops}
        assert result["encode"][name]["images_per_second"] > 0
    assert "compile_vision_tower" not in result  # only with --compile


@pytest.mark.slow
def test_train_benchmark_smoke(tmp_path: Path) -> None:
    main(["train", "--small", "--parts", "stage1,cache", "--output-dir", str(tmp_path)])
    (path,) = tmp_path.glob("train-small-*.json")
    result = json.loads(path.read_text())
    stage1 = result["stage1"]
    assert set(stage1["seconds_per_step"]) == {"fp32", "policy"}
    assert all(seconds > 0 for seconds in stage1["seconds_per_step"].values())
    phases = stage1["profile_fp32"]["phases_seconds"]
    assert set(phases) == {"frozen encoder", "Q-Former forward (ITC+ITM+ITG)", "backward", "AdamW step"}
    assert stage1["profile_fp32"]["top_ops"] and stage1["image_tokens"] == 65
    assert result["cache"]["speedup"] > 0


@pytest.mark.slow
def test_train_benchmark_times_itm_key_value_reuse_and_the_stage2_cache(tmp_path: Path) -> None:
    main(["train", "--small", "--parts", "itm_kv,stage2_cache", "--output-dir", str(tmp_path)])
    (path,) = tmp_path.glob("train-small-*.json")
    result = json.loads(path.read_text())
    (size,) = result["itm_kv"].values()
    assert set(size["seconds_per_step"]) == {"reuse", "recompute"}
    assert all(seconds > 0 for seconds in size["seconds_per_step"].values())
    assert len(size["top_ops_reuse"]) == 10 and size["speedup"] > 0
    cache = result["stage2_cache"]
    assert set(cache["seconds_per_step"]) == {"pixels", "feature_cache"} and cache["speedup"] > 0
    assert len(result["load_average_start"]) == 3
