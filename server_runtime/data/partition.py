"""How a data set's samples split across devices: Dirichlet label skew, IID, class shards.

Every partitioner is numpy-only, deterministic for a seed, and returns one sorted int64 index
array per device. Without resampling every sample goes to exactly one device;
:func:`dirichlet_resample` draws with replacement, for fleets larger than the data set.
"""

from __future__ import annotations

import logging
import math

import numpy as np

logger = logging.getLogger(__name__)

SCHEMES = ("dirichlet", "iid", "shards")
MIN_SAMPLES = 10  # the Dirichlet partition's default minimum per device


class PartitionError(ValueError):
    """A partition request that is invalid or cannot be met; the message says which and why."""


def _rng(seed: int) -> np.random.Generator:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise PartitionError(f"seed must be an integer >= 0, got {seed!r}")
    return np.random.default_rng(int(seed))


def _check_int(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise PartitionError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_labels(labels: np.ndarray) -> np.ndarray:
    """Labels as a non-empty 1-D int64 array of non-negative class ids."""
    array = np.asarray(labels)
    if array.ndim != 1 or array.size == 0 or not np.issubdtype(array.dtype, np.integer):
        raise PartitionError(
            f"labels must be a non-empty 1-D integer array, got {array.dtype} {array.shape}"
        )
    if array.min() < 0:
        raise PartitionError(f"labels must be >= 0, found {array.min()}")
    return array.astype(np.int64)


def _check_alpha(alpha: float) -> float:
    """A Dirichlet concentration: a finite number > 0."""
    if not (isinstance(alpha, (int, float, np.floating)) and math.isfinite(alpha) and alpha > 0):
        raise PartitionError(f"alpha must be a finite number > 0, got {alpha!r}")
    return float(alpha)


def _check_size_range(size_range: tuple[int, int]) -> tuple[int, int]:
    """A resample range (lo, hi) of whole numbers with 1 <= lo <= hi."""
    if len(size_range) != 2:
        raise PartitionError(f"size_range must be (lo, hi), got {size_range!r}")
    lo = _check_int("resample lo", size_range[0], 1)
    hi = _check_int("resample hi", size_range[1], 1)
    if lo > hi:
        raise PartitionError(f"resample range needs lo <= hi, got {lo}-{hi}")
    return lo, hi


def _sorted_parts(parts: list[list[np.ndarray]]) -> list[np.ndarray]:
    """Each device's pieces joined into one sorted int64 index array."""
    return [np.sort(np.concatenate([np.empty(0, np.int64), *p])).astype(np.int64) for p in parts]


# --- Dirichlet --------------------------------------------------------------------------------


def _dirichlet_draw(
    by_class: list[np.ndarray], num_devices: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """One per-class Dirichlet draw with the FedML balancing step (full devices get no more)."""
    cap = sum(len(idx) for idx in by_class) / num_devices
    pieces: list[list[np.ndarray]] = [[] for _ in range(num_devices)]
    sizes = np.zeros(num_devices, dtype=np.int64)
    for class_idx in by_class:
        idx = rng.permutation(class_idx)
        open_ = sizes < cap
        p = np.where(open_, rng.dirichlet(np.full(num_devices, alpha)), 0.0)
        total = p.sum()
        # A tiny alpha can put all mass on full devices; then share among the open ones evenly.
        p = p / total if np.isfinite(total) and total > 0 else open_ / np.count_nonzero(open_)
        cuts = (np.cumsum(p) * len(idx)).astype(np.int64)[:-1]
        for device, piece in enumerate(np.split(idx, cuts)):
            pieces[device].append(piece)
            sizes[device] += len(piece)
    return _sorted_parts(pieces)


def dirichlet_partition(
    labels: np.ndarray,
    num_devices: int,
    alpha: float,
    *,
    seed: int,
    min_samples: int = MIN_SAMPLES,
    max_attempts: int = 1000,
) -> list[np.ndarray]:
    """Per-class Dirichlet(alpha) label skew, as in FedML / FedMA and the SFLAM code.

    For each class the shuffled samples are cut by proportions ~ Dir(alpha * 1_N), with devices
    already at N_total / num_devices samples zeroed out; the whole draw repeats until every
    device has ``min_samples``. Smaller alpha -> more skew.
    """
    labels = _check_labels(labels)
    num_devices = _check_int("num_devices", num_devices, 1)
    min_samples = _check_int("min_samples", min_samples, 0)
    max_attempts = _check_int("max_attempts", max_attempts, 1)
    alpha = _check_alpha(alpha)
    if num_devices * min_samples > len(labels):
        raise PartitionError(
            f"cannot give {num_devices} devices {min_samples} samples each from only "
            f"{len(labels)} samples; use fewer devices or a smaller min_samples"
        )
    rng = _rng(seed)
    by_class = [np.flatnonzero(labels == k) for k in np.unique(labels)]
    for attempt in range(1, max_attempts + 1):
        parts = _dirichlet_draw(by_class, num_devices, alpha, rng)
        smallest = min(len(p) for p in parts)
        if smallest >= min_samples:
            logger.debug("dirichlet partition after %d draw(s), smallest %d", attempt, smallest)
            return parts
    raise PartitionError(
        f"no Dirichlet(alpha={alpha}) draw in {max_attempts} attempts gave all {num_devices} "
        f"devices >= {min_samples} samples (of {len(labels)}); raise alpha, lower min_samples "
        "or use fewer devices"
    )


# --- IID and shards ---------------------------------------------------------------------------


def iid_partition(num_samples: int, num_devices: int, *, seed: int) -> list[np.ndarray]:
    """A uniformly random split into near-equal parts (sizes differ by at most one)."""
    num_samples = _check_int("num_samples", num_samples, 1)
    num_devices = _check_int("num_devices", num_devices, 1)
    if num_samples < num_devices:
        raise PartitionError(f"{num_samples} samples cannot give {num_devices} devices one each")
    order = _rng(seed).permutation(num_samples)
    return [np.sort(part).astype(np.int64) for part in np.array_split(order, num_devices)]


def _shards_per_class(class_sizes: np.ndarray, total_shards: int) -> np.ndarray:
    """Shard counts per class: one each, the rest greedily to the class with the largest shards."""
    counts = np.ones(len(class_sizes), dtype=np.int64)
    for _ in range(total_shards - len(class_sizes)):
        counts[np.argmax(class_sizes / counts)] += 1
    return counts


def shard_partition(
    labels: np.ndarray, num_devices: int, shards_per_device: int, *, seed: int
) -> list[np.ndarray]:
    """McMahan-style shards cut within single classes: a device holds <= shards_per_device classes.

    The num_devices * shards_per_device shards are apportioned to classes by size (each class at
    least one, so no sample is dropped), cut from each shuffled class, and dealt out at random.
    """
    labels = _check_labels(labels)
    num_devices = _check_int("num_devices", num_devices, 1)
    shards_per_device = _check_int("shards_per_device", shards_per_device, 1)
    classes, class_sizes = np.unique(labels, return_counts=True)
    total = num_devices * shards_per_device
    if total < len(classes):
        raise PartitionError(
            f"{num_devices} devices x {shards_per_device} shards = {total} single-class shards "
            f"cannot cover {len(classes)} classes; use more devices or shards per device"
        )
    if total > len(labels):
        raise PartitionError(f"{total} shards need at least {total} samples, have {len(labels)}")
    rng = _rng(seed)
    shards: list[np.ndarray] = []
    for k, count in zip(classes, _shards_per_class(class_sizes, total), strict=True):
        shards.extend(np.array_split(rng.permutation(np.flatnonzero(labels == k)), count))
    dealt = rng.permutation(total).reshape(num_devices, shards_per_device)
    return _sorted_parts([[shards[s] for s in row] for row in dealt])


# --- resampling and the dispatcher ------------------------------------------------------------


def resample_partition(
    parts: list[np.ndarray], size_range: tuple[int, int], *, seed: int
) -> list[np.ndarray]:
    """Redraw each device to a size ~ U{lo..hi} from its own pool, as the SFLAM code does.

    Sampling is without replacement when the pool is large enough, with replacement otherwise
    (so a device may then hold duplicates). An empty pool is an error, not a crash.
    """
    lo, hi = _check_size_range(size_range)
    for device, pool in enumerate(parts):
        if len(pool) == 0:
            raise PartitionError(f"device {device} has no samples to resample from")
    rng = _rng(seed)
    out = []
    for pool in parts:
        target = int(rng.integers(lo, hi + 1))
        chosen = rng.choice(np.asarray(pool), size=target, replace=len(pool) < target)
        out.append(np.sort(chosen).astype(np.int64))
    return out


def _label_mixes(num_devices: int, num_classes: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """(devices, classes) proportions ~ Dir(alpha); a row that underflows becomes one random class."""
    mixes = rng.dirichlet(np.full(num_classes, alpha), size=num_devices)
    bad = ~(np.isfinite(mixes).all(axis=1) & (mixes.sum(axis=1) > 0))
    if bad.any():
        mixes[bad] = np.eye(num_classes)[rng.integers(0, num_classes, size=int(bad.sum()))]
    return mixes / mixes.sum(axis=1, keepdims=True)


def dirichlet_resample(
    labels: np.ndarray, num_devices: int, alpha: float, size_range: tuple[int, int], *, seed: int
) -> list[np.ndarray]:
    """Shards drawn with replacement: each device's label mix ~ Dir(alpha), its size ~ U{lo..hi}.

    For fleets larger than the data set, as the SFLAM code draws 400-500 images per device:
    devices share samples and one may hold a sample twice. The mix is over the classes present in
    ``labels``; each class's samples are drawn uniformly. Smaller alpha -> more skew.
    """
    labels = _check_labels(labels)
    num_devices = _check_int("num_devices", num_devices, 1)
    alpha = _check_alpha(alpha)
    lo, hi = _check_size_range(size_range)
    rng = _rng(seed)
    by_class = [np.flatnonzero(labels == k) for k in np.unique(labels)]
    sizes = rng.integers(lo, hi + 1, size=num_devices)
    counts = rng.multinomial(sizes, _label_mixes(num_devices, len(by_class), alpha, rng))
    owners, picks = [], []
    for pool, column in zip(by_class, counts.T, strict=True):
        owners.append(np.repeat(np.arange(num_devices), column))
        picks.append(pool[rng.integers(0, len(pool), size=int(column.sum()))])
    owner, index = np.concatenate(owners), np.concatenate(picks)
    ordered = index[np.lexsort((index, owner))].astype(np.int64)
    return np.split(ordered, np.cumsum(sizes)[:-1])


def partition(
    labels: np.ndarray,
    num_devices: int,
    scheme: str,
    *,
    seed: int,
    alpha: float = 0.5,
    shards_per_device: int = 2,
    resample: tuple[int, int] | None = None,
    min_samples: int = MIN_SAMPLES,
) -> list[np.ndarray]:
    """Partition by ``scheme`` (dirichlet | iid | shards), then optionally resample sizes.

    ``min_samples`` applies to the Dirichlet scheme only; resampling reuses ``seed``.
    """
    if scheme == "dirichlet":
        parts = dirichlet_partition(labels, num_devices, alpha, seed=seed, min_samples=min_samples)
    elif scheme == "iid":
        parts = iid_partition(len(_check_labels(labels)), num_devices, seed=seed)
    elif scheme == "shards":
        parts = shard_partition(labels, num_devices, shards_per_device, seed=seed)
    else:
        raise PartitionError(f"unknown scheme {scheme!r}; expected one of {', '.join(SCHEMES)}")
    return parts if resample is None else resample_partition(parts, resample, seed=seed)


# --- statistics -------------------------------------------------------------------------------


def label_histogram(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """(devices, classes) sample counts."""
    labels = _check_labels(labels)
    num_classes = _check_int("num_classes", num_classes, 1)
    if labels.max() >= num_classes:
        raise PartitionError(f"label {labels.max()} is out of range for {num_classes} classes")
    rows = [np.bincount(labels[np.asarray(p, np.int64)], minlength=num_classes) for p in parts]
    return np.array(rows, dtype=np.int64).reshape(len(parts), num_classes)


def skew(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> float:
    """Label skew: mean total-variation distance of each device's label mix to the pooled mix.

    Devices without samples are left out; the pooled mix is that of all parts together.
    0 means every device mirrors the global mix; it approaches 1 as devices hold disjoint
    classes (e.g. 0.9 for 10 balanced classes split one class per device).
    """
    hist = label_histogram(labels, parts, num_classes).astype(np.float64)
    sizes = hist.sum(axis=1)
    if not (sizes > 0).any():
        raise PartitionError("skew needs at least one device with samples")
    global_dist = hist.sum(axis=0) / sizes.sum()
    local = hist[sizes > 0] / sizes[sizes > 0, None]
    return float(np.mean(0.5 * np.abs(local - global_dist).sum(axis=1)))
