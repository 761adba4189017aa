"""The rules a message must satisfy, applied by the encoder (before writing) and the decoder
(after parsing), so a sender cannot write what a receiver would refuse.

Each ``check_*`` raises ``MalformedError`` naming the field; size limits are the decoder's job
and are enforced earlier, before anything is allocated.
"""

from __future__ import annotations

import math

import numpy as np

from edge_runtime.protocol import messages as m
from edge_runtime.protocol.errors import MalformedError, TopicError
from edge_runtime.protocol.topics import check_id
from edge_runtime.protocol.wire import MAX_NDIM
from edge_runtime.quantize import FLOAT_BITS, QuantizedTensor, QuantizeError, check_consistent
from sflam_common.bits import BIT_WIDTHS_TEXT, is_bit_width

U32_MAX = 2**32 - 1
LABEL_DTYPES = ("uint8", "uint16", "int32", "int64")
_FLOAT_DTYPES = ("float16", "float32", "float64")


def _fail(field: str, problem: str) -> MalformedError:
    return MalformedError(f"{field}: {problem}")


def check_finite(value: float, field: str, *, minimum: float | None = None) -> None:
    """A finite number (>= ``minimum`` when given)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or not math.isfinite(value):
        raise _fail(field, f"must be a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise _fail(field, f"must be >= {minimum}, got {value!r}")


def check_uint(value: int, field: str, *, minimum: int = 0, maximum: int = U32_MAX) -> None:
    """An integer in [minimum, maximum]."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not minimum <= value <= maximum:
        raise _fail(field, f"must be an integer in [{minimum}, {maximum}], got {value!r}")


def check_flag(value: bool, field: str) -> None:
    """A real bool (the wire carries 0 or 1; anything else would change meaning in transit)."""
    if not isinstance(value, (bool, np.bool_)):
        raise _fail(field, f"must be True or False, got {value!r}")


def check_envelope(env: m.Envelope) -> None:
    """Ids usable as topic levels, round/step as u32, a finite timestamp."""
    try:
        check_id(env.run_id, "run_id")
        check_id(env.device_id, "device_id")
    except TopicError as exc:
        raise MalformedError(f"envelope {exc}") from None
    check_uint(env.round, "round")
    check_uint(env.step, "step")
    check_finite(env.created_at, "created_at")


def check_tensor(t: m.Tensor, field: str) -> None:
    """Known dtype, shape within the wire's range, data size matching, floats finite."""
    if t.dtype not in m.DTYPE_CODES:
        raise _fail(field, f"dtype {t.dtype!r} cannot travel")
    _check_shape(t.shape, field)
    expected = math.prod(t.shape) * np.dtype(t.dtype).itemsize
    if not isinstance(t.data, bytes) or len(t.data) != expected:
        raise _fail(field, f"{t.dtype} {t.shape} needs {expected} bytes of data")
    if t.dtype in _FLOAT_DTYPES and not np.isfinite(t.to_numpy()).all():
        raise _fail(field, "contains NaN or infinite values")


def check_qtensor(q: QuantizedTensor, field: str) -> None:
    """Consistent bits/shape/ranges/payload, not empty, float payloads finite."""
    if not is_bit_width(q.bits):
        raise _fail(field, f"{q.bits!r} bits is not one of {BIT_WIDTHS_TEXT}")
    _check_shape(q.shape, field)
    if q.num_elements == 0:
        raise _fail(field, f"empty quantized tensor of shape {q.shape}")
    try:
        check_consistent(q)
    except QuantizeError as exc:
        raise _fail(field, str(exc)) from None
    if q.bits in FLOAT_BITS:
        values = np.frombuffer(q.payload, dtype=FLOAT_BITS[q.bits])
        if not np.isfinite(values).all():
            raise _fail(field, "contains NaN or infinite values")


def _check_shape(shape: tuple[int, ...], field: str) -> None:
    if not isinstance(shape, tuple) or len(shape) > MAX_NDIM:
        raise _fail(field, f"shape must be a tuple of at most {MAX_NDIM} dimensions, got {shape!r}")
    for dim in shape:
        check_uint(dim, f"{field} dimension")


def check_weights(weights: m.Weights, field: str = "weights") -> None:
    """Uniquely named, valid tensors."""
    names = [name for name, _ in weights]
    if len(set(names)) != len(names):
        duplicates = sorted({n for n in names if names.count(n) > 1})
        raise _fail(field, f"names appear twice: {', '.join(duplicates)}")
    for name, tensor in weights:
        if not isinstance(name, str) or not name:
            raise _fail(field, f"a tensor name must be a non-empty string, got {name!r}")
        check_tensor(tensor, f"{field} {name!r}")


def check_bits(bits: int, field: str) -> None:
    """One of the quantizer's widths."""
    if not is_bit_width(bits):
        raise _fail(field, f"{bits!r} is not one of {BIT_WIDTHS_TEXT}")


def check_allocation(a: m.Allocation) -> None:
    """Ids, bit widths and non-negative finite power and bandwidth."""
    field = f"allocation {a.device_id!r}"
    try:
        check_id(a.device_id, "device_id")
    except TopicError as exc:
        raise MalformedError(f"{field}: {exc}") from None
    check_bits(a.bits_up, f"{field} bits_up")
    check_bits(a.bits_down, f"{field} bits_down")
    check_finite(a.tx_power_w, f"{field} tx_power_w", minimum=0)
    check_finite(a.bandwidth_hz, f"{field} bandwidth_hz", minimum=0)
    check_flag(a.per_token, f"{field} per_token")


def check_telemetry(t: m.Telemetry) -> None:
    """Non-negative finite times and energy, a known energy source."""
    for name in ("compute_time_s", "uplink_time_s", "energy_j"):
        check_finite(getattr(t, name), f"telemetry {name}", minimum=0)
    if t.energy_source not in m.ENERGY_SOURCES:
        raise _fail("telemetry energy_source", f"must be one of {m.ENERGY_SOURCES}, got {t.energy_source!r}")
    check_uint(t.bytes_sent, "telemetry bytes_sent", maximum=2**64 - 1)
    check_uint(t.bytes_received, "telemetry bytes_received", maximum=2**64 - 1)
    check_uint(t.steps, "telemetry steps")


def check_labels(labels: m.Tensor, batch: int) -> None:
    """A 1-D integer tensor with one label per sample."""
    check_tensor(labels, "labels")
    if labels.dtype not in LABEL_DTYPES or len(labels.shape) != 1:
        raise _fail("labels", f"must be a 1-D integer tensor, got {labels.dtype} {labels.shape}")
    if labels.shape[0] != batch:
        raise _fail("labels", f"{labels.shape[0]} labels for a batch of {batch} activations")
    if labels.dtype in ("int32", "int64") and labels.num_elements and labels.to_numpy().min() < 0:
        raise _fail("labels", "negative class index")
