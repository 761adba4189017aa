"""A device's local training data, numpy only, preprocessed the way the server preprocesses.

``--data npz:PATH``: an ``.npz`` with ``images`` uint8 (N, H, W, 3) and ``labels`` integer (N,).
Images stay uint8 in memory; each batch becomes float32 NCHW when it is drawn: ``/ 255``, resized
to the bundle's image size, normalized with the bundle's mean and std. Resizing is **bilinear**
with half-pixel centres (``align_corners=False``), antialiased (a triangle filter as wide as the
scale) when shrinking: the resize torch's ``F.interpolate(mode="bilinear", antialias=shrinking)``
does for the server's data loaders, written as two small weight matrices so no image library is
needed. Nearest neighbour upsampling of 8 x 8 digits to 16 x 16 cost the quickstart ViT about 20
points of accuracy after 40 rounds.
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
    """Images as stored (N, H, W, C) uint8 and labels (N,) int64; each batch is preprocessed when
    it is drawn, so a shard costs its uint8 bytes, not float32 at the model's resolution (a 32 x 32
    image kept at 224 x 224 float32 would be 196 times larger)."""

    images: np.ndarray
    labels: np.ndarray
    spec: Preprocess

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
            yield preprocess(self.images[index], self.spec), self.labels[index]

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


def _linear_weights(source: int, size: int) -> np.ndarray:
    """(size, source) interpolation weights: bilinear with half-pixel centres, antialiased when
    shrinking (triangle of half-width ``source / size``); every row sums to one."""
    scale = source / size
    support = max(scale, 1.0)
    centres = (np.arange(size, dtype=np.float64) + 0.5) * scale  # in source pixel units
    pixels = np.arange(source, dtype=np.float64) + 0.5
    weights = np.clip(1.0 - np.abs(pixels[None, :] - centres[:, None]) / support, 0.0, None)
    if scale < 1.0:  # upsampling: outside the first/last pixel centre, hold the edge pixel
        weights[centres < 0.5] = np.eye(1, source, 0)
        weights[centres > source - 0.5] = np.eye(1, source, source - 1)
    return weights / weights.sum(axis=1, keepdims=True)


def resize_bilinear(images: np.ndarray, size: int) -> np.ndarray:
    """(N, H, W, C) -> float32 (N, size, size, C) on the 0..255 scale of the input."""
    height, width = images.shape[1:3]
    x = images.astype(np.float32)
    if (height, width) == (size, size):
        return x
    rows = _linear_weights(height, size).astype(np.float32)
    cols = _linear_weights(width, size).astype(np.float32)
    return np.einsum("ih,nhwc,jw->nijc", rows, x, cols, optimize=True).astype(np.float32)


def preprocess(images: np.ndarray, spec: Preprocess) -> np.ndarray:
    """uint8 (N, H, W, C) -> normalized float32 (N, C, size, size)."""
    if images.ndim != 4 or images.shape[-1] != len(spec.mean):
        raise DataError(f"images must be (N, H, W, {len(spec.mean)}), got {images.shape}")
    x = resize_bilinear(images, spec.image_size) / np.float32(255)
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
    if images.ndim != 4 or images.shape[-1] != len(preprocess_spec.mean):
        raise DataError(f"{path}: images must be (N, H, W, {len(preprocess_spec.mean)}), got {images.shape}")
    return DeviceData(images, labels.astype(np.int64), preprocess_spec)


class LazyDeviceData:
    """A device's shard that is read from its file only while the device trains: a device host's
    idle devices hold their sample count, not their images. Same interface as DeviceData."""

    def __init__(self, spec: str, preprocess_spec: Preprocess) -> None:
        self.spec, self.preprocess_spec = spec, preprocess_spec
        self._size = _sample_count(spec)
        self._data: DeviceData | None = None

    def __len__(self) -> int:
        return self._size

    def load(self) -> DeviceData:
        if self._data is None:
            self._data = load_data(self.spec, self.preprocess_spec)
        return self._data

    def release(self) -> None:
        """Drop the loaded images (the next round reads the file again)."""
        self._data = None

    def batches(self, batch_size: int, rng: np.random.Generator, *, drop_last: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        return self.load().batches(batch_size, rng, drop_last=drop_last)

    def samples_per_epoch(self, batch_size: int, *, drop_last: bool = False) -> int:
        return (len(self) // batch_size) * batch_size if drop_last else len(self)


def _sample_count(spec: str) -> int:
    """How many samples ``npz:PATH`` holds, from its labels alone; DataError when unreadable."""
    kind, _, path = spec.partition(":")
    if kind != "npz" or not path:
        raise DataError(f"--data must be npz:PATH, got {spec!r}")
    try:
        with np.load(Path(path), allow_pickle=False) as archive:
            count = int(archive["labels"].shape[0])
    except (OSError, KeyError, ValueError) as exc:
        raise DataError(f"{path}: cannot read images and labels ({exc})") from None
    if count == 0:
        raise DataError(f"{path}: need at least one sample and non-negative labels")
    return count

