"""Webdataset tar shards, streamed with the standard library's ``tarfile``.

A shard holds samples as consecutive members sharing a key (the member name up to the first dot of
its file name): an image (``.jpg``/``.jpeg``/``.png``/``.webp``) and a caption (``.txt``, one
caption per line, or ``.json`` with ``caption`` as a string or list and optionally ``image_id``).
Members are read one at a time (``tarfile`` stream mode), so no shard is ever held in memory.
"""

from __future__ import annotations

import glob
import itertools
import json
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blip2kit.core.data.sources import AnnotationError

__all__ = ["ShardSample", "expand_shards", "read_shard"]

WDS_IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")
_BRACE = re.compile(r"\{([^{}]*)\}")


@dataclass
class ShardSample:
    """One sample of a shard: its image bytes (None when missing) and caption texts."""

    key: str  # "<shard path>#<sample key>": unique across shards
    image_bytes: bytes | None
    image_name: str | None  # the image member's name, for errors
    captions: list[str]
    image_id: Any
    problem: str | None = None  # why the sample cannot be used, found while reading the shard


def _expand_braces(pattern: str) -> list[str]:
    """'a-{000..002}.tar' -> ['a-000.tar', 'a-001.tar', 'a-002.tar']; '{x,y}' lists; several braces multiply."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        start, stop = numeric.groups()
        width = len(start) if start.startswith("0") or len(start) == len(stop) else 0
        if int(stop) < int(start):
            raise AnnotationError(f"shard pattern {pattern!r}: range {{{body}}} counts down; write {{{stop}..{start}}}")
        choices = [str(n).zfill(width) for n in range(int(start), int(stop) + 1)]
    else:
        choices = body.split(",")
    head, tail = pattern[: match.start()], pattern[match.end():]
    return [expanded for choice in choices for expanded in _expand_braces(head + choice + tail)]


def expand_shards(path: str | list[str]) -> list[Path]:
    """The shard files a webdataset ``path`` names (brace patterns, globs or a list), in order; each must exist."""
    patterns = [path] if isinstance(path, str) else list(path)
    shards: list[Path] = []
    for pattern in patterns:
        for candidate in _expand_braces(pattern):
            if glob.has_magic(candidate):
                matched = sorted(glob.glob(candidate))
                if not matched:
                    raise AnnotationError(f"webdataset pattern {candidate!r} matches no shard files")
                shards.extend(Path(m) for m in matched)
            else:
                shards.append(Path(candidate))
    missing = [str(s) for s in shards if not s.is_file()]
    if missing:
        raise AnnotationError(
            f"webdataset shard(s) {missing[:5]} do not exist (from path {path!r}); check the pattern"
        )
    return shards


def _split_key(name: str) -> tuple[str, str]:
    """'dir/0001.jpg' -> ('dir/0001', 'jpg'); 'dir/a.b.json' -> ('dir/a', 'b.json')."""
    directory, _, base = name.rpartition("/")
    stem, _, suffix = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), suffix.lower()


def _captions_from_json(data: bytes, name: str) -> tuple[list[str], Any]:
    record = json.loads(data.decode("utf-8"))
    if not isinstance(record, dict):
        raise ValueError(f"{name} must hold a JSON object, got {type(record).__name__}")
    caption = record.get("caption", record.get("captions"))
    if caption is None:
        raise ValueError(f"{name} has no 'caption' key (it has {sorted(record)})")
    captions = [caption] if isinstance(caption, str) else caption
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        raise ValueError(f"{name} key 'caption' must be a string or a list of strings")
    return captions, record.get("image_id")


def read_shard(shard: Path, *, read_images: bool = True) -> Iterator[ShardSample]:
    """The samples of one shard in member order, streamed. A sample with a broken member carries a
    ``problem``; a shard that breaks part-way ends with one last sample whose problem says so.

    ``read_images=False`` skips image bytes (for replaying a stream to a resume position).
    """
    current_key: str | None = None
    parts: dict[str, Any] = {}

    def finish() -> ShardSample | None:
        if current_key is None:
            return None
        key = f"{shard.resolve()}#{current_key}"  # resolved: the same key however the path was written
        problem = parts.get("problem")
        image_name = parts.get("image_name")
        if problem is None and image_name is None:
            problem = f"no image member ({'/'.join(WDS_IMAGE_SUFFIXES)}) for key {current_key!r}"
        if problem is None and "captions" not in parts:
            problem = f"no caption member (.txt or .json) for key {current_key!r}"
        return ShardSample(key, parts.get("image"), image_name, parts.get("captions", []),
                           parts.get("image_id", current_key), problem)

    end_offset = 0  # where the archive's members end
    try:
        with tarfile.open(shard, mode="r|*") as stream:
            for member in stream:
                end_offset = stream.offset
                if not member.isfile():
                    continue
                key, suffix = _split_key(member.name)
                if key != current_key:
                    sample = finish()
                    if sample is not None:
                        yield sample
                    current_key, parts = key, {}
                where = f"{shard} member {member.name!r}"
                if suffix in WDS_IMAGE_SUFFIXES:
                    parts["image_name"] = where
                    if read_images:
                        parts["image"] = stream.extractfile(member).read()
                elif suffix in ("txt", "json"):
                    data = stream.extractfile(member).read()
                    try:
                        if suffix == "txt":
                            parts["captions"] = data.decode("utf-8").splitlines()
                        else:
                            parts["captions"], image_id = _captions_from_json(data, where)
                            if image_id is not None:
                                parts["image_id"] = image_id
                    except (UnicodeDecodeError, ValueError) as error:
                        parts["problem"] = f"caption member unreadable: {error}"
    except (tarfile.TarError, OSError, EOFError) as error:
        # A truncated or corrupt shard: what was read stays usable; the rest is one bad sample.
        # The sample being read may have lost members: it is bad too.
        parts.setdefault("problem", f"cut off where the shard breaks: {error}")
        sample = finish()
        if sample is not None:
            yield sample
        yield ShardSample(f"{shard}#<after {current_key}>", None, None, [], None,
                          problem=f"shard {shard} unreadable after key {current_key!r}: {error}")
        return
    sample = finish()
    if sample is not None:
        yield sample
    if shard.stat().st_size - end_offset < 2 * tarfile.BLOCKSIZE:
        # tarfile reads a header cut short as the end of the archive; a complete tar ends in two
        # zero blocks after its last member, so a shard without them was cut off.
        yield ShardSample(f"{shard}#<after {current_key}>", None, None, [], None,
                          problem=f"shard {shard} unreadable after key {current_key!r}: it ends without "
                          "tar's end-of-archive blocks (truncated)")


def shuffled(samples: Iterator[Any], buffer_size: int, rng: Any) -> Iterator[Any]:
    """A shuffle buffer: deterministic given ``rng``; ``buffer_size`` <= 1 keeps the order."""
    if buffer_size <= 1:
        yield from samples
        return
    buffer: list[Any] = list(itertools.islice(samples, buffer_size))
    for sample in samples:
        slot = int(rng.integers(len(buffer)))
        yield buffer[slot]
        buffer[slot] = sample
    order = rng.permutation(len(buffer))
    for slot in order:
        yield buffer[slot]
