"""The benchmarks run end to end on a small setting and compare equal work (outputs agree)."""

from __future__ import annotations

import json
from pathlib import Path

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
