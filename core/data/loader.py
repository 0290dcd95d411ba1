"""The training loader: sources -> per-rank batches, deterministic, resumable, robust to bad samples.

Each epoch's samples are laid out in one global order fixed by (seed, epoch): a permutation of the
indexed sources, or, when there are webdataset shards, their shuffled stream (indexed sources
mixed in enter it as chunks placed among the shards). Global batch k holds positions
[k*G, (k+1)*G) with G = batch_size * world_size, and rank r takes the r-th contiguous chunk of
batch_size positions, so one process at batch 2B sees exactly what two processes at batch B see.
The last incomplete global batch of an epoch is dropped, so every rank's batch is full.

Everything random about a position (its caption choice, its augmentation, the replacement for a
bad sample) is drawn from (seed, epoch, position), never from state carried between samples, so
``state_dict()`` only records (epoch, batches done) and a resumed run sees exactly the batches the
uninterrupted one would.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from blip2kit.core.data.captions import MAX_WORDS, normalize_caption
from blip2kit.core.data.images import ImageError, load_image
from blip2kit.core.data.sources import DataSourceConfig, Sample, read_indexed_source
from blip2kit.core.data.webdataset import ShardSample, expand_shards, read_shard, shuffled

__all__ = ["AllSamplesBadError", "BadSamples", "DataLoaderStateError", "TrainLoader", "build_train_loader"]

logger = logging.getLogger("blip2kit.data")

# Purposes mixed into the (seed, epoch, position) seeds, so each draw has its own stream.
_ORDER, _REPLACEMENT, _CAPTION, _AUGMENT, _SHARDS, _BUFFER = range(6)


class AllSamplesBadError(RuntimeError):
    """No usable sample could be found: every sample of the sources (or of a stream's window) is bad."""


class DataLoaderStateError(ValueError):
    """A ``load_state_dict`` state that does not fit this loader (other data or global batch size)."""


class BadSampleError(Exception):
    """Raised inside the loader for one unusable sample; caught, counted and replaced."""


def _rng(seed: int, epoch: int, position: int, purpose: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, position, purpose])


# -- bad samples ---------------------------------------------------------------------------------


class BadSamples:
    """The bad samples met so far, each named once: ``count``, ``records`` [(where, reason)], ``summary()``."""

    def __init__(self, *, log: bool = True) -> None:
        self.log = log  # each new bad sample is a warning on the "blip2kit.data" logger
        self.records: list[tuple[str, str]] = []
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    @property
    def count(self) -> int:
        return len(self.records)

    def add(self, where: str, reason: str) -> bool:
        """Record a bad sample; False when it was already recorded."""
        with self._lock:
            if where in self._seen:
                return False
            self._seen.add(where)
            self.records.append((where, reason))
        if self.log:
            logger.warning("skipping bad sample %s: %s", where, reason)
        return True

    def summary(self, limit: int = 20) -> str:
        """One line per bad sample (the first ``limit``), or a line saying there were none."""
        if not self.records:
            return "bad samples: none"
        lines = [f"bad samples: {self.count} skipped (each replaced by another sample)"]
        lines += [f"  {where}: {reason}" for where, reason in self.records[:limit]]
        if self.count > limit:
            lines.append(f"  ... and {self.count - limit} more")
        return "\n".join(lines)


# -- candidates: what can fill a position --------------------------------------------------------


@dataclass
class _Candidate:
    key: str  # identity of the image (also its feature-cache key)
    where: str  # how the log names it
    captions: list[str]
    image_id: Any
    image: Path | bytes | None
    problem: str | None = None


def _from_sample(sample: Sample) -> _Candidate:
    key = str(sample.image.resolve())
    problem = None
    if sample.sidecar is not None and not sample.sidecar.is_file():
        problem = f"no caption file {sample.sidecar.name}"
    return _Candidate(key, sample.where, sample.captions, sample.image_id, sample.image, problem)


def _from_shard_sample(sample: ShardSample) -> _Candidate:
    return _Candidate(sample.key, sample.image_name or sample.key, sample.captions, sample.image_id,
                      sample.image_bytes, sample.problem)


