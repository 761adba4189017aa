"""An ``npz:`` shard read image by image from its file, so its images never all sit in memory.

``np.savez`` (what ``sflam data partition --format npz`` and the simulations write) stores each
array uncompressed, as a ``.npy`` member of a zip: the images are one contiguous C-order block at
a known offset, and image ``i`` is ``H * W * C`` bytes at ``offset + i * H * W * C``. A compressed
(``np.savez_compressed``) or Fortran-order file has no such block; :func:`image_block` says so
and the shard is then loaded whole, as before.
"""

from __future__ import annotations

import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")  # a zip local file header, 30 bytes
_LOCAL_MAGIC = b"PK\x03\x04"
_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


@dataclass(frozen=True)
class ImageBlock:
    """Where an uncompressed uint8 (N, H, W, C) array starts in its file."""

    path: Path
    offset: int
    shape: tuple[int, ...]

    @property
    def image_bytes(self) -> int:
        return int(np.prod(self.shape[1:]))

    def read(self, index: int) -> np.ndarray:
        """Image ``index`` (a fresh array)."""
        with open(self.path, "rb") as handle:
            handle.seek(self.offset + index * self.image_bytes)
            raw = handle.read(self.image_bytes)
        if len(raw) != self.image_bytes:
            raise OSError(f"{self.path}: image {index} is cut short")
        return np.frombuffer(raw, np.uint8).reshape(self.shape[1:]).copy()


def image_block(path: Path, member: str = "images") -> ImageBlock | None:
    """The block of ``member`` when it is stored uncompressed as uint8 in C order, else None."""
    try:
        with zipfile.ZipFile(path) as archive:
            info = archive.getinfo(f"{member}.npy")
        if info.compress_type != zipfile.ZIP_STORED:
            return None
        with open(path, "rb") as handle:
            handle.seek(info.header_offset)
            fields = _LOCAL_HEADER.unpack(handle.read(_LOCAL_HEADER.size))
            if fields[0] != _LOCAL_MAGIC:
                return None
            handle.seek(fields[-2] + fields[-1], 1)  # the member's name and extra field
            reader = _HEADER_READERS.get(np.lib.format.read_magic(handle))
            if reader is None:
                return None
            shape, fortran, dtype = reader(handle)
            offset = handle.tell()
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, struct.error):
        return None
    if fortran or dtype != np.uint8 or len(shape) != 4:
        return None
    return ImageBlock(Path(path), offset, tuple(int(s) for s in shape))
