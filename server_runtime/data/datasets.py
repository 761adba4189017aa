"""Image data sets at native resolution: scikit-learn digits, CIFAR-10 (binary) and image folders.

Images stay ``uint8`` (N, H, W, 3) at the size they were stored in; resizing to the model's input
happens per batch (see ``transforms.py``), because CIFAR-10 at 224x224 would take 30 GB.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_runtime.image_files import IMAGE_SUFFIXES  # one list: what a device and the server take as images

logger = logging.getLogger(__name__)

SPEC_FORMS = "digits | cifar10:<dir> | folder:<dir>"
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch.bin"
CIFAR10_RECORD_BYTES = 1 + 3 * 32 * 32


class DatasetError(ValueError):
    """A data set spec, file or folder that cannot be loaded; the message names it."""


@dataclass(frozen=True, eq=False)
class ImageSet:
    """Images (uint8, N x H x W x 3, native resolution) with int64 labels and class names."""

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[-1] != 3:
            raise DatasetError(
                f"images must be uint8 (N, H, W, 3), got {self.images.dtype} {self.images.shape}"
            )
        if self.labels.dtype != np.int64 or self.labels.shape != (len(self.images),):
            raise DatasetError(
                f"labels must be int64 ({len(self.images)},), "
                f"got {self.labels.dtype} {self.labels.shape}"
            )
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= self.num_classes):
            raise DatasetError(f"labels must lie in [0, {self.num_classes}), the class count")

    @property
    def num_classes(self) -> int:
        """How many classes the labels index (including ones absent from this set)."""
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: np.ndarray | Sequence[int]) -> ImageSet:
        """The samples at ``indices`` (a copy), with the same class names."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.ndim != 1:
            raise DatasetError(f"subset indices must be 1-D, got shape {idx.shape}")
        if len(idx) and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise DatasetError(f"subset index out of range for a set of {len(self)} samples")
        return ImageSet(self.images[idx], self.labels[idx], self.class_names)


@dataclass(frozen=True, eq=False)
class DataSplit:
    """A named data set with its train and test sets, and a validation set carved from train."""

    name: str
    train: ImageSet
    test: ImageSet
    validation: ImageSet | None = None  # held out of train (never of test); None: not asked for


def load_dataset(spec: str, *, seed: int = 0, test_fraction: float = 0.2,
                 validation_fraction: float = 0.0) -> DataSplit:
    """Load ``digits``, ``cifar10:<dir>`` or ``folder:<dir>``.

    ``seed`` and ``test_fraction`` only matter where the source has no test set of its own
    (digits, a folder without ``train``/``test``): the split is stratified and deterministic.
    ``validation_fraction`` > 0 holds that fraction of every class of the training set out as
    ``validation`` (stratified, seeded by ``seed``): what a run picks its "best" round on, so the
    test set is only ever used for the figure reported. A simulation and its server call this
    with the same arguments, so the devices' shards and the server's validation set never overlap.
    """
    kind, sep, location = spec.partition(":")
    kind = kind.strip().lower()
    if kind == "digits" and not sep:
        data = _load_digits(seed, test_fraction)
    elif kind == "cifar10" and location:
        data = _load_cifar10(Path(location).expanduser())
    elif kind == "folder" and location:
        data = _load_folder(Path(location).expanduser(), seed, test_fraction)
    else:
        raise DatasetError(f"unknown data set spec {spec!r}; expected one of: {SPEC_FORMS}")
    if validation_fraction == 0.0:
        return data
    train, validation = _split_set(data.train, validation_fraction, seed)
    return DataSplit(data.name, train, data.test, validation)


