"""The beam-search suite runs end to end on the tiny OPT and writes every column (behaviour only)."""

from __future__ import annotations

import json
from pathlib import Path


def test_beam_suite_writes_every_column_and_agrees_with_transformers(tmp_path: Path) -> None:
    from benchmarks.__main__ import main
    from benchmarks.beam import COLUMNS

    main(["beam", "--small", "--output-dir", str(tmp_path)])
    (path,) = tmp_path.glob("beam-small-*.json")
    result = json.loads(path.read_text())
    cells = result["rows"]["beam5"]
    assert set(cells) == set(COLUMNS)
    assert all(cell["per_second"] > 0 and len(cell["seconds"]) == 1 for cell in cells.values())
    assert result["ratios"]["blip2kit / transformers"] > 0
    # Same scoring as transformers' generate: the same captions.
    assert result["agreement"]["blip2kit / transformers"] == 1.0
