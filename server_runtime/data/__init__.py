"""Data sets at native resolution, per-batch model input, and device partitioners.

``to_model_input`` and ``BatchLoader`` need torch and are imported on first use, so the
partitioners (and ``sflam data partition``) run without loading torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from server_runtime.data.datasets import DataSplit, DatasetError, ImageSet, load_dataset, write_digits_shards
from server_runtime.data.partition import (
    MIN_SAMPLES,
    SCHEMES,
    PartitionError,
    dirichlet_partition,
    dirichlet_resample,
    iid_partition,
    label_histogram,
    partition,
    resample_partition,
    shard_partition,
    skew,
)

if TYPE_CHECKING:
    from server_runtime.data.transforms import BatchLoader, to_model_input

_LAZY = {
    "BatchLoader": "server_runtime.data.transforms",
    "to_model_input": "server_runtime.data.transforms",
}

__all__ = [
    "MIN_SAMPLES",
    "SCHEMES",
    "BatchLoader",
    "DataSplit",
    "DatasetError",
    "ImageSet",
    "PartitionError",
    "dirichlet_partition",
    "dirichlet_resample",
    "iid_partition",
    "label_histogram",
    "load_dataset",
    "partition",
    "resample_partition",
    "shard_partition",
    "skew",
    "to_model_input",
]


def __getattr__(name: str) -> Any:
    """Import the torch-dependent names on first access."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
