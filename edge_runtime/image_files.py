"""A device's shard as image files: ``folder:DIR`` (a sub-folder per class) or ``manifest:FILE.csv``.

Opening a shard lists its files and reads each one's header (Pillow decodes nothing yet); an image
is decoded when a batch draws it and kept in a cache bounded in bytes, so the device's memory does
not grow with its data set. A file that is not an image, or whose pixels turn out corrupt or
truncated when decoded, is skipped and counted (``skipped``, reported in the device's Hello); a
shard that names an unknown class, or holds no image at all, is refused before the device connects.

Class ids: ``classes.txt`` beside the data (one name per line, in id order; ``sflam data partition
--out`` writes it) decides; without it a folder numbers its sub-folders in sorted order, as the
server's ``folder:`` data sets do, and a manifest takes integer labels as ids or numbers its class
names in sorted order. Whatever the device chose, the run's plan carries its class list's digest
and a device whose list differs refuses to train (``edge_runtime.data.check_against_plan``).
Decoding is Pillow's, converted to RGB, as the server's loader does; never torch.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np

from edge_runtime.data import DataError, DecodeCache, Preprocess, Samples
from sflam_common.problems import did_you_mean

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})  # server too
CLASSES_FILE = "classes.txt"
SHOWN_PROBLEMS = 20  # manifest problems listed in one error


class ImageFiles(Samples):
    """Image files with their labels; decoded per batch (module docstring)."""

    def __init__(self, paths: list[Path], labels: np.ndarray, spec: Preprocess, *,
                 class_names: tuple[str, ...] | None, cache_bytes: int, skipped: int = 0) -> None:
        self.paths, self.labels, self.spec, self.class_names = paths, labels, spec, class_names
        self.skipped = skipped
        self.cache = DecodeCache(cache_bytes)
        self._bad: set[int] = set()

    def usable(self) -> np.ndarray:
        live = np.arange(len(self.paths))
        return live if not self._bad else np.setdiff1d(live, np.fromiter(self._bad, np.int64))

    def image(self, index: int) -> np.ndarray | None:
        """Image ``index`` as uint8 (H, W, 3); None (counted, never drawn again) when it cannot be decoded."""
        image = self.cache.get(index)
        if image is None and index not in self._bad:
            image = decode(self.paths[index])
            if image is None:
                self._bad.add(index)
                self.skipped += 1
            else:
                self.cache.put(index, image)
        return image

    def release(self) -> None:
        self.cache.clear()


def decode(path: Path) -> np.ndarray | None:
    """The file's pixels as uint8 RGB (H, W, 3), or None (logged) when it is not a readable image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as exc:
        log.warning("skipping unreadable image %s: %s", path, exc)
        return None


