"""``python -m benchmarks params`` builds the paper's configurations on meta and counts them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.__main__ import main


@pytest.mark.slow
def test_params_benchmark_counts_against_the_paper(tmp_path: Path) -> None:
    main(["params", "--only", "vit_l+qformer+opt_2.7b", "--output-dir", str(tmp_path)])
    (path,) = tmp_path.glob("params-*.json")
    (row,) = json.loads(path.read_text())["rows"]
    # BLIP2_REFERENCE.md section 6, an analytic count from the LAVIS layer shapes: the stage-2
    # Q-Former is 105.16M with ViT-g's cross-attention K/V (20.08M; ViT-L's are 16.54M), plus
    # 2*1024 for ln_vision and 768*2560 + 2560 for the projection into OPT-2.7B: 103.6M of ~3.05B.
    qformer_vit_l = 105.16e6 - (20.08e6 - 16.54e6)
    assert row["trainable_params"] == pytest.approx(qformer_vit_l + 2 * 1024 + 768 * 2560 + 2560, rel=2e-4)
    assert row["total_billions"] == pytest.approx(3.05, abs=0.01)
    assert (row["paper_trainable_millions"], row["paper_total_billions"]) == (104, 3.1)
    assert list(tmp_path.glob("params-*.png")), "the plot is written beside the JSON"
