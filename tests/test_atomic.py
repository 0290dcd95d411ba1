"""The one writer every save goes through: a failure at any point leaves the previous version."""

from __future__ import annotations

import json
import os

import pytest

from blip2kit.core.checkpoints import atomic
from blip2kit.core.checkpoints.atomic import (
    atomic_directory,
    atomic_write_json,
    atomic_write_text,
    recover_interrupted_swap,
)


def test_directory_replaces_previous_version_completely(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_directory(target) as staging:
        (staging / "a.txt").write_text("one")
        (staging / "stale.txt").write_text("only in v1")
    with atomic_directory(target) as staging:
        (staging / "a.txt").write_text("two")
    assert (target / "a.txt").read_text() == "two"
    assert not (target / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary left behind


def test_failure_midway_keeps_previous_directory(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_directory(target) as staging:
        (staging / "a.txt").write_text("good")
    with pytest.raises(OSError, match="disk full"):
        with atomic_directory(target) as staging:
            (staging / "a.txt").write_text("half")
            raise OSError("disk full")
    assert (target / "a.txt").read_text() == "good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_fallback_without_exchange_and_crash_between_renames(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_exchange", None)
    target = tmp_path / "ckpt"
    with atomic_directory(target) as staging:
        (staging / "a.txt").write_text("v1")
    with atomic_directory(target) as staging:
        (staging / "a.txt").write_text("v2")
    assert (target / "a.txt").read_text() == "v2"
    # A crash after the old version was moved aside and before the new one arrived:
    os.rename(target, tmp_path / ".ckpt.old-abc")
    assert recover_interrupted_swap(target)
    assert (target / "a.txt").read_text() == "v2"


def test_file_write_failure_keeps_old_contents(tmp_path):
    path = tmp_path / "results.json"
    atomic_write_json(path, {"cider": 1.0})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"bad": object()})  # json cannot encode it
    assert json.loads(path.read_text()) == {"cider": 1.0}
    atomic_write_text(path, "x")
    assert path.read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
