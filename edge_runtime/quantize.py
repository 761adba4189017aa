"""The reference quantizer (numpy): unbiased stochastic uniform quantization, bit-packed codes.

With q bits over a range [lo, hi]: delta = (hi - lo) / (2^q - 1) and
x -> lo + delta * floor((x - lo) / delta + u), u ~ U[0, 1), so E[Q(x)] = x and
E|Q(x) - x|^2 <= delta^2 / 4 per element. Ranges are per tensor or per token (one range per
row of the last axis). Codes for q in 1..8 are packed MSB-first into a continuous bit stream;
q = 16 sends float16 and q = 32 float32 (no quantization). The torch twin in
``server_runtime.quantize_torch`` and the exported graphs must decode to the same values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from sflam_common.bits import BIT_WIDTHS_TEXT, PACKED_BITS, is_bit_width
from sflam_common.bits import FLOAT_BITS as _FLOAT_WIDTHS

# the little-endian float each unquantized width travels as: 16 -> <f2, 32 -> <f4
FLOAT_BITS = {bits: np.dtype(f"<f{bits // 8}") for bits in _FLOAT_WIDTHS}
_PACKED_TEXT = f"{PACKED_BITS[0]}..{PACKED_BITS[-1]}"
GRANULARITIES = ("tensor", "token")
_FLOAT16_MAX = float(np.finfo(np.float16).max)
_FLOAT32_MAX = float(np.finfo(np.float32).max)


class QuantizeError(ValueError):
    """Bad input to the quantizer: unsupported bits, non-finite values, mismatched payloads."""


@dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """A tensor as it travels: bits, shape, per-group ranges and the packed payload."""

    bits: int
    shape: tuple[int, ...]
    per: str  # "tensor" | "token"
    lo: np.ndarray  # float32 (groups,); empty for 16/32 bits
    hi: np.ndarray  # float32 (groups,)
    payload: bytes

    @property
    def num_elements(self) -> int:
        """d: elements of the original tensor."""
        return math.prod(self.shape)

    @property
    def num_groups(self) -> int:
        """How many (lo, hi) ranges the tensor carries."""
        return int(self.lo.size)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, QuantizedTensor):
            return NotImplemented
        return (
            (self.bits, self.shape, self.per, self.payload) == (other.bits, other.shape, other.per, other.payload)
            and np.array_equal(self.lo, other.lo)
            and np.array_equal(self.hi, other.hi)
        )

    __hash__ = None  # type: ignore[assignment]


def payload_nbytes(num_elements: int, bits: int) -> int:
    """Bytes of the payload for ``num_elements`` values at ``bits``: ceil(d q / 8) when packed."""
    check_bits(bits)
    if bits in FLOAT_BITS:
        return num_elements * FLOAT_BITS[bits].itemsize
    return (num_elements * bits + 7) // 8


def num_groups(shape: tuple[int, ...], per: str) -> int:
    """Ranges a tensor of ``shape`` carries: 1 per tensor, one per row of the last axis per token."""
    if per not in GRANULARITIES:
        raise QuantizeError(f"per must be one of {GRANULARITIES}, got {per!r}")
    if per == "tensor" or not shape:
        return 1
    return math.prod(shape[:-1])


def check_bits(bits: int) -> int:
    """``bits`` as an int if it is a wire bit width (1..8, 16, 32), else QuantizeError."""
    if not is_bit_width(int(bits) if isinstance(bits, np.integer) else bits):
        raise QuantizeError(f"bits must be one of {BIT_WIDTHS_TEXT}, got {bits!r}")
    return int(bits)


def ranges(x: np.ndarray, per: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-group (lo, hi) as float32 arrays."""
    groups = x.reshape(num_groups(x.shape, per), -1)
    return groups.min(axis=1).astype(np.float32), groups.max(axis=1).astype(np.float32)


def step_sizes(lo: np.ndarray, hi: np.ndarray, bits: int) -> np.ndarray:
    """delta = (hi - lo) / (2^q - 1), float32."""
    return ((hi - lo) / np.float32(2**bits - 1)).astype(np.float32)


