"""A device's local training data, numpy only, preprocessed the way the server preprocesses.

``--data npz:PATH``: an ``.npz`` with ``images`` uint8 (N, H, W, 3) and ``labels`` integer (N,).
Images become float32 NCHW: ``/ 255``, resized to the bundle's image size, normalized with the
bundle's mean and std. Resizing is **nearest neighbour** (source pixel ``floor((i + 0.5) * H /
size)``): exact for the integer up/down scales that data sets for the quick presets use and free of
any image library; the server's bilinear resize differs from it only when sizes do not divide.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class DataError(ValueError):
    """A data spec or file that cannot be used; the message says why."""


@dataclass(frozen=True)
class Preprocess:
    """What the bundle's ``device.json`` says about its input."""

    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_device_json(cls, device: dict) -> "Preprocess":
        return cls(int(device["image_size"]), tuple(device["mean"]), tuple(device["std"]))


@dataclass(frozen=True)
class DeviceData:
    """Preprocessed images (N, C, H, W) float32 and labels (N,) int64."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batches(self, batch_size: int, rng: np.random.Generator, *, drop_last: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """One epoch in a fresh shuffled order; a ragged last batch is dropped if ``drop_last``."""
        if batch_size < 1:
            raise DataError(f"batch size must be >= 1, got {batch_size}")
        order = rng.permutation(len(self))
        for start in range(0, len(self), batch_size):
            index = order[start : start + batch_size]
            if drop_last and index.size < batch_size:
                return
            yield self.images[index], self.labels[index]

    def samples_per_epoch(self, batch_size: int, *, drop_last: bool = False) -> int:
        """How many samples one epoch trains on."""
        return (len(self) // batch_size) * batch_size if drop_last else len(self)


def resize_nearest(images: np.ndarray, size: int) -> np.ndarray:
    """(N, H, W, C) -> (N, size, size, C) by nearest neighbour (pixel centres)."""
    height, width = images.shape[1:3]
    if (height, width) == (size, size):
        return images
    rows = np.minimum(((np.arange(size) + 0.5) * height / size).astype(np.int64), height - 1)
    cols = np.minimum(((np.arange(size) + 0.5) * width / size).astype(np.int64), width - 1)
    return images[:, rows][:, :, cols]


def preprocess(images: np.ndarray, spec: Preprocess) -> np.ndarray:
    """uint8 (N, H, W, C) -> normalized float32 (N, C, size, size)."""
    if images.ndim != 4 or images.shape[-1] != len(spec.mean):
        raise DataError(f"images must be (N, H, W, {len(spec.mean)}), got {images.shape}")
    x = resize_nearest(images, spec.image_size).astype(np.float32) / np.float32(255)
    x = (x - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)


def load_data(spec: str, preprocess_spec: Preprocess) -> DeviceData:
    """Load ``npz:PATH`` (the only source so far) and preprocess it."""
    kind, _, path = spec.partition(":")
    if kind != "npz" or not path:
        raise DataError(f"--data must be npz:PATH, got {spec!r}")
    try:
        with np.load(Path(path), allow_pickle=False) as archive:
            images, labels = archive["images"], archive["labels"]
    except (OSError, KeyError, ValueError) as exc:
        raise DataError(f"{path}: cannot read images and labels ({exc})") from None
    if images.dtype != np.uint8:
        raise DataError(f"{path}: images must be uint8, got {images.dtype}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0] or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: labels must be {images.shape[0]} integers, got {labels.dtype} {labels.shape}")
    if labels.size == 0 or labels.min() < 0:
        raise DataError(f"{path}: need at least one sample and non-negative labels")
    return DeviceData(preprocess(images, preprocess_spec), labels.astype(np.int64))