class _IndexedEpoch:
    """An epoch over indexed sources: position p holds sample order[p]; replacements walk the order."""

    def __init__(self, samples: list[Sample], seed: int, epoch: int, global_batch: int) -> None:
        self.samples, self.seed, self.epoch = samples, seed, epoch
        self.order = _rng(seed, epoch, 0, _ORDER).permutation(len(samples))
        self.num_batches = len(samples) // global_batch
        self.global_batch = global_batch

    def has_batch(self, batch: int) -> bool:
        return batch < self.num_batches

    def candidates(self, position: int) -> Iterator[_Candidate]:
        """The sample at ``position``, then every other sample from a random offset in the order."""
        count = len(self.order)
        yield _from_sample(self.samples[self.order[position]])
        start = int(_rng(self.seed, self.epoch, position, _REPLACEMENT).integers(count))
        for step in range(count):
            index = self.order[(start + step) % count]
            if index != self.order[position]:
                yield _from_sample(self.samples[index])


INDEXED_CHUNK = 256  # indexed samples per stream unit when indexed sources are mixed with shards


class _StreamEpoch:
    """An epoch over webdataset shards: shards in a seeded order, through a seeded shuffle buffer.

    Indexed sources mixed in enter the stream as chunks of ``INDEXED_CHUNK`` samples of a seeded
    permutation, each chunk a unit placed among the shards like one more shard.

    The stream is read ahead by ``window`` samples and kept back by as many, and a bad sample is
    replaced from that window in a seeded order; the window's contents depend only on the stream,
    so every rank (and a resumed run) picks the same replacement.
    """

    def __init__(self, shards: list[Path], samples: list[Sample], seed: int, epoch: int,
                 global_batch: int, shuffle_buffer: int, window: int) -> None:
        self.seed, self.epoch, self.global_batch, self.window = seed, epoch, global_batch, window
        units: list[Callable[[], Iterator[_Candidate]]] = [
            lambda shard=shard: map(_from_shard_sample, read_shard(shard)) for shard in shards
        ]
        order = _rng(seed, epoch, 0, _ORDER).permutation(len(samples))
        for start in range(0, len(samples), INDEXED_CHUNK):
            chunk = order[start : start + INDEXED_CHUNK]
            units.append(lambda chunk=chunk: (_from_sample(samples[i]) for i in chunk))
        unit_order = _rng(seed, epoch, 0, _SHARDS).permutation(len(units))
        stream = itertools.chain.from_iterable(units[i]() for i in unit_order)
        self._stream = shuffled(stream, shuffle_buffer, _rng(seed, epoch, 0, _BUFFER))
        self._read: collections.OrderedDict[int, _Candidate] = collections.OrderedDict()
        self._next = 0  # positions read so far
        self._exhausted = False

    def _fill(self, upto: int) -> None:
        """Read the stream until position ``upto`` is held (or the stream ends)."""
        while self._next <= upto and not self._exhausted:
            sample = next(self._stream, None)
            if sample is None:
                self._exhausted = True
                break
            self._read[self._next] = sample
            self._next += 1

    def has_batch(self, batch: int) -> bool:
        end = (batch + 1) * self.global_batch
        self._fill(end - 1 + self.window)
        # Forget what no later position can use as a replacement.
        oldest = batch * self.global_batch - self.window
        while self._read and next(iter(self._read)) < oldest:
            self._read.popitem(last=False)
        return self._next >= end

    def candidates(self, position: int) -> Iterator[_Candidate]:
        yield self._read[position]
        nearby = [p for p in range(position - self.window, position + self.window + 1)
                  if p != position and p in self._read]
        for slot in _rng(self.seed, self.epoch, position, _REPLACEMENT).permutation(len(nearby)):
            yield self._read[nearby[slot]]


# -- turning a position into a training item --------------------------------------------------


Item = tuple[torch.Tensor, str, Any]  # (pixels [3, S, S] or image_features [N, W], caption, image id)


