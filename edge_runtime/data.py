"""A device's local training data, numpy only, preprocessed per batch the way the server preprocesses.

Three sources (``sflam device --data``): ``npz:PATH``, an ``.npz`` with ``images`` uint8
(N, H, W, 3), ``labels`` integer (N,) and optionally ``class_names``; ``folder:DIR``, one
sub-folder per class of JPEG/PNG files; ``manifest:FILE.csv``, rows of ``path,label``. Every source
is read lazily (:mod:`edge_runtime.image_files`, :mod:`edge_runtime.npz_shard`): an image is read
or decoded when a batch draws it and kept in a cache bounded in bytes, so a device's memory does
not grow with its shard (a compressed npz, which has no such layout, is loaded whole). Every
batch becomes float32 NCHW when it is drawn: augmented as the plan says
(:mod:`edge_runtime.augment`), ``/ 255``, resized to the bundle's image size, normalized with the
bundle's mean and std. Resizing is **bilinear** with half-pixel centres (``align_corners=False``),
antialiased (a triangle filter as wide as the scale) when shrinking: the resize torch's
``F.interpolate(mode="bilinear", antialias=shrinking)`` does for the server's data loaders,
written as two small weight matrices so no image library is needed for it. Nearest neighbour
upsampling of 8 x 8 digits to 16 x 16 cost the quickstart ViT about 20 points of accuracy after
40 rounds.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_runtime.augment import Augment
from edge_runtime.npz_shard import ImageBlock, image_block
from edge_runtime.protocol import NO_CLASSES_DIGEST, classes_digest

log = logging.getLogger(__name__)

SOURCE_FORMS = "npz:PATH, folder:DIR or manifest:FILE.csv"
DEFAULT_CACHE_BYTES = 16 * 2**20  # decoded images a shard keeps (--data-cache-mb); 0: none


class DataError(ValueError):
    """A data spec or file that cannot be used; the message says why."""


class DataMismatchError(DataError):
    """The run's classes and this device's data disagree: training would teach wrong labels."""


@dataclass(frozen=True)
class Preprocess:
    """What the bundle's ``device.json`` says about its input."""

    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_device_json(cls, device: dict) -> "Preprocess":
        return cls(int(device["image_size"]), tuple(device["mean"]), tuple(device["std"]))