def quantize(
    x: np.ndarray,
    bits: int,
    *,
    per: str = "tensor",
    rng: np.random.Generator | None = None,
    stochastic: bool = True,
    noise: np.ndarray | None = None,
) -> QuantizedTensor:
    """Quantize and pack ``x``; ``noise`` (U[0,1), x's shape) replaces drawing from ``rng``."""
    bits = check_bits(bits)
    x = _checked_input(x, bits, per)
    shape = tuple(int(s) for s in x.shape)
    if bits in FLOAT_BITS:
        empty = np.empty(0, np.float32)
        return QuantizedTensor(bits, shape, per, empty, empty, x.astype(FLOAT_BITS[bits]).tobytes())
    lo, hi = ranges(x, per)
    check_ranges(lo, hi)
    if not stochastic:
        noise = None
    elif noise is None:
        noise = (rng or np.random.default_rng()).random(x.shape, dtype=np.float32)
    else:
        noise = _checked_noise(noise, x.shape)
    codes = encode_codes(x, lo, hi, bits, noise, per)
    return QuantizedTensor(bits, shape, per, lo, hi, pack_codes(codes, bits))


def _checked_input(x: np.ndarray, bits: int, per: str) -> np.ndarray:
    """``x`` as float32, or QuantizeError for what cannot be quantized."""
    num_groups(np.shape(x), per)  # validates ``per`` for every bit width
    values = np.asarray(x)
    if values.size == 0:
        raise QuantizeError(f"cannot quantize an empty tensor of shape {values.shape}")
    if not np.isfinite(values).all():
        raise QuantizeError("cannot quantize a tensor with NaN or inf values")
    limit = _FLOAT16_MAX if bits == 16 else _FLOAT32_MAX
    if np.abs(values).max() > limit:
        raise QuantizeError(f"values beyond +-{limit:.6g} cannot travel at {bits} bits")
    return values.astype(np.float32, copy=False)