def readable_header(path: Path) -> bool:
    """Whether Pillow recognizes the file as an image (reads its header only)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.size[0] > 0 and image.size[1] > 0
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as exc:
        log.warning("skipping unreadable image %s: %s", path, exc)
        return False


def read_classes_file(path: Path) -> tuple[str, ...]:
    """The class names of a ``classes.txt``: one per line, blank lines ignored, no duplicates."""
    try:
        names = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the class list ({exc})") from None
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if not names or duplicates:
        raise DataError(f"{path}: " + (f"names a class twice: {', '.join(duplicates)}" if names else "names no class"))
    return names


# --- folder:DIR -------------------------------------------------------------------------------


def open_folder(root: Path, spec: Preprocess, *, cache_bytes: int) -> ImageFiles:
    """``DIR/<class>/**/<image>``; DataError when DIR is missing, has no images, or names a class
    that ``DIR/classes.txt`` does not list."""
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    listed = root / CLASSES_FILE
    names = read_classes_file(listed) if listed.is_file() else tuple(f.name for f in folders)
    unknown = [f.name for f in folders if f.name not in names]
    if unknown:
        hints = "".join(did_you_mean(name, names) for name in unknown[:3])
        raise DataError(f"{root}: sub-folder(s) {', '.join(unknown)} are not classes of {listed}{hints}; "
                        f"it lists {len(names)}: {', '.join(names[:12])}{' ...' if len(names) > 12 else ''}")
    index = {name: i for i, name in enumerate(names)}
    candidates = [(path, index[folder.name]) for folder in folders for path in sorted(folder.rglob("*"))
                  if _image_name(path)]
    if not candidates:
        raise DataError(f"{root}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in sub-folders per class "
                        "(expected DIR/<class>/<image>)")
    return _checked(candidates, spec, names, cache_bytes, str(root))


def _image_name(path: Path) -> bool:
    return not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()


def _checked(candidates: list[tuple[Path, int]], spec: Preprocess, names: tuple[str, ...] | None,
             cache_bytes: int, where: str) -> ImageFiles:
    """The candidates whose header Pillow reads; the others are skipped and counted."""
    good = [(path, label) for path, label in candidates if readable_header(path)]
    skipped = len(candidates) - len(good)
    if not good:
        raise DataError(f"{where}: none of its {len(candidates)} image files is readable")
    if skipped:
        log.warning("%s: skipped %d unreadable image file(s) of %d", where, skipped, len(candidates))
    labels = np.array([label for _, label in good], dtype=np.int64)
    return ImageFiles([path for path, _ in good], labels, spec, class_names=names, cache_bytes=cache_bytes,
                      skipped=skipped)


# --- manifest:FILE.csv ------------------------------------------------------------------------


def open_manifest(manifest: Path, spec: Preprocess, *, cache_bytes: int) -> ImageFiles:
    """Rows ``path,label`` (an optional ``path,label`` header; paths relative to the manifest's
    folder); DataError listing every bad row. A listed file that is missing or unreadable is skipped
    and counted."""
    rows = _manifest_rows(manifest)
    listed = manifest.parent / CLASSES_FILE
    names = read_classes_file(listed) if listed.is_file() else _names_from_labels([label for _, _, label in rows])
    problems, candidates = [], []
    index = {name: i for i, name in enumerate(names or ())}
    for line, path, label in rows:
        label_id = _label_id(label, index)
        if label_id is None:
            known = f"a class of {listed}" if listed.is_file() else "an integer class id"
            problems.append(f"line {line}: label {label!r} is not {known}{did_you_mean(label, names or ())}")
            continue
        candidates.append((manifest.parent / path, label_id))
    if problems:
        shown = "\n  ".join(problems[:SHOWN_PROBLEMS])
        more = f"\n  ... and {len(problems) - SHOWN_PROBLEMS} more" if len(problems) > SHOWN_PROBLEMS else ""
        raise DataError(f"{manifest}: {len(problems)} bad row(s):\n  {shown}{more}")
    present = [(path, label) for path, label in candidates if path.is_file()]
    if not present:
        raise DataError(f"{manifest}: none of the {len(candidates)} image files it lists exists")
    if len(present) < len(candidates):
        log.warning("%s: skipping %d listed file(s) that do not exist", manifest, len(candidates) - len(present))
    files = _checked(present, spec, names, cache_bytes, str(manifest))
    files.skipped += len(candidates) - len(present)
    return files


def _manifest_rows(manifest: Path) -> list[tuple[int, str, str]]:
    """(line number, path, label) per row; DataError listing every malformed row."""
    try:
        with manifest.open(newline="", encoding="utf-8") as handle:
            table = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{manifest}: cannot read the manifest ({exc})") from None
    rows, problems = [], []
    for line, row in enumerate(table, 1):
        cells = [cell.strip() for cell in row]
        if not any(cells) or (line == 1 and [c.lower() for c in cells] == ["path", "label"]):
            continue
        if len(cells) != 2 or not cells[0] or not cells[1]:
            problems.append(f"line {line}: expected path,label, got {','.join(row)!r}")
        else:
            rows.append((line, cells[0], cells[1]))
    if problems:
        raise DataError(f"{manifest}: {len(problems)} malformed row(s):\n  " + "\n  ".join(problems[:SHOWN_PROBLEMS]))
    if not rows:
        raise DataError(f"{manifest}: lists no image (expected rows of path,label)")
    return rows


def _names_from_labels(labels: list[str]) -> tuple[str, ...] | None:
    """No classes.txt: integer labels are ids (None: no names); names are numbered in sorted order."""
    if all(_integer(label) is not None for label in labels):
        return None
    names = tuple(sorted({label for label in labels if _integer(label) is None}))
    log.warning("no %s beside the manifest: classes numbered in sorted name order (%s); the run's plan "
                "checks that this is its order", CLASSES_FILE, ", ".join(names[:12]))
    return names


def _label_id(label: str, index: dict[str, int]) -> int | None:
    """A label's class id: its class name's, else the integer it spells (in range when names are known)."""
    if label in index:
        return index[label]
    value = _integer(label)
    if value is None or value < 0 or (index and value >= len(index)):
        return None
    return value


def _integer(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None
