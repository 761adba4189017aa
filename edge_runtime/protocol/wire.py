"""Little-endian primitives for frames: a growing writer and a bounds-checked reader.

The reader checks that every declared length fits in what is left before it slices, so a
header claiming more than was received fails with ``TruncatedError`` before any allocation.
"""

from __future__ import annotations

import math
import struct

import numpy as np

from edge_runtime.protocol.errors import LimitError, MalformedError, TrailingBytesError, TruncatedError

_U8, _U16, _U32, _U64 = struct.Struct("<B"), struct.Struct("<H"), struct.Struct("<I"), struct.Struct("<Q")
_F32, _F64 = struct.Struct("<f"), struct.Struct("<d")
MAX_NDIM = 8


class Writer:
    """Appends encoded fields to a bytearray."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def u8(self, value: int) -> None:
        self._parts.append(_U8.pack(value))

    def u16(self, value: int) -> None:
        self._parts.append(_U16.pack(value))

    def u32(self, value: int) -> None:
        self._parts.append(_U32.pack(value))

    def u64(self, value: int) -> None:
        self._parts.append(_U64.pack(value))

    def f32(self, value: float) -> None:
        self._parts.append(_F32.pack(value))

    def f64(self, value: float) -> None:
        self._parts.append(_F64.pack(value))

    def raw(self, data: bytes) -> None:
        self._parts.append(bytes(data))

    def text(self, value: str, width: int = 1) -> None:
        """UTF-8 with a u8 (width 1) or u16 (width 2) byte-length prefix."""
        data = value.encode("utf-8")
        limit = 0xFF if width == 1 else 0xFFFF
        if len(data) > limit:
            raise MalformedError(f"string of {len(data)} bytes exceeds the {limit}-byte field")
        (self.u8 if width == 1 else self.u16)(len(data))
        self.raw(data)

    def shape(self, shape: tuple[int, ...]) -> None:
        """ndim u8, then each dimension as u32."""
        if len(shape) > MAX_NDIM:
            raise MalformedError(f"{len(shape)} dimensions exceed the maximum of {MAX_NDIM}")
        self.u8(len(shape))
        for dim in shape:
            self.u32(dim)

    def getvalue(self) -> bytes:
        return b"".join(self._parts)

    @property
    def parts(self) -> list[bytes]:
        """The encoded fields in order, not yet joined (``encode`` joins a frame in one copy)."""
        return self._parts


class Reader:
    """Reads fields from a buffer, refusing to read past its end."""

    def __init__(self, data: bytes | memoryview, what: str = "frame") -> None:
        self._view = memoryview(data)
        self._pos = 0
        self._what = what

    @property
    def remaining(self) -> int:
        return len(self._view) - self._pos

    def take(self, size: int, field: str) -> memoryview:
        """The next ``size`` bytes, or TruncatedError naming the field."""
        if size < 0 or size > self.remaining:
            raise TruncatedError(f"{self._what}: {field} needs {size} bytes, only {self.remaining} left")
        chunk = self._view[self._pos : self._pos + size]
        self._pos += size
        return chunk

    def u8(self, field: str) -> int:
        return _U8.unpack(self.take(1, field))[0]

    def u16(self, field: str) -> int:
        return _U16.unpack(self.take(2, field))[0]

    def u32(self, field: str) -> int:
        return _U32.unpack(self.take(4, field))[0]

    def u64(self, field: str) -> int:
        return _U64.unpack(self.take(8, field))[0]

    def f32(self, field: str) -> float:
        return _F32.unpack(self.take(4, field))[0]

    def f64(self, field: str) -> float:
        return _F64.unpack(self.take(8, field))[0]

    def text(self, field: str, width: int = 1) -> str:
        size = self.u8(field) if width == 1 else self.u16(field)
        try:
            return bytes(self.take(size, field)).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MalformedError(f"{self._what}: {field} is not valid UTF-8") from exc

    def shape(self, field: str, max_elements: int) -> tuple[int, ...]:
        """A shape whose element count is checked against ``max_elements`` before use."""
        ndim = self.u8(f"{field} ndim")
        if ndim > MAX_NDIM:
            raise MalformedError(f"{self._what}: {field} has {ndim} dimensions (max {MAX_NDIM})")
        shape = tuple(self.u32(f"{field} dim {i}") for i in range(ndim))
        count = math.prod(shape)
        if count > max_elements:
            raise LimitError(f"{self._what}: {field} declares {count} elements, limit is {max_elements}")
        return shape

    def array(self, count: int, dtype: np.dtype, field: str) -> np.ndarray:
        """``count`` values of a fixed-size dtype, copied out of the buffer (read-only)."""
        data = self.take(count * dtype.itemsize, field)
        values = np.frombuffer(data, dtype=dtype).copy()
        values.setflags(write=False)
        return values

    def finish(self) -> None:
        """TrailingBytesError unless everything was read."""
        if self.remaining:
            raise TrailingBytesError(f"{self._what}: {self.remaining} unexpected trailing bytes")