def stratified_split(
    labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, test) indices holding ``test_fraction`` of every class in test.

    A class with two or more samples keeps at least one in each part; a single sample goes to
    train.
    """
    if not 0.0 < test_fraction < 1.0:
        raise DatasetError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    if seed < 0:
        raise DatasetError(f"seed must be >= 0, got {seed}")
    rng = np.random.default_rng(seed)
    train: list[np.ndarray] = []
    test: list[np.ndarray] = []
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        n_test = int(round(len(idx) * test_fraction))
        if len(idx) >= 2:
            n_test = min(max(n_test, 1), len(idx) - 1)
        else:
            n_test = 0
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _split_set(data: ImageSet, test_fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    train_idx, test_idx = stratified_split(data.labels, test_fraction, seed)
    return data.subset(train_idx), data.subset(test_idx)


# --- digits -----------------------------------------------------------------------------------


def _load_digits(seed: int, test_fraction: float) -> DataSplit:
    """scikit-learn's bundled 8x8 digits (no download), scaled 0..16 -> 0..255, grey -> RGB."""
    from sklearn.datasets import load_digits  # lazy: sklearn is slow to import

    bunch = load_digits()
    grey = np.round(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    images = np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=-1))
    names = tuple(str(name) for name in bunch.target_names)
    full = ImageSet(images, bunch.target.astype(np.int64), names)
    train, test = _split_set(full, test_fraction, seed)
    return DataSplit("digits", train, test)


# --- CIFAR-10 binary --------------------------------------------------------------------------


def _cifar10_root(path: Path) -> Path:
    """The folder holding the ``.bin`` batches: ``path`` or its ``cifar-10-batches-bin``."""
    if not path.is_dir():
        raise DatasetError(f"CIFAR-10 folder not found: {path}")
    for candidate in (path, path / "cifar-10-batches-bin"):
        if (candidate / CIFAR10_TEST_FILE).exists() or (candidate / "data_batch_1.bin").exists():
            return candidate
    for candidate in (path, path / "cifar-10-batches-py"):
        if (candidate / "data_batch_1").exists():
            raise DatasetError(
                f"{candidate} holds the pickled 'python version' of CIFAR-10, which sflam never "
                "unpickles; download the binary version (cifar-10-binary.tar.gz, files "
                "data_batch_1.bin .. data_batch_5.bin and test_batch.bin) instead"
            )
    raise DatasetError(
        f"no CIFAR-10 binary batches in {path} (expected data_batch_1.bin .. data_batch_5.bin "
        "and test_batch.bin, directly or under cifar-10-batches-bin/)"
    )


