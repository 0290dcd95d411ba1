"""Command-line errors (issue 8 item 7): a handled error is one line on stderr with exit code 2;
``--debug`` (anywhere on the line) or BLIP2KIT_DEBUG=1 shows the traceback instead. The handled
types are blip2kit's own errors, ValueError (ImageError, CheckpointError, pydantic's) and OSError."""

from __future__ import annotations

import argparse

import pytest

from blip2kit.core import cli
from blip2kit.core.data.images import ImageError
from blip2kit.core.errors import Blip2kitError, ComponentConfigError, InputError
from blip2kit.registry import Registry, UnknownNameError


def run_with_handler(monkeypatch: pytest.MonkeyPatch, error: BaseException, argv: list[str]) -> int:
    """``blip2kit list`` whose handler raises ``error``: how any subcommand's failure is shown."""
    def raising(args: argparse.Namespace) -> int:
        raise error

    monkeypatch.setattr(cli, "command_list", raising)
    return cli.main(argv)


@pytest.mark.parametrize(
    "error",
    [
        InputError("pixels have dtype torch.uint8;\nuse model.vision.transform()"),
        ComponentConfigError("bridge 'qformer' config is not valid: field 'dropout' = 1.0"),
        ImageError("image 'cat.jpg' is empty (0 bytes)"),
        ValueError("a plain ValueError from a command"),
        FileNotFoundError(2, "No such file or directory", "missing.pth"),
    ],
    ids=lambda error: type(error).__name__,
)
def test_handled_errors_are_one_line_and_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], error: BaseException
) -> None:
    assert run_with_handler(monkeypatch, error, ["list"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("blip2kit list: error: ")
    assert "Traceback" not in err
    if isinstance(error, OSError):
        assert "FileNotFoundError" in err and "missing.pth" in err
    else:
        assert str(error).splitlines()[0] in err


@pytest.mark.parametrize("argv", [["--debug", "list"], ["list", "--debug"]])
def test_debug_shows_the_traceback(monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> None:
    with pytest.raises(InputError, match="bad pixels"):
        run_with_handler(monkeypatch, InputError("bad pixels"), argv)


def test_debug_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BLIP2KIT_DEBUG", "1")
    with pytest.raises(ValueError):
        run_with_handler(monkeypatch, ValueError("x"), ["list"])


def test_bugs_keep_their_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ZeroDivisionError):
        run_with_handler(monkeypatch, ZeroDivisionError("a bug"), ["list"])


def test_base_error_class_covers_registry_errors() -> None:
    assert issubclass(UnknownNameError, Blip2kitError)
    assert issubclass(InputError, ValueError) and issubclass(InputError, Blip2kitError)


def test_a_real_command_error_end_to_end(registry: Registry, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["plan", "double_vision+double_bridge+double_lmm"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "unknown language model 'double_lmm'" in err and "'double_lm'" in err
