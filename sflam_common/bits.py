"""The bit widths a quantized tensor may have on the wire: packed integer codes of 1..8 bits,
or IEEE floats of 16 and 32 bits (docs/protocol.md section 5). The one list every check uses."""

from __future__ import annotations

PACKED_BITS: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8)
FLOAT_BITS: tuple[int, ...] = (16, 32)
BIT_WIDTHS: tuple[int, ...] = PACKED_BITS + FLOAT_BITS
BIT_WIDTHS_TEXT = "1..8, 16, 32"  # how messages name the set


def is_bit_width(value: object) -> bool:
    """True for an int (not a bool) that is one of :data:`BIT_WIDTHS`."""
    return isinstance(value, int) and not isinstance(value, bool) and value in BIT_WIDTHS
