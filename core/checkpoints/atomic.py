"""Crash-safe writes: a file or a whole directory appears complete at its path, or not at all.

Every blip2kit write (model checkpoints, training checkpoints, configs, results) goes through
here. A directory is written into a temporary sibling, flushed and fsynced, then swapped into place
with one atomic ``renameat2(RENAME_EXCHANGE)`` where the kernel has it; the previous version stays
loadable until the new one is complete, whatever fails in between (disk full, an exception from a
plugin's export, a kill).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

__all__ = [
    "atomic_directory",
    "atomic_write_bytes",
    "atomic_write_file",
    "atomic_write_json",
    "atomic_write_text",
    "recover_interrupted_swap",
]

_TEMP_MARK = ".tmp-"
_OLD_MARK = ".old-"


def _fsync_directory(directory: Path) -> None:
    """Make a rename inside ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_directory(Path(folder))


@contextmanager
def atomic_write_file(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[BinaryIO | Any]:
    """Open a temporary file beside ``path``; on a clean exit fsync it and rename it over ``path``.

    On an exception the temporary file is removed and ``path`` keeps its old contents.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}{_TEMP_MARK}", dir=path.parent)
    try:
        with os.fdopen(descriptor, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        _fsync_directory(path.parent)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    with atomic_write_file(path, "wb") as handle:
        handle.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], data: Any, *, indent: int = 2) -> Path:
    """``data`` as JSON (sorted keys, trailing newline); the old file survives a failed write."""
    return atomic_write_text(path, json.dumps(data, indent=indent, sort_keys=True) + "\n")


# -- directories ----------------------------------------------------------------------------------

_RENAME_EXCHANGE = 2  # linux/fs.h


def _load_renameat2() -> Callable[[str, str], bool] | None:
    """``exchange(a, b)`` swapping two paths atomically, or None where the platform lacks it."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return None
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    at_fdcwd = -100

    def exchange(first: str, second: str) -> bool:
        result = renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), _RENAME_EXCHANGE)
        if result == 0:
            return True
        code = ctypes.get_errno()
        if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            return False  # the file system cannot exchange: fall back to two renames
        raise OSError(code, os.strerror(code), first)

    return exchange


_exchange = _load_renameat2()


def recover_interrupted_swap(target: str | os.PathLike[str]) -> bool:
    """Put back a previous version that a crash left aside (fallback path only). True if it did.

    Without an atomic exchange a swap is two renames (old aside, new in place); a crash between
    them leaves ``target`` missing and ``.NAME.old-*`` beside it. Readers call this first.
    """
    target = Path(target)
    if target.exists():
        return False
    aside = sorted(target.parent.glob(f".{target.name}{_OLD_MARK}*"))
    if not aside:
        return False
    os.rename(aside[-1], target)
    _fsync_directory(target.parent)
    return True


@contextmanager
def atomic_directory(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``target`` to write into; on a clean exit it
    replaces ``target`` in one step. On an exception it is removed and ``target`` is untouched.

    >>> with atomic_directory("run/checkpoint-100") as staging:   # doctest: +SKIP
    ...     (staging / "config.json").write_text("{}")
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted_swap(target)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{str(target)!r} exists and is not a directory; choose another path")
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}{_TEMP_MARK}", dir=target.parent))
    try:
        yield staging
        _fsync_tree(staging)
        _swap_into_place(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _swap_into_place(staging: Path, target: Path) -> None:
    if not target.exists():
        os.rename(staging, target)
        _fsync_directory(target.parent)
        return
    if _exchange is not None and _exchange(str(staging), str(target)):
        _fsync_directory(target.parent)
        shutil.rmtree(staging, ignore_errors=True)  # now holds the previous version
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}{_OLD_MARK}", dir=target.parent))
    aside.rmdir()
    os.rename(target, aside)
    os.rename(staging, target)
    _fsync_directory(target.parent)
    shutil.rmtree(aside, ignore_errors=True)
