"""Data: the paper's image transforms and caption normalisation, datasets in their public file
formats, the training loader, the synthetic ``shapes`` world, and the frozen-feature cache."""

from blip2kit.core.data.captions import MAX_WORDS, normalize_caption
from blip2kit.core.data.loader import (
    AllSamplesBadError,
    BadSamples,
    DataLoaderStateError,
    TrainLoader,
    build_train_loader,
)
from blip2kit.core.data.sources import AnnotationError, DataSourceConfig, Sample, read_indexed_source

__all__ = [
    "MAX_WORDS",
    "AllSamplesBadError",
    "AnnotationError",
    "BadSamples",
    "DataLoaderStateError",
    "DataSourceConfig",
    "Sample",
    "TrainLoader",
    "build_train_loader",
    "normalize_caption",
    "read_indexed_source",
]