class Samples:
    """A shard: labels, a way to read image ``i`` (None when it cannot be read), and batches.

    Subclasses set ``spec``, ``labels`` (int64), ``class_names`` (id order, or None when the
    source names no classes) and ``skipped`` (images that could not be read), and define
    :meth:`image` and :meth:`usable`.
    """

    spec: Preprocess
    labels: np.ndarray
    class_names: tuple[str, ...] | None = None
    skipped: int = 0

    def image(self, index: int) -> np.ndarray | None:
        raise NotImplementedError

    def usable(self) -> np.ndarray:
        """Indices of the samples that can still be drawn."""
        return np.arange(self.labels.shape[0])

    def __len__(self) -> int:
        return int(self.usable().shape[0])

    def batches(self, batch_size: int, rng: np.random.Generator, *, drop_last: bool = False,
                augment: Augment | None = None, augment_rng: np.random.Generator | None = None,
                ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """One epoch in a fresh shuffled order; a ragged last batch is dropped if ``drop_last``.
        An image that cannot be read is skipped (counted in ``skipped``) and the next one fills
        its place, so batches stay full."""
        if batch_size < 1:
            raise DataError(f"batch size must be >= 1, got {batch_size}")
        if augment is not None and augment.active and augment_rng is None:
            raise ValueError("augmentation needs its own rng (augment_rng)")
        live = self.usable()
        images: list[np.ndarray] = []
        labels: list[int] = []
        for index in live[rng.permutation(live.shape[0])]:
            image = self.image(int(index))
            if image is None:
                continue
            images.append(image)
            labels.append(int(self.labels[index]))
            if len(images) == batch_size:
                yield self._batch(images, labels, augment, augment_rng)
                images, labels = [], []
        if images and not drop_last:
            yield self._batch(images, labels, augment, augment_rng)

    def _batch(self, images: list[np.ndarray], labels: list[int], augment: Augment | None,
               rng: np.random.Generator | None) -> tuple[np.ndarray, np.ndarray]:
        if augment is not None and augment.active:
            images = augment.apply(images, rng)
        return preprocess_images(images, self.spec), np.asarray(labels, np.int64)

    def samples_per_epoch(self, batch_size: int, *, drop_last: bool = False) -> int:
        """How many samples one epoch trains on."""
        return (len(self) // batch_size) * batch_size if drop_last else len(self)

    def release(self) -> None:
        """Drop what can be read again (a device host's idle device holds no images)."""


class DecodeCache:
    """Decoded images by index, least recently used first out, at most ``max_bytes`` in all."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise DataError(f"the image cache must be >= 0 bytes, got {max_bytes}")
        self.max_bytes, self.bytes = max_bytes, 0
        self._images: OrderedDict[int, np.ndarray] = OrderedDict()

    def get(self, index: int) -> np.ndarray | None:
        image = self._images.get(index)
        if image is not None:
            self._images.move_to_end(index)
        return image

    def put(self, index: int, image: np.ndarray) -> None:
        if image.nbytes > self.max_bytes or index in self._images:
            return
        self._images[index] = image
        self.bytes += image.nbytes
        while self.bytes > self.max_bytes:
            self.bytes -= self._images.popitem(last=False)[1].nbytes

    def clear(self) -> None:
        self._images.clear()
        self.bytes = 0


class DeviceData(Samples):
    """Images as stored (N, H, W, C) uint8 and labels (N,) int64, in memory; each batch is
    preprocessed when it is drawn, so a shard costs its uint8 bytes, not float32 at the model's
    resolution (a 32 x 32 image kept at 224 x 224 float32 would be 196 times larger)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, spec: Preprocess,
                 class_names: tuple[str, ...] | None = None) -> None:
        self.images, self.labels, self.spec, self.class_names = images, labels, spec, class_names

    def image(self, index: int) -> np.ndarray:
        return self.images[index]


class NpzImages(Samples):
    """An npz shard read image by image from its file (:mod:`edge_runtime.npz_shard`), through a
    cache bounded in bytes: the device's memory does not grow with the shard."""

    def __init__(self, block: ImageBlock, labels: np.ndarray, spec: Preprocess,
                 class_names: tuple[str, ...] | None, cache_bytes: int) -> None:
        self.block, self.labels, self.spec, self.class_names = block, labels, spec, class_names
        self.cache = DecodeCache(cache_bytes)

    def image(self, index: int) -> np.ndarray:
        image = self.cache.get(index)
        if image is None:
            image = self.block.read(index)
            self.cache.put(index, image)
        return image

    def release(self) -> None:
        self.cache.clear()


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


def preprocess_images(images: Sequence[np.ndarray], spec: Preprocess) -> np.ndarray:
    """A list of uint8 (H, W, C) images, of one size or several, -> normalized float32 (N, C, S, S)."""
    if len({image.shape for image in images}) <= 1:
        return preprocess(np.stack(images) if images else np.zeros((0, 1, 1, len(spec.mean)), np.uint8), spec)
    return np.concatenate([preprocess(image[None], spec) for image in images])


def check_labels(labels: np.ndarray, num_classes: int | None, where: str) -> None:
    """DataError when a label is negative or, with ``num_classes``, not one of the model's classes."""
    if labels.size and labels.min() < 0:
        raise DataError(f"{where}: labels must be >= 0, found {int(labels.min())}")
    if num_classes and labels.size and labels.max() >= num_classes:
        bad = int(labels.max())
        raise DataError(f"{where}: label {bad} is outside the model's {num_classes} classes (ids 0..{num_classes - 1})")


def load_data(spec: str, preprocess_spec: Preprocess, *, num_classes: int | None = None,
              cache_bytes: int = DEFAULT_CACHE_BYTES) -> Samples:
    """The shard ``spec`` names (:data:`SOURCE_FORMS`); DataError, before anything connects, when
    it cannot be used. ``num_classes`` (the bundle's, when it states it) bounds the labels."""
    kind, _, location = spec.partition(":")
    if kind in ("folder", "manifest") and location:
        from edge_runtime import image_files

        opener = image_files.open_folder if kind == "folder" else image_files.open_manifest
        data = opener(Path(location).expanduser(), preprocess_spec, cache_bytes=cache_bytes)
    elif kind == "npz" and location:
        data = _load_npz(Path(location).expanduser(), preprocess_spec, cache_bytes)
    else:
        raise DataError(f"--data must be {SOURCE_FORMS}, got {spec!r}")
    check_labels(data.labels, num_classes, location)
    if len(data) == 0:
        raise DataError(f"{location}: no readable image ({data.skipped} skipped as unreadable)")
    return data


def _load_npz(path: Path, spec: Preprocess, cache_bytes: int) -> Samples:
    """An npz shard: read image by image when stored uncompressed (``np.savez``), else loaded whole."""
    labels, names = _npz_labels(path)
    if names is not None:
        check_labels(labels, len(names), f"{path} (its class_names)")
    block = image_block(path)
    if block is not None:
        _check_images(path, block.shape, "uint8", labels.shape[0], spec)
        return NpzImages(block, labels, spec, names, cache_bytes)
    try:
        with np.load(path, allow_pickle=False) as archive:
            images = archive["images"]
    except (OSError, KeyError, ValueError) as exc:
        raise DataError(f"{path}: cannot read images and labels ({exc})") from None
    _check_images(path, images.shape, str(images.dtype), labels.shape[0], spec)
    return DeviceData(images, labels, spec, names)


def _check_images(path: Path, shape: tuple[int, ...], dtype: str, count: int, spec: Preprocess) -> None:
    if dtype != "uint8":
        raise DataError(f"{path}: images must be uint8, got {dtype}")
    if len(shape) != 4 or shape[-1] != len(spec.mean):
        raise DataError(f"{path}: images must be (N, H, W, {len(spec.mean)}), got {shape}")
    if shape[0] != count:
        raise DataError(f"{path}: labels must be {shape[0]} integers, one per image, got {count}")


def _npz_labels(path: Path) -> tuple[np.ndarray, tuple[str, ...] | None]:
    """An npz shard's labels and class names, without reading its images."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            labels = archive["labels"]
            names = tuple(str(n) for n in archive["class_names"]) if "class_names" in archive.files else None
    except (OSError, KeyError, ValueError) as exc:
        raise DataError(f"{path}: cannot read images and labels ({exc})") from None
    if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: need at least one sample and integer labels, got {labels.dtype} {labels.shape}")
    return labels.astype(np.int64), names


def check_against_plan(data: Samples, num_classes: int, digest: bytes) -> None:
    """DataMismatchError when the plan's classes (count, and the digest of their names) are not the
    ones this shard was labelled with; a 0 count or a zero digest states nothing."""
    if num_classes and data.labels.size and int(data.labels.max()) >= num_classes:
        raise DataMismatchError(f"this device holds label {int(data.labels.max())} but the run's model has "
                                f"{num_classes} classes (ids 0..{num_classes - 1})")
    if digest == NO_CLASSES_DIGEST or data.class_names is None:
        return
    if num_classes and len(data.class_names) != num_classes:
        raise DataMismatchError(f"this device's data names {len(data.class_names)} classes, the run has "
                                f"{num_classes}: {_names(data.class_names)}")
    if classes_digest(data.class_names) != digest:
        raise DataMismatchError(
            f"this device numbers its classes {_names(data.class_names)} (digest "
            f"{classes_digest(data.class_names).hex()[:16]}), the run's class list differs (digest {digest.hex()[:16]}): "
            "put the run's class list, one name per line in id order, in classes.txt beside the data")


def _names(names: Sequence[str], shown: int = 12) -> str:
    listed = ", ".join(f"{i}={n}" for i, n in enumerate(names[:shown]))
    return listed + (f", ... ({len(names)} in all)" if len(names) > shown else "")


class LazyDeviceData(Samples):
    """A device host's shard: idle devices hold their labels and file list, not their images. A
    source read from its files keeps its (small) index and drops its cached images between
    rounds; an npz that has to be loaded whole is read again for each round."""

    def __init__(self, spec: str, preprocess_spec: Preprocess, *, num_classes: int | None = None,
                 cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.source, self.spec, self.num_classes, self.cache_bytes = spec, preprocess_spec, num_classes, cache_bytes
        self._data: Samples | None = load_data(spec, preprocess_spec, num_classes=num_classes, cache_bytes=cache_bytes)
        self.labels, self.class_names = self._data.labels, self._data.class_names
        self._resident = not isinstance(self._data, DeviceData)  # read from its files as it goes: keep it
        self.release()

    @property
    def skipped(self) -> int:  # type: ignore[override]
        return self._data.skipped if self._data is not None else 0

    def load(self) -> Samples:
        if self._data is None:
            self._data = load_data(self.source, self.spec, num_classes=self.num_classes, cache_bytes=self.cache_bytes)
        return self._data

    def release(self) -> None:
        """Drop the loaded images (an npz is read again next round; a folder re-decodes)."""
        if self._resident and self._data is not None:
            self._data.release()
        else:
            self._data = None

    def usable(self) -> np.ndarray:
        return self._data.usable() if self._data is not None else np.arange(self.labels.shape[0])

    def image(self, index: int) -> np.ndarray | None:
        return self.load().image(index)

    def batches(self, batch_size: int, rng: np.random.Generator, **options: object) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        return self.load().batches(batch_size, rng, **options)
