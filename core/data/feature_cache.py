"""The frozen-feature cache: the frozen image encoder run once over a dataset, its outputs kept.

A frozen encoder gives the same features for an image every epoch under the eval transform, so a
stage-1 or stage-2 run can read them instead of running the encoder (the ViT-g is most of a BLIP-2
step's time). The cache is a folder: fp16 safetensors shards ``features-00000.safetensors`` (one
tensor ``features`` [n, N, W]) and ``manifest.json``, which records which encoder made them (card
name, class, a SHA-256 of its weights, dtype), its resolution and preprocessing, the blip2kit
version, and for every image key its shard, row and image id. ``FeatureCache.check(model)``
refuses a model whose encoder differs in any of these, naming the field.

The cache does not hold augmentations: training from it sees the eval transform (resize to S x S),
not RandomResizedCrop and flip.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from blip2kit.core.checkpoints.atomic import atomic_directory, atomic_write_json
from blip2kit.core.data.images import ImageError, load_image
from blip2kit.core.data.sources import DataSourceConfig, read_indexed_source
from blip2kit.core.data.webdataset import expand_shards, read_shard

__all__ = ["FeatureCache", "FeatureCacheError", "FeatureCacheMismatch", "encoder_identity", "write_feature_cache"]

MANIFEST = "manifest.json"
CACHE_FORMAT_VERSION = 1
DEFAULT_SHARD_SIZE = 1024  # images per safetensors shard


class FeatureCacheError(ValueError):
    """A feature-cache folder that cannot be read (no manifest, missing shard, wrong format)."""


class FeatureCacheMismatch(FeatureCacheError):
    """A cache made by another encoder, other weights, resolution, preprocessing or dtype than the model's."""


