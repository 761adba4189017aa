"""One shard per device on disk, in the layouts a device reads and ``sflam flash`` copies.

``folder``: ``dev-K/classes.txt`` (the full class list), ``dev-K/manifest.csv`` (``path,label``)
and ``dev-K/<class>/<nnnnn>.png``. ``npz``: ``dev-K.npz`` with ``images``, ``labels`` and
``class_names``, loadable with ``allow_pickle=False``. ``summary.json`` describes the partition
and every shard; it is written last, so a folder without it is an interrupted write.
"""

from __future__ import annotations

import csv
import json
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from server_runtime.data.datasets import ImageSet

logger = logging.getLogger(__name__)

FORMATS = ("folder", "npz")
SUMMARY_NAME = "summary.json"
MAX_PROGRESS_LINES = 20
# characters that break a folder name, classes.txt (one name a line) or manifest.csv
_UNSAFE_CHARS = {"/": "a '/'", "\\": "a '\\'", "\0": "a NUL", "\n": "a newline",
                 "\r": "a carriage return", ",": "a comma"}


class ShardError(ValueError):
    """Shards that cannot be written as asked; the message says which input and why."""


def device_id(index: int) -> str:
    """The id of the ``index``-th device (from 0): ``dev-0``, ``dev-1``, ..."""
    return f"dev-{index}"


def _name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a class folder, or None when it can."""
    if name in ("", ".", ".."):
        return "is not a folder name"
    if name.startswith("."):
        return "starts with '.' (a hidden folder)"
    for char, what in _UNSAFE_CHARS.items():
        if char in name:
            return f"contains {what}"
    return None


def check_class_names_for_folders(names: Sequence[str]) -> None:
    """Raise ShardError unless every class name is a distinct, safe folder and manifest entry."""
    for name in names:
        problem = _name_problem(name)
        if problem is not None:
            raise ShardError(f"class name {name!r} {problem}: it cannot be a shard folder; "
                             "rename the class or use --format npz")
    twice = sorted(name for name, count in Counter(names).items() if count > 1)
    if twice:
        raise ShardError(f"class names {twice} occur more than once: their folders would collide")


def check_out_dir(out: Path) -> None:
    """Raise ShardError unless ``out`` is a new or empty folder."""
    if out.exists() and not out.is_dir():
        raise ShardError(f"{out} exists and is not a folder; choose an empty or new folder")
    if out.is_dir() and any(out.iterdir()):
        raise ShardError(f"{out} exists and is not empty; choose an empty or new folder")


def _file_width(count: int) -> int:
    """Digits of the file numbers: 5, or more for a shard of 100,000 samples or more."""
    return max(5, len(str(count - 1)))


def _write_folder(shard: ImageSet, folder: Path) -> None:
    """PNGs per class, ``manifest.csv`` in position order and the full ``classes.txt``."""
    from PIL import Image

    folder.mkdir()
    (folder / "classes.txt").write_text("".join(f"{name}\n" for name in shard.class_names))
    width = _file_width(len(shard))
    rows = []
    for position, (image, label) in enumerate(zip(shard.images, shard.labels, strict=True)):
        name = shard.class_names[label]
        relative = f"{name}/{position:0{width}d}.png"
        (folder / name).mkdir(exist_ok=True)
        Image.fromarray(image).save(folder / relative, format="PNG")
        rows.append((relative, name))
    with open(folder / "manifest.csv", "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(("path", "label"))
        writer.writerows(rows)


def _write_npz(shard: ImageSet, path: Path) -> None:
    """``images``, ``labels`` and ``class_names`` (a unicode array: no pickle needed to load)."""
    names = np.array(list(shard.class_names), dtype=np.str_)
    np.savez(path, images=shard.images, labels=shard.labels, class_names=names)


def _progress_step(devices: int) -> int:
    """Report every k-th device so a write reports at most about MAX_PROGRESS_LINES lines."""
    return max(1, -(-devices // MAX_PROGRESS_LINES))


def write_shards(
    train: ImageSet,
    parts: Sequence[np.ndarray],
    out: Path,
    fmt: str,
    summary: dict[str, Any],
    progress: Callable[[str], None] = logger.info,
) -> Path:
    """Write ``train[parts[k]]`` as device ``dev-k``'s shard in ``out``, then ``summary.json``.

    ``summary`` holds the partition's description (data set, scheme, seed, ...); the format,
    device count, class names and one entry per shard are added. Returns the summary's path.
    Every check runs before anything is written.
    """
    if fmt not in FORMATS:
        raise ShardError(f"unknown shard format {fmt!r}; expected one of {', '.join(FORMATS)}")
    out = Path(out)
    check_out_dir(out)
    if fmt == "folder":
        check_class_names_for_folders(train.class_names)
    out.mkdir(parents=True, exist_ok=True)
    step, shards = _progress_step(len(parts)), []
    for k, indices in enumerate(parts):
        shard = train.subset(indices)
        relative = device_id(k) if fmt == "folder" else f"{device_id(k)}.npz"
        (_write_folder if fmt == "folder" else _write_npz)(shard, out / relative)
        histogram = np.bincount(shard.labels, minlength=train.num_classes)
        shards.append({"device_id": device_id(k), "path": relative, "samples": len(shard),
                       "histogram": [int(c) for c in histogram]})
        if k % step == 0 or k == len(parts) - 1:
            progress(f"wrote {device_id(k)}: {len(shard)} images")
    record = {"format": fmt, **summary, "devices": len(parts),
              "class_names": list(train.class_names), "shards": shards}
    path = out / SUMMARY_NAME
    path.write_text(json.dumps(record, indent=2) + "\n")
    progress(f"wrote {len(parts)} shards ({fmt}) to {out}; summary in {path}")
    return path
