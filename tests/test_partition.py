"""Partitioners (Dirichlet, IID, shards, resampling), their statistics, `sflam data partition`."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from server_runtime.data import (
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

REPO = Path(__file__).resolve().parents[1]
# 10 classes of unequal size (150..240), in shuffled order, as a data set's labels would be.
LABELS = np.random.default_rng(0).permutation(np.repeat(np.arange(10), np.arange(150, 250, 10)))


def _assert_exact_cover(parts: list[np.ndarray], num_samples: int) -> None:
    """Every sample in exactly one part; parts sorted int64."""
    for part in parts:
        assert part.dtype == np.int64 and np.all(np.diff(part) > 0)
    joined = np.sort(np.concatenate(parts))
    assert np.array_equal(joined, np.arange(num_samples))


# --- exact cover and determinism --------------------------------------------------------------


@pytest.mark.parametrize(
    "scheme, kwargs",
    [("dirichlet", {"alpha": 0.3}), ("iid", {}), ("shards", {"shards_per_device": 3})],
)
def test_every_sample_is_assigned_exactly_once(scheme: str, kwargs: dict) -> None:
    # Execute
    parts = partition(LABELS, 12, scheme, seed=5, **kwargs)
    # Assert
    assert len(parts) == 12
    _assert_exact_cover(parts, len(LABELS))


@pytest.mark.parametrize("scheme", ["dirichlet", "iid", "shards"])
def test_same_seed_same_partition_other_seed_different(scheme: str) -> None:
    # Execute
    first = partition(LABELS, 8, scheme, seed=11)
    again = partition(LABELS, 8, scheme, seed=11)
    other = partition(LABELS, 8, scheme, seed=12)
    # Assert
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_iid_sizes_differ_by_at_most_one() -> None:
    # Execute
    parts = iid_partition(103, 10, seed=0)
    # Assert
    assert sorted(len(p) for p in parts) == [10] * 7 + [11] * 3
    _assert_exact_cover(parts, 103)


# --- Dirichlet --------------------------------------------------------------------------------


def test_smaller_alpha_gives_more_label_skew() -> None:
    # Execute: mean skew over five seeds per alpha
    mean_skew = {}
    for alpha in (0.1, 1.0, 100.0):
        parts = [dirichlet_partition(LABELS, 10, alpha, seed=s) for s in range(5)]
        mean_skew[alpha] = np.mean([skew(LABELS, p, 10) for p in parts])
    # Assert: about 0.73, 0.37 and 0.04, so these margins are wide
    assert mean_skew[0.1] > mean_skew[1.0] + 0.2
    assert mean_skew[1.0] > mean_skew[100.0] + 0.2
    assert mean_skew[100.0] < 0.1


def test_dirichlet_respects_min_samples() -> None:
    # Execute
    parts = dirichlet_partition(LABELS, 10, 0.1, seed=3, min_samples=60)
    # Assert
    assert min(len(p) for p in parts) >= 60
    _assert_exact_cover(parts, len(LABELS))


def test_dirichlet_balancing_caps_devices_near_the_fair_share() -> None:
    # Execute: the balancing step stops feeding a device once it holds N / devices samples
    parts = dirichlet_partition(LABELS, 10, 0.1, seed=2, min_samples=0)
    # Assert: at most one more class on top of the share (largest class 240)
    assert max(len(p) for p in parts) < len(LABELS) / 10 + 240


def test_dirichlet_impossible_requests_raise() -> None:
    # Execute / Assert
    with pytest.raises(PartitionError, match="cannot give 300 devices 10 samples each"):
        dirichlet_partition(LABELS, 300, 0.5, seed=0)
    with pytest.raises(PartitionError, match=r"no Dirichlet\(alpha=0.01\) draw in 5 attempts"):
        dirichlet_partition(LABELS, 40, 0.01, seed=0, min_samples=40, max_attempts=5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_devices": 0, "alpha": 0.5}, "num_devices must be an integer >= 1"),
        ({"num_devices": 4, "alpha": 0.0}, "alpha must be a finite number > 0"),
        ({"num_devices": 4, "alpha": float("inf")}, "alpha must be a finite number > 0"),
        ({"num_devices": 4, "alpha": float("nan")}, "alpha must be a finite number > 0"),
    ],
)
def test_dirichlet_argument_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(PartitionError, match=message):
        dirichlet_partition(LABELS, seed=0, **kwargs)


def test_bad_labels_scheme_and_seed_are_rejected() -> None:
    with pytest.raises(PartitionError, match="1-D integer"):
        partition(np.array([0.5, 1.0]), 2, "iid", seed=0)
    with pytest.raises(PartitionError, match="unknown scheme 'pathological'"):
        partition(LABELS, 2, "pathological", seed=0)
    with pytest.raises(PartitionError, match="seed must be an integer >= 0"):
        partition(LABELS, 2, "iid", seed=-1)
    with pytest.raises(PartitionError, match="cannot give 5 devices one each"):
        iid_partition(4, 5, seed=0)


# --- shards -----------------------------------------------------------------------------------


def test_shards_give_each_device_at_most_shards_per_device_classes() -> None:
    # Execute
    parts = shard_partition(LABELS, 10, 2, seed=1)
    one = shard_partition(LABELS, 10, 1, seed=1)
    # Assert
    hist = label_histogram(LABELS, parts, 10)
    assert ((hist > 0).sum(axis=1) <= 2).all()
    assert ((label_histogram(LABELS, one, 10) > 0).sum(axis=1) == 1).all()
    assert skew(LABELS, one, 10) > 0.85  # one class per device: close to the 0.9 maximum
    _assert_exact_cover(parts, len(LABELS))


def test_shards_need_one_shard_per_class() -> None:
    with pytest.raises(PartitionError, match="4 single-class shards cannot cover 10 classes"):
        shard_partition(LABELS, 2, 2, seed=0)


# --- resampling -------------------------------------------------------------------------------


def test_resample_sizes_in_range_from_own_pool() -> None:
    # Prepare: pools smaller and larger than the target range
    parts = [np.arange(0, 30), np.arange(30, 1030), np.arange(1030, 1480)]
    # Execute
    resampled = resample_partition(parts, (400, 500), seed=9)
    # Assert
    for pool, drawn in zip(parts, resampled, strict=True):
        assert 400 <= len(drawn) <= 500
        assert np.isin(drawn, pool).all()
        assert drawn.dtype == np.int64
    assert len(np.unique(resampled[0])) <= 30  # small pool: drawn with replacement
    assert len(np.unique(resampled[1])) == len(resampled[1])  # large pool: without replacement
    again = resample_partition(parts, (400, 500), seed=9)
    assert all(np.array_equal(a, b) for a, b in zip(resampled, again, strict=True))


def test_resample_sizes_span_the_range() -> None:
    # Execute
    sizes = [len(p) for p in resample_partition([np.arange(1000)] * 200, (400, 500), seed=0)]
    # Assert
    assert min(sizes) >= 400 and max(sizes) <= 500 and max(sizes) - min(sizes) > 80


def test_resample_empty_pool_and_bad_range_raise() -> None:
    with pytest.raises(PartitionError, match="device 1 has no samples"):
        resample_partition([np.arange(5), np.array([], np.int64)], (2, 3), seed=0)
    with pytest.raises(PartitionError, match="lo <= hi"):
        resample_partition([np.arange(5)], (5, 3), seed=0)
    with pytest.raises(PartitionError, match="resample lo must be an integer >= 1"):
        resample_partition([np.arange(5)], (0, 3), seed=0)


# --- resampling with replacement (fleets larger than the data set) ------------------------------

# digits' training split: 1,438 images of 10 classes
DIGITS_SIZED = np.random.default_rng(1).permutation(np.resize(np.arange(10), 1438))


def test_dirichlet_resample_sizes_in_range_indices_valid_and_sorted() -> None:
    # Execute: 1,000 devices of 20-40 images from 1,438
    parts = dirichlet_resample(DIGITS_SIZED, 1000, 0.5, (20, 40), seed=4)
    # Assert
    sizes = np.array([len(p) for p in parts])
    assert len(parts) == 1000 and sizes.min() >= 20 and sizes.max() <= 40
    assert sizes.max() - sizes.min() >= 18  # U{20..40} over 1000 devices spans the range
    for part in parts:
        assert part.dtype == np.int64 and np.all(np.diff(part) >= 0)
        assert part.min() >= 0 and part.max() < len(DIGITS_SIZED)
    assert sizes.sum() > len(DIGITS_SIZED)  # more than the data set: drawn with replacement


def test_dirichlet_resample_skew_decreases_as_alpha_grows() -> None:
    # Execute
    mean_skew = {alpha: skew(DIGITS_SIZED, dirichlet_resample(DIGITS_SIZED, 500, alpha, (20, 40), seed=0), 10)
                 for alpha in (0.1, 1.0, 100.0)}
    # Assert: about 0.72, 0.40 and 0.22 (the last is the sampling noise of 20-40 draws)
    assert mean_skew[0.1] > mean_skew[1.0] + 0.2
    assert mean_skew[1.0] > mean_skew[100.0] + 0.1
    assert mean_skew[100.0] < 0.3


def test_dirichlet_resample_tiny_alpha_gives_one_class_devices() -> None:
    # Execute
    parts = dirichlet_resample(DIGITS_SIZED, 200, 1e-6, (20, 40), seed=0)
    # Assert
    classes_held = (label_histogram(DIGITS_SIZED, parts, 10) > 0).sum(axis=1)
    assert np.mean(classes_held == 1) > 0.95


def test_dirichlet_resample_draws_only_present_classes() -> None:
    # Prepare: classes 0 and 7 only
    labels = np.array([0, 7] * 50)
    # Execute
    parts = dirichlet_resample(labels, 30, 1.0, (5, 9), seed=1)
    # Assert
    hist = label_histogram(labels, parts, 8)
    assert hist[:, 1:7].sum() == 0 and hist.sum() == sum(len(p) for p in parts)


def test_dirichlet_resample_is_deterministic_for_a_seed() -> None:
    # Execute
    first = dirichlet_resample(DIGITS_SIZED, 300, 0.5, (20, 40), seed=7)
    again = dirichlet_resample(DIGITS_SIZED, 300, 0.5, (20, 40), seed=7)
    other = dirichlet_resample(DIGITS_SIZED, 300, 0.5, (20, 40), seed=8)
    # Assert
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_dirichlet_resample_10000_devices_from_1438_labels_in_well_under_a_second() -> None:
    # Execute
    started = time.perf_counter()
    parts = dirichlet_resample(DIGITS_SIZED, 10_000, 0.5, (20, 40), seed=0)
    elapsed_s = time.perf_counter() - started
    # Assert: about 0.06 s on a 2-core host
    assert len(parts) == 10_000 and min(len(p) for p in parts) >= 20 and max(len(p) for p in parts) <= 40
    assert elapsed_s < 1.0


@pytest.mark.parametrize(
    "args, message",
    [
        ((0, 0.5, (20, 40)), "num_devices must be an integer >= 1"),
        ((10, 0.0, (20, 40)), "alpha must be a finite number > 0"),
        ((10, 0.5, (40, 20)), "lo <= hi"),
        ((10, 0.5, (0, 20)), "resample lo must be an integer >= 1"),
        ((10, 0.5, (20,)), "size_range must be"),
    ],
)
def test_dirichlet_resample_argument_errors(args: tuple, message: str) -> None:
    with pytest.raises(PartitionError, match=message):
        dirichlet_resample(DIGITS_SIZED, *args, seed=0)


# --- statistics -------------------------------------------------------------------------------


def test_label_histogram_and_skew_values() -> None:
    # Prepare: two balanced classes; device 0 holds only class 0, device 1 a 50/50 mix
    labels = np.array([0, 0, 0, 1, 1, 1])
    parts = [np.array([0, 1]), np.array([2, 3, 4, 5])]
    # Execute
    hist = label_histogram(labels, parts, 3)
    value = skew(labels, parts, 3)
    # Assert: pooled mix (1/2, 1/2); TV distances 0.5 (device 0) and 1/4 (device 1)
    assert hist.tolist() == [[2, 0, 0], [1, 3, 0]]
    assert value == pytest.approx((0.5 + 0.25) / 2)


# --- the CLI ----------------------------------------------------------------------------------


def _sflam(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "sflam", "data", "partition", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)


def test_cli_prints_one_row_per_device_and_the_skew() -> None:
    # Execute
    result = _sflam("--devices", "5", "--alpha", "0.1")
    # Assert
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("data set digits: 10 classes")
    rows = [line.split() for line in lines if line.split() and line.split()[0].isdigit()]
    assert [int(r[0]) for r in rows] == [0, 1, 2, 3, 4]
    assert all(len(r) == 2 + 10 for r in rows)
    assert all(int(r[1]) == sum(int(c) for c in r[2:]) for r in rows)
    assert sum(int(r[1]) for r in rows) == int(lines[0].split(", ")[1].split()[0])
    assert "label skew" in lines[-1] and 0.3 < float(lines[-1].split()[-1]) < 1.0


def test_cli_bad_resample_exits_2_with_a_clear_message() -> None:
    # Execute
    result = _sflam("--resample", "400to500")
    # Assert
    assert result.returncode == 2
    assert "--resample expects LO-HI" in result.stderr and "'400to500'" in result.stderr
    assert "Traceback" not in result.stderr