def _version() -> str:
    try:
        return importlib.metadata.version("blip2kit")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _weights_sha256(module: torch.nn.Module) -> str:
    """SHA-256 over every tensor of ``module``'s state dict: names, dtypes, shapes and bytes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def encoder_identity(model: Any) -> dict[str, Any]:
    """What a cache must agree with: the model's vision encoder, described field by field.

    The name is the encoder's card name (the first part of a composition like 'vit_g+qformer');
    the weights hash guards models named otherwise.
    """
    vision = model.vision
    return {"name": _encoder_name(model), **_encoder_fields(vision)}


def _encoder_name(model: Any) -> str:
    """The vision card's name: from the composition ('vit_g+qformer'), or a named model's card."""
    name = getattr(model, "name", "") or ""
    if "+" in name:
        return name.split("+")[0].strip()
    from blip2kit.registry import get_registry
    from blip2kit.registry.errors import MalformedNameError, UnknownNameError

    try:
        return get_registry().resolve(name).vision.name
    except (MalformedNameError, UnknownNameError):  # not a registered name: class and weights hash still guard
        return name or type(model.vision).__name__


def _encoder_fields(vision: Any) -> dict[str, Any]:
    dtype = next((p.dtype for p in vision.parameters() if p.is_floating_point()), torch.float32)
    return {
        "class": f"{type(vision).__module__}.{type(vision).__qualname__}",
        "image_size": int(vision.image_size),
        "num_tokens": int(vision.num_tokens),
        "width": int(vision.width),
        "preprocessing": {
            "transform": repr(vision.transform(train=False)),
            "interpolation": str(vision.interpolation),
            "mean": [float(v) for v in vision.mean],
            "std": [float(v) for v in vision.std],
        },
        "dtype": str(dtype).removeprefix("torch."),
        "weights_sha256": _weights_sha256(vision),
    }


# -- writing -------------------------------------------------------------------------------------


def _images_of(sources: Sequence[DataSourceConfig]) -> Iterator[tuple[str, Any, Any, str, str | None]]:
    """(key, image path or bytes, image id, where, problem) for every image of the sources, keys as the loader uses."""
    for source in sources:
        if source.format == "webdataset":
            for shard in expand_shards(source.path):
                for sample in read_shard(shard):
                    yield (sample.key, sample.image_bytes, sample.image_id,
                           sample.image_name or sample.key, sample.problem)
        else:
            for sample in read_indexed_source(source):
                yield str(sample.image.resolve()), sample.image, sample.image_id, sample.where, None


def _json_id(image_id: Any) -> Any:
    return image_id if isinstance(image_id, (str, int)) or image_id is None else str(image_id)


@torch.no_grad()
def write_feature_cache(
    model: Any,
    sources: Sequence[DataSourceConfig | dict[str, Any]],
    out_dir: str | Path,
    *,
    batch_size: int,
    shard_size: int = DEFAULT_SHARD_SIZE,
    progress: bool = True,
) -> Path:
    """Run ``model.vision`` once over every image of ``sources`` (eval transform) and write the cache.

    Unreadable images are skipped and listed in the manifest's ``bad`` (the loader then counts
    them as bad samples). The folder appears complete or not at all. Returns ``out_dir``.
    """
    from safetensors.torch import save_file
    from tqdm import tqdm

    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be at least 1, got {batch_size} and {shard_size}")
    sources = [DataSourceConfig.model_validate(s) for s in sources]
    if not sources:
        raise ValueError("no data sources given to cache features for")
    vision = model.vision
    was_training = vision.training
    vision.eval()
    transform = vision.transform(train=False)
    device = next(vision.parameters()).device
    dtype = next((p.dtype for p in vision.parameters() if p.is_floating_point()), torch.float32)

    entries: dict[str, list[int]] = {}
    image_ids: dict[str, Any] = {}
    bad: dict[str, str] = {}
    shards: list[dict[str, Any]] = []
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as staging:
        pending: list[Tensor] = []  # fp16 features [N, W] waiting for their shard
        pending_rows = 0

        def flush(force: bool = False) -> None:
            nonlocal pending, pending_rows
            while pending_rows >= shard_size or (force and pending_rows):
                take = min(shard_size, pending_rows)
                name = f"features-{len(shards):05d}.safetensors"
                save_file({"features": torch.stack(pending[:take]).contiguous()}, str(staging / name))
                shards.append({"file": name, "count": take})
                pending, pending_rows = pending[take:], pending_rows - take

        batch_keys: list[str] = []
        batch_pixels: list[Tensor] = []

        def encode() -> None:
            nonlocal pending_rows
            if not batch_pixels:
                return
            pixels = torch.stack(batch_pixels).to(device=device, dtype=dtype)  # [b, 3, S, S]
            features = vision(pixels).to("cpu", torch.float16)  # [b, N, W]
            for key, row in zip(batch_keys, features):
                row_index = len(shards) * shard_size + pending_rows  # rows fill shards in order
                entries[key] = [row_index // shard_size, row_index % shard_size]
                pending.append(row.clone())
                pending_rows += 1
            batch_keys.clear()
            batch_pixels.clear()
            flush()

        bar = tqdm(_images_of(sources), desc="caching features", unit="img", disable=not progress)
        for key, image, image_id, where, problem in bar:
            if key in entries or key in bad or key in batch_keys:
                continue  # an image named by several records is encoded once
            try:
                if problem is not None:
                    raise ImageError(problem)
                if image is None:
                    raise ImageError("image member missing")
                batch_pixels.append(transform(load_image(image, name=where)))
            except ImageError as error:
                bad[key] = f"{where}: {error}"
                continue
            batch_keys.append(key)
            image_ids[key] = _json_id(image_id)
            if len(batch_pixels) == batch_size:
                encode()
            bar.set_postfix(bad=len(bad))
        encode()
        flush(force=True)
        if not entries:
            raise FeatureCacheError(
                f"no readable image in {', '.join(s.describe() for s in sources)} "
                f"({len(bad)} bad); nothing to cache"
            )
        manifest = {
            "format_version": CACHE_FORMAT_VERSION,
            "blip2kit_version": _version(),
            "encoder": encoder_identity(model),
            "feature_dtype": "float16",
            "feature_shape": [int(vision.num_tokens), int(vision.width)],
            "sources": [s.model_dump() for s in sources],
            "shard_size": shard_size,
            "shards": shards,
            "entries": entries,
            "image_ids": image_ids,
            "bad": bad,
        }
        atomic_write_json(staging / MANIFEST, manifest)
    if was_training:
        vision.train()
    return out_dir


# -- reading -------------------------------------------------------------------------------------


class FeatureCache:
    """A feature-cache folder: ``features_for(key)`` reads one image's features [N, W] (fp16)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        manifest_path = self.directory / MANIFEST
        if not manifest_path.is_file():
            raise FeatureCacheError(
                f"{str(self.directory)!r} is not a feature cache (no {MANIFEST}); write one with "
                "write_feature_cache or 'blip2kit cache-features'"
            )
        try:
            self.manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise FeatureCacheError(f"{manifest_path} is not valid JSON: {error}") from error
        version = self.manifest.get("format_version")
        if version != CACHE_FORMAT_VERSION:
            raise FeatureCacheError(
                f"{manifest_path} has format_version {version!r}; this blip2kit reads version "
                f"{CACHE_FORMAT_VERSION}. Rebuild the cache with this version"
            )
        for shard in self.manifest["shards"]:
            if not (self.directory / shard["file"]).is_file():
                raise FeatureCacheError(f"feature cache {self.directory} lacks shard {shard['file']}; rebuild it")
        self._entries: dict[str, list[int]] = self.manifest["entries"]
        self._handles: dict[int, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        # Open shard handles stay behind when a loader worker receives the cache.
        return {**self.__dict__, "_handles": {}}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    @property
    def encoder(self) -> dict[str, Any]:
        return self.manifest["encoder"]

    def features_for(self, key: str) -> Tensor | None:
        """The cached features [N, W] (fp16) of the image with loader key ``key``; None if absent."""
        from safetensors import safe_open

        entry = self._entries.get(key)
        if entry is None:
            return None
        shard, row = entry
        handle = self._handles.get(shard)
        if handle is None:  # memory-mapped, opened once per shard
            handle = safe_open(str(self.directory / self.manifest["shards"][shard]["file"]), framework="pt")
            self._handles[shard] = handle
        return handle.get_slice("features")[row : row + 1][0]

    def check(self, model: Any) -> None:
        """Refuse a model whose encoder is not the one that made this cache, naming the field."""
        cached = self.encoder
        current = encoder_identity(model)
        labels = {
            "name": "encoder", "class": "encoder class", "image_size": "resolution (image_size)",
            "num_tokens": "tokens per image", "width": "feature width", "preprocessing": "preprocessing",
            "dtype": "encoder dtype", "weights_sha256": "encoder weights (SHA-256)",
        }
        for field, label in labels.items():
            if cached.get(field) != current.get(field):
                raise FeatureCacheMismatch(
                    f"feature cache {str(self.directory)!r} was made with {label} {cached.get(field)!r}, "
                    f"but the model has {current.get(field)!r}; rebuild the cache for this model "
                    "('blip2kit cache-features') or train without data.feature_cache"
                )

    def __repr__(self) -> str:
        return f"FeatureCache({str(self.directory)!r}, {len(self)} images, encoder {self.encoder.get('name')!r})"