def _checked_noise(noise: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Caller-supplied U[0,1) noise of exactly ``shape``."""
    noise = np.asarray(noise, dtype=np.float32)
    if noise.shape != shape:
        raise QuantizeError(f"noise must have the shape of x {shape}, got {noise.shape}")
    if noise.size and not (noise.min() >= 0 and noise.max() < 1):
        raise QuantizeError("noise must lie in [0, 1)")
    return noise


def check_ranges(lo: np.ndarray, hi: np.ndarray) -> None:
    """QuantizeError unless every range is finite, ordered and its width fits float32."""
    with np.errstate(over="ignore", invalid="ignore"):
        width = hi.astype(np.float32) - lo.astype(np.float32)
    if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
        raise QuantizeError("quantization ranges must be finite")
    if (width < 0).any():
        raise QuantizeError("a quantization range has lo > hi")
    if not np.isfinite(width).all():
        raise QuantizeError("a quantization range is wider than float32 can represent (hi - lo overflows)")


def encode_codes(
    x: np.ndarray, lo: np.ndarray, hi: np.ndarray, bits: int, noise: np.ndarray | None, per: str = "tensor"
) -> np.ndarray:
    """Integer codes in [0, 2^q - 1] (uint8); ``noise`` None means round to nearest.

    floor((x - lo) / delta + u), computed in place in one float32 buffer (a range of zero
    width gives code 0, as x - lo is then 0).
    """
    groups = num_groups(x.shape, per)
    delta = step_sizes(lo, hi, bits)[:, None]
    scaled = np.subtract(x.reshape(groups, -1), lo[:, None], dtype=np.float32)
    scaled /= np.where(delta > 0, delta, np.float32(1))
    scaled += np.float32(0.5) if noise is None else np.asarray(noise, np.float32).reshape(groups, -1)
    np.floor(scaled, out=scaled)
    np.clip(scaled, 0, 2**bits - 1, out=scaled)
    return scaled.astype(np.uint8).reshape(-1)


def pack_codes(codes: np.ndarray, bits: int) -> bytes:
    """uint8 codes -> MSB-first bit stream of ``bits`` per code, zero-padded to a byte.

    Loops run over the (at most eight) code positions within a byte or word, never over
    elements: q in {1, 2, 4} packs 8/q codes per byte in uint8; other q pack eight codes
    into q bytes through a uint64 word.
    """
    if bits not in PACKED_BITS:
        raise QuantizeError(f"only {_PACKED_TEXT}-bit codes are packed, got {bits}")
    codes = np.ascontiguousarray(codes, dtype=np.uint8).reshape(-1)
    if codes.size and int(codes.max()) >= 2**bits:
        raise QuantizeError(f"a code of {int(codes.max())} does not fit in {bits} bits")
    if bits == 8:
        return codes.tobytes()
    if bits == 1:
        return np.packbits(codes).tobytes()  # the same MSB-first layout, in C
    per_word, word_type = (8 // bits, np.uint8) if 8 % bits == 0 else (8, np.uint64)
    matrix = _padded(codes, per_word, word_type)
    words = np.zeros(matrix.shape[0], dtype=word_type)
    for i in range(per_word):
        words |= matrix[:, i] << word_type(bits * (per_word - 1 - i))
    if word_type is np.uint8:
        return words.tobytes()
    stream = np.empty((words.size, bits), dtype=np.uint8)
    for j in range(bits):
        stream[:, j] = (words >> np.uint64(8 * (bits - 1 - j))).astype(np.uint8)
    return stream.reshape(-1)[: payload_nbytes(codes.size, bits)].tobytes()


def unpack_codes(payload: bytes, bits: int, count: int) -> np.ndarray:
    """The inverse of :func:`pack_codes`: ``count`` uint8 codes."""
    if bits not in PACKED_BITS:
        raise QuantizeError(f"only {_PACKED_TEXT}-bit codes are packed, got {bits}")
    if len(payload) != payload_nbytes(count, bits):
        raise QuantizeError(f"{count} codes of {bits} bits need {payload_nbytes(count, bits)} bytes, got {len(payload)}")
    raw = np.frombuffer(payload, dtype=np.uint8)
    if bits == 8:
        return raw.copy()
    if bits == 1:
        return np.unpackbits(raw, count=count)
    per_word, word_type = (8 // bits, np.uint8) if 8 % bits == 0 else (8, np.uint64)
    if word_type is np.uint8:
        words = raw
    else:
        stream = _padded(raw, bits, np.uint64)
        words = np.zeros(stream.shape[0], dtype=np.uint64)
        for j in range(bits):
            words |= stream[:, j] << np.uint64(8 * (bits - 1 - j))
    mask = word_type(2**bits - 1)
    codes = np.empty((words.size, per_word), dtype=np.uint8)
    for i in range(per_word):
        codes[:, i] = ((words >> word_type(bits * (per_word - 1 - i))) & mask).astype(np.uint8)
    return codes.reshape(-1)[:count]


def _padded(values: np.ndarray, width: int, dtype: type) -> np.ndarray:
    """``values`` zero-padded to a multiple of ``width`` and viewed as rows of ``width``."""
    padded = np.zeros(-(-values.size // width) * width, dtype=dtype)
    padded[: values.size] = values
    return padded.reshape(-1, width)


def check_consistent(q: QuantizedTensor) -> None:
    """QuantizeError unless bits, shape, ranges and payload size agree with each other."""
    bits = check_bits(q.bits)
    groups = num_groups(q.shape, q.per)  # also validates the granularity
    expected_groups = 0 if bits in FLOAT_BITS else groups
    if q.lo.shape != (expected_groups,) or q.hi.shape != (expected_groups,):
        raise QuantizeError(
            f"shape {q.shape} per {q.per} at {bits} bits needs {expected_groups} ranges, "
            f"got lo {q.lo.shape} hi {q.hi.shape}"
        )
    if len(q.payload) != payload_nbytes(q.num_elements, bits):
        raise QuantizeError(
            f"{q.num_elements} values at {bits} bits need {payload_nbytes(q.num_elements, bits)} "
            f"payload bytes, got {len(q.payload)}"
        )
    if q.lo.dtype != np.float32 or q.hi.dtype != np.float32:
        raise QuantizeError(f"ranges must be float32, got {q.lo.dtype} and {q.hi.dtype}")
    check_ranges(q.lo, q.hi)


def dequantize(q: QuantizedTensor) -> np.ndarray:
    """The float32 values a quantized tensor stands for: lo + delta * code."""
    check_consistent(q)
    bits = q.bits
    if bits in FLOAT_BITS:
        return np.frombuffer(q.payload, dtype=FLOAT_BITS[bits]).astype(np.float32).reshape(q.shape)
    codes = unpack_codes(q.payload, bits, q.num_elements).reshape(q.num_groups, -1)
    return decode_codes(codes, q.lo, q.hi, bits).reshape(q.shape)


def decode_codes(codes: np.ndarray, lo: np.ndarray, hi: np.ndarray, bits: int) -> np.ndarray:
    """Grouped codes (groups, n) -> float32 values; the formula every runtime must match.

    lo + code * delta in float32, as a multiply then an add (no fused multiply-add).
    """
    values = codes.astype(np.float32)
    values *= step_sizes(lo, hi, bits)[:, None]
    values += lo[:, None]
    return values