class _SampleMaker:
    """Fills a position with a usable sample; picklable, so loader workers can run it."""

    def __init__(self, *, seed: int, transform: Callable[[Any], torch.Tensor] | None,
                 feature_cache: Any, max_words: int, describe_sources: str, window: int) -> None:
        self.seed, self.transform, self.feature_cache = seed, transform, feature_cache
        self.max_words, self.describe_sources, self.window = max_words, describe_sources, window
        # Candidates found bad before are not read again; which sample fills a position never
        # depends on this set (bad candidates are skipped either way), so ranks and workers agree.
        self.known_bad: set[str] = set()

    def fill(self, view: _IndexedEpoch | _StreamEpoch, position: int,
             bad_samples: BadSamples) -> Item:
        """The item at ``position``: its own sample, or the first usable replacement."""
        for candidate in view.candidates(position):
            if candidate.key in self.known_bad:
                continue
            try:
                return self._load(candidate, view.epoch, position)
            except BadSampleError as error:
                self.known_bad.add(candidate.key)
                bad_samples.add(candidate.where, str(error))
        scope = "every sample" if isinstance(view, _IndexedEpoch) else (
            f"every sample within {self.window} positions of position {position}")
        raise AllSamplesBadError(
            f"no usable training sample: {scope} of {self.describe_sources} is bad "
            f"({bad_samples.count} bad samples).\n{bad_samples.summary(limit=5)}"
        )

    def _load(self, candidate: _Candidate, epoch: int, position: int) -> Item:
        if candidate.problem is not None:
            raise BadSampleError(candidate.problem)
        captions = [normalize_caption(c, self.max_words) for c in candidate.captions]
        captions = [c for c in captions if c]
        if not captions:
            raise BadSampleError("empty caption" if candidate.captions else "no caption")
        caption = captions[int(_rng(self.seed, epoch, position, _CAPTION).integers(len(captions)))]
        if self.feature_cache is not None:
            features = self.feature_cache.features_for(candidate.key)
            if features is None:
                raise BadSampleError("not in the feature cache (unreadable when the cache was written, "
                                     "or the cache was made from other data)")
            return features, caption, candidate.image_id
        if candidate.image is None:
            raise BadSampleError("image member missing")
        try:
            image = load_image(candidate.image, name=candidate.where)
        except ImageError as error:
            raise BadSampleError(str(error)) from error
        # Augmentation seeded by (seed, epoch, position): exact on resume, equal across world sizes.
        augment_seed = int(_rng(self.seed, epoch, position, _AUGMENT).integers(2**62))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(augment_seed)
            try:
                pixels = self.transform(image)
            except (ValueError, OSError) as error:
                raise BadSampleError(f"image transform failed: {error}") from error
        return pixels, caption, candidate.image_id


class _WorkerPositions(torch.utils.data.Dataset):
    """Indexed epochs in loader workers: position -> (item, bad samples met on the way)."""

    def __init__(self, maker: _SampleMaker, view: _IndexedEpoch) -> None:
        self.maker, self.view = maker, view

    def __len__(self) -> int:
        return len(self.view.order)

    def __getitem__(self, position: int) -> tuple[Item, list[tuple[str, str]]]:
        found = BadSamples(log=False)  # the main process logs what comes back
        item = self.maker.fill(self.view, position, found)
        return item, found.records


def _keep_lists(batch: list[Any]) -> list[Any]:
    return batch


# -- the loader ----------------------------------------------------------------------------------


