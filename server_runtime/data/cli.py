"""``sflam data partition``: split a data set across devices, show the labels each holds and,
with ``--out``, write one shard per device."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import numpy as np

from server_runtime.data.datasets import load_dataset
from server_runtime.data.partition import PartitionError, label_histogram, partition, skew
from server_runtime.data.shards import (
    ShardError,
    check_class_names_for_folders,
    check_out_dir,
    write_shards,
)

_RANGE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")


def parse_size_range(text: str) -> tuple[int, int]:
    """``"400-500"`` -> (400, 500), with 1 <= LO <= HI."""
    match = _RANGE.match(text)
    if match is None:
        raise PartitionError(
            f"--resample expects LO-HI, two whole numbers such as 400-500; got {text!r}"
        )
    lo, hi = int(match.group(1)), int(match.group(2))
    if lo < 1 or lo > hi:
        raise PartitionError(f"--resample needs 1 <= LO <= HI, got {lo}-{hi}")
    return lo, hi


def _scheme_text(args: argparse.Namespace) -> str:
    if args.scheme == "dirichlet":
        return f"dirichlet (alpha {args.alpha:g})"
    if args.scheme == "shards":
        return f"shards ({args.shards_per_device} per device)"
    return "iid"


def _device_rows(hist: np.ndarray) -> list[str]:
    """One line per device: its sample count and its per-class counts in fixed-width columns."""
    width = max(len(str(int(hist.max(initial=0)))), len(str(hist.shape[1] - 1)))
    header = " ".join(f"{k:>{width}}" for k in range(hist.shape[1]))
    rows = [f"{'device':>6}  {'samples':>7}  {header}"]
    for device, counts in enumerate(hist):
        cells = " ".join(f"{int(c):>{width}}" for c in counts)
        rows.append(f"{device:>6}  {int(counts.sum()):>7}  {cells}")
    return rows


def _summary(args: argparse.Namespace, name: str, resample: tuple[int, int] | None,
             value: float) -> dict[str, Any]:
    """The partition's description that ``summary.json`` records next to the shards."""
    return {"dataset": args.dataset, "name": name, "scheme": args.scheme, "alpha": args.alpha,
            "shards_per_device": args.shards_per_device, "seed": args.seed,
            "resample": list(resample) if resample else None, "skew": value}


def _check_out(args: argparse.Namespace) -> None:
    """``--format`` needs ``--out``; ``--out`` must be a new or empty folder (checked up front)."""
    if args.out is None:
        if args.format is not None:
            raise ShardError("--format needs --out DIR (the folder to write the shards to)")
        return
    check_out_dir(Path(args.out))


def cmd_partition(args: argparse.Namespace) -> int:
    """Partition the train split of ``--dataset``, print per-device label counts and skew, and
    with ``--out`` write every device's shard."""
    resample = parse_size_range(args.resample) if args.resample else None
    _check_out(args)
    data = load_dataset(args.dataset, seed=args.seed)
    train = data.train
    fmt = args.format or "folder"
    if args.out is not None and fmt == "folder":
        check_class_names_for_folders(train.class_names)
    height, width = train.images.shape[1:3]
    print(
        f"data set {data.name}: {train.num_classes} classes, {len(train)} train / "
        f"{len(data.test)} test images of {height}x{width}"
    )
    parts = partition(
        train.labels,
        args.devices,
        args.scheme,
        seed=args.seed,
        alpha=args.alpha,
        shards_per_device=args.shards_per_device,
        resample=resample,
    )
    resampled = f", resampled to {resample[0]}-{resample[1]} per device" if resample else ""
    print(f"scheme {_scheme_text(args)}, {args.devices} devices, seed {args.seed}{resampled}")
    if any(name != str(i) for i, name in enumerate(train.class_names)):
        print(f"classes: {', '.join(f'{i}={name}' for i, name in enumerate(train.class_names))}")
    hist = label_histogram(train.labels, parts, train.num_classes)
    print("\n".join(_device_rows(hist)))
    value = skew(train.labels, parts, train.num_classes)
    print(f"label skew (mean total-variation distance to the global label mix): {value:.3f}")
    if args.out is not None:
        summary = _summary(args, data.name, resample, value)
        write_shards(train, parts, Path(args.out), fmt, summary, progress=print)
    return 0