def read_cifar10_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One binary batch file -> (uint8 images N x 32 x 32 x 3, int64 labels N)."""
    if not path.is_file():
        raise DatasetError(f"CIFAR-10 batch file missing: {path}")
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % CIFAR10_RECORD_BYTES:
        raise DatasetError(
            f"{path} is {raw.size} bytes, not a positive multiple of the "
            f"{CIFAR10_RECORD_BYTES}-byte CIFAR-10 record (truncated, or not a binary batch)"
        )
    records = raw.reshape(-1, CIFAR10_RECORD_BYTES)
    labels = records[:, 0].astype(np.int64)
    if labels.max() >= len(CIFAR10_CLASSES):
        bad = int(np.flatnonzero(labels >= len(CIFAR10_CLASSES))[0])
        raise DatasetError(f"{path}: record {bad} has label {labels[bad]}; CIFAR-10 has 0..9")
    # Each record stores the R, G and B planes (CHW); the set keeps HWC.
    images = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def _cifar10_class_names(root: Path) -> tuple[str, ...]:
    meta = root / "batches.meta.txt"
    if not meta.is_file():
        return CIFAR10_CLASSES
    names = tuple(line.strip() for line in meta.read_text(encoding="utf-8").splitlines())
    names = tuple(name for name in names if name)
    if len(names) != len(CIFAR10_CLASSES):
        raise DatasetError(f"{meta} names {len(names)} classes, CIFAR-10 has 10")
    return names


def _load_cifar10(path: Path) -> DataSplit:
    """The CIFAR-10 binary distribution: 50,000 train and 10,000 test 32x32 images."""
    root = _cifar10_root(path)
    names = _cifar10_class_names(root)
    batches = [read_cifar10_batch(root / name) for name in CIFAR10_TRAIN_FILES]
    train = ImageSet(
        np.concatenate([images for images, _ in batches]),
        np.concatenate([labels for _, labels in batches]),
        names,
    )
    test = ImageSet(*read_cifar10_batch(root / CIFAR10_TEST_FILE), names)
    logger.info("CIFAR-10 from %s: %d train, %d test", root, len(train), len(test))
    return DataSplit("cifar10", train, test)


# --- image folders ----------------------------------------------------------------------------


def _class_files(tree: Path) -> dict[str, list[Path]]:
    """Class name -> sorted image files, one sub-folder per class."""
    if not tree.is_dir():
        raise DatasetError(f"image folder not found: {tree}")
    classes = sorted(p for p in tree.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DatasetError(f"{tree} has no class sub-folders (expected <dir>/<class>/<image>)")
    files: dict[str, list[Path]] = {}
    for folder in classes:
        images = sorted(p for p in folder.rglob("*") if _is_image_file(p))
        if not images:
            raise DatasetError(
                f"class folder {folder} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})"
            )
        files[folder.name] = images
    return files


def _is_image_file(path: Path) -> bool:
    visible = not path.name.startswith(".")
    return visible and path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as exc:
        raise DatasetError(f"cannot read image {path}: {exc}") from exc


def _common_size(arrays: Sequence[np.ndarray]) -> tuple[int, int]:
    """The most common (H, W); ties go to the larger area, then the larger height."""
    counts = Counter(a.shape[:2] for a in arrays)
    return max(counts, key=lambda hw: (counts[hw], hw[0] * hw[1], hw[0]))


def _to_size(arrays: list[np.ndarray], size: tuple[int, int]) -> np.ndarray:
    """Stack images, resizing (bilinear, Pillow) only those not already ``size`` (H, W)."""
    from PIL import Image

    resized = 0
    out = np.empty((len(arrays), *size, 3), dtype=np.uint8)
    for i, array in enumerate(arrays):
        if array.shape[:2] != size:
            image = Image.fromarray(array).resize((size[1], size[0]), Image.Resampling.BILINEAR)
            array = np.asarray(image, dtype=np.uint8)
            resized += 1
        out[i] = array
    if resized:
        logger.warning("resized %d of %d images to the common size %s", resized, len(out), size)
    return out


def _read_tree(
    files: dict[str, list[Path]], names: tuple[str, ...]
) -> tuple[list[np.ndarray], np.ndarray]:
    """Decode every file of a class tree, labelled by its index in ``names``."""
    index = {name: i for i, name in enumerate(names)}
    arrays = [_read_image(path) for cls in files for path in files[cls]]
    labels = np.array([index[cls] for cls in files for _ in files[cls]], dtype=np.int64)
    return arrays, labels


def _load_folder(path: Path, seed: int, test_fraction: float) -> DataSplit:
    """``<dir>/<class>/*`` split by seed, or ``<dir>/train/<class>`` + ``<dir>/test/<class>``."""
    if not path.is_dir():
        raise DatasetError(f"image folder not found: {path}")
    name = path.resolve().name
    if (path / "train").is_dir() and (path / "test").is_dir():
        train_files, test_files = _class_files(path / "train"), _class_files(path / "test")
        unknown = sorted(set(test_files) - set(train_files))
        if unknown:
            raise DatasetError(f"{path / 'test'} has classes missing from train: {unknown}")
        names = tuple(train_files)
        train_arrays, train_labels = _read_tree(train_files, names)
        test_arrays, test_labels = _read_tree(test_files, names)
        size = _common_size(train_arrays + test_arrays)
        train = ImageSet(_to_size(train_arrays, size), train_labels, names)
        test = ImageSet(_to_size(test_arrays, size), test_labels, names)
        return DataSplit(name, train, test)
    files = _class_files(path)
    names = tuple(files)
    arrays, labels = _read_tree(files, names)
    full = ImageSet(_to_size(arrays, _common_size(arrays)), labels, names)
    train, test = _split_set(full, test_fraction, seed)
    return DataSplit(name, train, test)


def write_digits_shards(folder: Path, devices: int, per_device: int, seed: int = 0, stem: str = "dev") -> list[Path]:
    """Disjoint random shards of the digits training split, ``{stem}-{d}.npz`` in ``folder``, in the
    layout ``sflam device --data npz:<file>`` reads (``images`` uint8 NHWC, ``labels``). For tests,
    benchmarks and drills; ``seed`` orders the draw."""
    train = load_dataset("digits", seed=0).train
    if devices * per_device > len(train):
        raise DatasetError(f"{devices} shards of {per_device} need {devices * per_device} samples; "
                           f"digits has {len(train)}")
    order = np.random.default_rng(seed).permutation(len(train))
    paths = []
    for d in range(devices):
        index = order[d * per_device:(d + 1) * per_device]
        path = Path(folder) / f"{stem}-{d}.npz"
        np.savez(path, images=train.images[index], labels=train.labels[index])
        paths.append(path)
    return paths