class TrainLoader:
    """Batches for one rank, forever over epochs: {"pixels" | "image_features", "text_input", "image_ids"}.

    ``state_dict()`` / ``load_state_dict()`` carry (epoch, batches done in the epoch); ``epoch`` is
    the epoch the next batch comes from; ``bad_samples`` counts and names every skipped sample.
    """

    def __init__(
        self,
        sources: Sequence[DataSourceConfig | dict[str, Any]],
        *,
        transform: Callable[[Any], torch.Tensor] | None,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        feature_cache: Any = None,
        max_words: int = MAX_WORDS,
        shuffle_buffer: int = 1000,
        num_workers: int = 0,
        window: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of size {world_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be 0 (load in this process) or more, got {num_workers}")
        self.sources = [DataSourceConfig.model_validate(s) for s in sources]
        if not self.sources:
            raise ValueError("no data sources given; set data.train to a list of sources")
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.global_batch = batch_size * world_size
        self.num_workers = num_workers
        self.bad_samples = BadSamples()

        streamed = [s for s in self.sources if s.format == "webdataset"]
        indexed = [s for s in self.sources if s.format != "webdataset"]
        self._samples: list[Sample] = []
        self._shards: list[Path] = []
        for source in indexed:
            self._samples.extend(read_indexed_source(source))
        for source in streamed:
            self._shards.extend(expand_shards(source.path))
        if not streamed and len(self._samples) < self.global_batch:
            raise ValueError(
                f"the data ({self._describe_sources()}) holds {len(self._samples)} images, fewer "
                f"than one global batch of {self.global_batch} (batch_size {batch_size} x "
                f"{world_size} processes); lower batch_size or add data"
            )
        self._shuffle_buffer = shuffle_buffer
        self._window = window if window is not None else max(self.global_batch, 64)

        # With a feature cache the transform is unused: the cache was made with the eval transform.
        if feature_cache is not None and not hasattr(feature_cache, "features_for"):
            from blip2kit.core.data.feature_cache import FeatureCache

            feature_cache = FeatureCache(feature_cache)
        if feature_cache is None and transform is None:
            raise ValueError("give a transform (model.vision.transform(train=True)) or a feature_cache")
        self.feature_cache = feature_cache
        self._maker = _SampleMaker(seed=seed, transform=transform, feature_cache=feature_cache,
                                   max_words=max_words, describe_sources=self._describe_sources(),
                                   window=self._window)

        self.epoch = 0
        self._batch = 0  # batches of the current epoch already handed out
        self._current: _IndexedEpoch | _StreamEpoch | None = None
        self._worker_batches: Iterator[list[Any]] | None = None

    # -- state ----------------------------------------------------------------------------------

    def _fingerprint(self) -> list[int]:
        """[indexed images, shards]: a changed dataset cannot restore a position."""
        return [len(self._samples), len(self._shards)]

    def state_dict(self) -> dict[str, Any]:
        """Where the next batch comes from: epoch and batches done in it (plus checks for the reload)."""
        return {
            "epoch": self.epoch,
            "batches_done": self._batch,
            "samples_done": self._batch * self.global_batch,
            "global_batch": self.global_batch,
            "seed": self.seed,
            "data_size": self._fingerprint(),
            "streamed": bool(self._shards),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where ``state`` was taken (with any world size of the same global batch)."""
        for key in ("epoch", "samples_done", "seed", "data_size"):
            if key not in state:
                raise DataLoaderStateError(f"loader state has no {key!r}; it was not made by TrainLoader.state_dict")
        if state["seed"] != self.seed:
            raise DataLoaderStateError(f"loader state was saved with seed {state['seed']}, this loader has {self.seed}")
        saved_size = state["data_size"]
        if isinstance(saved_size, int):  # states of the first loader version held one count
            saved_size = [saved_size, 0] if state.get("indexed", True) else [0, saved_size]
        if list(saved_size) != self._fingerprint():
            (saved_images, saved_shards), (images, shards) = saved_size, self._fingerprint()
            raise DataLoaderStateError(
                f"loader state was saved over {saved_images} indexed images and {saved_shards} shards, "
                f"but {self._describe_sources()} now holds {images} and {shards}; the data changed, "
                "so the position cannot be restored"
            )
        if state["samples_done"] % self.global_batch:
            raise DataLoaderStateError(
                f"loader state is {state['samples_done']} samples into epoch {state['epoch']}, not a "
                f"whole number of global batches of {self.global_batch}; resume with the same global "
                "batch size (batch_size x processes)"
            )
        self.epoch = int(state["epoch"])
        self._batch = int(state["samples_done"]) // self.global_batch
        self._current = None
        self._worker_batches = None

    # -- iteration ------------------------------------------------------------------------------

    def _describe_sources(self) -> str:
        return ", ".join(s.describe() for s in self.sources)

    def _epoch_view(self) -> _IndexedEpoch | _StreamEpoch:
        if self._current is None:
            if not self._shards:
                self._current = _IndexedEpoch(self._samples, self.seed, self.epoch, self.global_batch)
            else:
                self._current = _StreamEpoch(self._shards, self._samples, self.seed, self.epoch,
                                             self.global_batch, self._shuffle_buffer, self._window)
                # Replay the stream up to the resume point; only the window is kept.
                for batch in range(self._batch):
                    self._current.has_batch(batch)
        return self._current

    def _positions(self, batch: int) -> list[int]:
        first = batch * self.global_batch + self.rank * self.batch_size
        return list(range(first, first + self.batch_size))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        view = self._epoch_view()
        if not view.has_batch(self._batch):
            if self._batch == 0:
                raise AllSamplesBadError(
                    f"{self._describe_sources()} holds fewer samples than one global batch of "
                    f"{self.global_batch}; lower batch_size or add data"
                )
            self.epoch, self._batch, self._current, self._worker_batches = self.epoch + 1, 0, None, None
            view = self._epoch_view()
            if not view.has_batch(0):
                raise AllSamplesBadError(f"epoch {self.epoch} of {self._describe_sources()} is empty")
        if self.num_workers and isinstance(view, _IndexedEpoch):
            items = self._next_from_workers(view)
        else:
            items = [self._maker.fill(view, p, self.bad_samples) for p in self._positions(self._batch)]
        self._batch += 1
        return self._collate(items)

    def _next_from_workers(self, view: _IndexedEpoch) -> list[Item]:
        """The current batch from worker processes, which load the rest of the epoch ahead."""
        if self._worker_batches is None:
            batches = [self._positions(b) for b in range(self._batch, view.num_batches)]
            self._worker_batches = iter(torch.utils.data.DataLoader(
                _WorkerPositions(self._maker, view), batch_sampler=batches,
                num_workers=self.num_workers, collate_fn=_keep_lists,
            ))
        items = []
        for item, bad in next(self._worker_batches):
            for where, reason in bad:
                self.bad_samples.add(where, reason)
            items.append(item)
        return items

    def _collate(self, items: list[Item]) -> dict[str, Any]:
        tensors = torch.stack([tensor for tensor, _, _ in items])
        key = "image_features" if self.feature_cache is not None else "pixels"
        return {key: tensors, "text_input": [caption for _, caption, _ in items],
                "image_ids": [image_id for _, _, image_id in items]}

    def __repr__(self) -> str:
        return (f"TrainLoader({self._describe_sources()}, batch_size={self.batch_size}, rank={self.rank}/"
                f"{self.world_size}, epoch={self.epoch}, batch={self._batch})")


def build_train_loader(
    sources: Sequence[DataSourceConfig | dict[str, Any]],
    *,
    transform: Callable[[Any], torch.Tensor] | None,
    batch_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    feature_cache: Any = None,
    max_words: int = MAX_WORDS,
    shuffle_buffer: int = 1000,
    num_workers: int = 0,
) -> TrainLoader:
    """The training loader over ``sources`` for one rank (see ``TrainLoader``).

    :param transform: the encoder's train transform, ``model.vision.transform(train=True)``.
    :param batch_size: per rank; the global batch is batch_size * world_size.
    :param feature_cache: a feature-cache folder (or ``FeatureCache``): batches then hold
        ``image_features`` [B, N, W] (fp16) instead of ``pixels``; check it with ``FeatureCache.check(model)``.
    :param shuffle_buffer: webdataset streams only: the shuffle buffer's size in samples.
    :param num_workers: processes that load indexed sources ahead (0: in this process). The
        batches are the same for any number; webdataset streams are read in this process.
    """
    return TrainLoader(
        sources, transform=transform, batch_size=batch_size, seed=seed, rank=rank,
        world_size=world_size, feature_cache=feature_cache, max_words=max_words,
        shuffle_buffer=shuffle_buffer, num_workers=num_workers,
    )
