"""Frames: ``encode(message) -> bytes`` and ``decode(data) -> message``, nothing else.

Frame layout (little-endian; docs/protocol.md has the full byte map)::

    magic "SFLM" | version u8 | type u8 | header_len u16 | body_len u32 | header | body
        | signature block (scheme u8, then for Ed25519: key_id text8, signature 64 bytes) | crc32 u32

A receiver holding a :class:`~edge_runtime.protocol.signing.Keyring` verifies the signature right
after the CRC, before the envelope or body is parsed (``signing.py``).

Each message type has a paired ``_put_x`` / ``_get_x`` and its rules (``checks.py``), applied
on both sides. Decoding validates every declared size against what was received and against
:class:`Limits` before allocating.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edge_runtime.protocol import messages as m
from edge_runtime.protocol.checks import (
    check_allocation,
    check_envelope,
    check_finite,
    check_flag,
    check_labels,
    check_qtensor,
    check_telemetry,
    check_uint,
    check_weights,
)
from edge_runtime.protocol.errors import (
    BadMagicError,
    IntegrityError,
    LimitError,
    MalformedError,
    TrailingBytesError,
    TruncatedError,
    UnknownTypeError,
    VersionError,
)
from edge_runtime.protocol.signing import Keyring, SigningKey, check_signature, read_signature_block, signature_block
from edge_runtime.protocol.wire import Reader, Writer
from edge_runtime.quantize import FLOAT_BITS, GRANULARITIES, QuantizedTensor, num_groups, payload_nbytes
from sflam_common.bits import BIT_WIDTHS_TEXT, is_bit_width

MAGIC = b"SFLM"
VERSION = 4
_PREFIX = struct.Struct("<4sBBHI")  # magic, version, type, header_len, body_len
PREFIX_SIZE = _PREFIX.size
CRC_SIZE = 4
_CODE_TO_DTYPE = {code: name for name, code in m.DTYPE_CODES.items()}
_OPTIMIZER_NAMES = {code: name for name, code in m.OPTIMIZER_CODES.items()}


@dataclass(frozen=True)
class Limits:
    """What a decoder accepts at most; sizes are checked before anything is allocated."""

    max_frame_bytes: int = 256 * 1024 * 1024
    max_elements: int = 64 * 1024 * 1024
    max_tensors: int = 4096
    max_allocations: int = 4096
    max_chunks: int = 65536


DEFAULT_LIMITS = Limits()


# --- parts ------------------------------------------------------------------------------------


def _put_envelope(w: Writer, env: m.Envelope) -> None:
    w.text(env.run_id)
    w.text(env.device_id)
    w.u32(env.round)
    w.u32(env.step)
    w.f64(env.created_at)


def _get_envelope(r: Reader) -> m.Envelope:
    run_id, device_id = r.text("run_id"), r.text("device_id")
    return m.Envelope(run_id, r.u32("round"), device_id, r.u32("step"), r.f64("created_at"))


def _put_tensor(w: Writer, t: m.Tensor) -> None:
    w.u8(m.DTYPE_CODES[t.dtype])
    w.shape(t.shape)
    w.u32(len(t.data))
    w.raw(t.data)


def _get_tensor(r: Reader, limits: Limits, field: str) -> m.Tensor:
    code = r.u8(f"{field} dtype")
    if code not in _CODE_TO_DTYPE:
        raise MalformedError(f"{field}: unknown dtype code {code}")
    dtype = _CODE_TO_DTYPE[code]
    shape = r.shape(field, limits.max_elements)
    size = r.u32(f"{field} size")
    expected = math.prod(shape) * np.dtype(dtype).itemsize
    if size != expected:
        raise MalformedError(f"{field}: {dtype} {shape} needs {expected} bytes, header says {size}")
    return m.Tensor(dtype, shape, bytes(r.take(size, f"{field} data")))


def _put_qtensor(w: Writer, q: QuantizedTensor) -> None:
    w.u8(q.bits)
    w.u8(GRANULARITIES.index(q.per))
    w.shape(q.shape)
    w.u32(q.num_groups)
    w.raw(np.asarray(q.lo, "<f4").tobytes())
    w.raw(np.asarray(q.hi, "<f4").tobytes())
    w.u32(len(q.payload))
    w.raw(q.payload)


def _get_qtensor(r: Reader, limits: Limits, field: str) -> QuantizedTensor:
    bits, per_code = r.u8(f"{field} bits"), r.u8(f"{field} granularity")
    if not is_bit_width(bits):
        raise MalformedError(f"{field}: {bits} bits is not one of {BIT_WIDTHS_TEXT}")
    if per_code >= len(GRANULARITIES):
        raise MalformedError(f"{field}: unknown granularity code {per_code}")
    per = GRANULARITIES[per_code]
    shape = r.shape(field, limits.max_elements)
    groups = r.u32(f"{field} groups")
    expected_groups = 0 if bits in FLOAT_BITS else num_groups(shape, per)
    if groups != expected_groups:
        raise MalformedError(f"{field}: {shape} per {per} at {bits} bits has {expected_groups} ranges, header says {groups}")
    lo = r.array(groups, np.dtype("<f4"), f"{field} lo").astype(np.float32)
    hi = r.array(groups, np.dtype("<f4"), f"{field} hi").astype(np.float32)
    _check_ranges(lo, hi, field)
    size, expected = r.u32(f"{field} payload size"), payload_nbytes(math.prod(shape), bits)
    if size != expected:
        raise MalformedError(f"{field}: {math.prod(shape)} values at {bits} bits need {expected} bytes, header says {size}")
    payload = bytes(r.take(size, f"{field} payload"))
    return QuantizedTensor(bits, shape, per, lo, hi, payload)


def _check_ranges(lo: np.ndarray, hi: np.ndarray, field: str) -> None:
    if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
        raise MalformedError(f"{field}: NaN or infinite quantization range")
    if (lo > hi).any():
        raise MalformedError(f"{field}: a range has lo > hi")
    with np.errstate(over="ignore"):
        if not np.isfinite(hi - lo).all():
            raise MalformedError(f"{field}: a range is wider than float32 can represent")


def _put_weights(w: Writer, weights: m.Weights) -> None:
    w.u16(len(weights))
    for name, tensor in weights:
        w.text(name, width=2)
        _put_tensor(w, tensor)


def _get_weights(r: Reader, limits: Limits) -> m.Weights:
    count = r.u16("weights count")
    if count > limits.max_tensors:
        raise LimitError(f"{count} weight tensors exceed the limit of {limits.max_tensors}")
    items, total = [], 0
    for index in range(count):
        name = r.text(f"weight {index} name", width=2)
        tensor = _get_tensor(r, limits, f"weight {name!r}")
        total += tensor.num_elements
        if total > limits.max_elements:
            raise LimitError(f"weights exceed {limits.max_elements} elements in all")
        items.append((name, tensor))
    return tuple(items)


def _flag(r: Reader, field: str) -> bool:
    value = r.u8(field)
    if value > 1:
        raise MalformedError(f"{field} must be 0 or 1, got {value}")
    return bool(value)


# --- message bodies: _put_x writes, _get_x parses, _check_x states the rules (both sides) ------


def _put_hello(w: Writer, msg: m.Hello) -> None:
    w.text(msg.profile)
    w.text(msg.backend)
    w.text(msg.software_version)
    w.u32(msg.num_samples)
    w.u32(msg.skipped_samples)
    w.u8(int(msg.heartbeat))
    w.u8(int(msg.last_telemetry is not None))
    if msg.last_telemetry is not None:
        _put_telemetry(w, msg.last_telemetry)


def _get_hello(r: Reader, env: m.Envelope, limits: Limits) -> m.Hello:
    profile, backend, software = r.text("profile"), r.text("backend"), r.text("software_version")
    samples, skipped, heartbeat = r.u32("num_samples"), r.u32("skipped_samples"), _flag(r, "heartbeat")
    telemetry = _get_telemetry(r) if _flag(r, "has_telemetry") else None
    return m.Hello(env, profile, backend, software, samples, heartbeat, telemetry, skipped)


def _check_hello(msg: m.Hello) -> None:
    check_uint(msg.num_samples, "num_samples")
    check_uint(msg.skipped_samples, "skipped_samples")
    check_flag(msg.heartbeat, "heartbeat")
    if msg.last_telemetry is not None:
        check_telemetry(msg.last_telemetry)


def _put_telemetry(w: Writer, t: m.Telemetry) -> None:
    for value in (t.compute_time_s, t.uplink_time_s, t.energy_j):
        w.f64(value)
    w.u8(m.ENERGY_SOURCES.index(t.energy_source))
    w.u64(t.bytes_sent)
    w.u64(t.bytes_received)
    w.u32(t.steps)


def _get_telemetry(r: Reader) -> m.Telemetry:
    times = [r.f64(name) for name in ("compute_time_s", "uplink_time_s", "energy_j")]
    source = r.u8("energy_source")
    if source >= len(m.ENERGY_SOURCES):
        raise MalformedError(f"unknown energy source code {source}")
    return m.Telemetry(*times, m.ENERGY_SOURCES[source], r.u64("bytes_sent"), r.u64("bytes_received"), r.u32("steps"))


def _put_status(w: Writer, msg: m.Status) -> None:
    w.u8(int(msg.online))
    w.text(msg.reason, width=2)


def _get_status(r: Reader, env: m.Envelope, limits: Limits) -> m.Status:
    return m.Status(env, _flag(r, "online"), r.text("reason", width=2))


def _check_status(msg: m.Status) -> None:
    check_flag(msg.online, "online")


def _put_plan(w: Writer, msg: m.RoundPlan) -> None:
    w.u32(msg.model_version)
    w.f64(msg.deadline_s)
    w.u16(msg.local_epochs)
    w.u32(msg.batch_size)
    w.f64(msg.lr)
    w.u8(m.OPTIMIZER_CODES[msg.optimizer])
    w.f64(msg.momentum)
    w.f64(msg.weight_decay)
    w.u16(msg.num_classes)
    w.raw(msg.classes_digest)
    w.u8(msg.crop_padding)
    w.u8(int(msg.hflip))
    w.u16(len(msg.allocations))
    for a in msg.allocations:
        w.text(a.device_id)
        w.u8(a.bits_up)
        w.u8(a.bits_down)
        w.f64(a.tx_power_w)
        w.f64(a.bandwidth_hz)
        w.u8(int(a.per_token))


def _get_plan(r: Reader, env: m.Envelope, limits: Limits) -> m.RoundPlan:
    version, deadline = r.u32("model_version"), r.f64("deadline_s")
    epochs, batch, lr = r.u16("local_epochs"), r.u32("batch_size"), r.f64("lr")
    code = r.u8("optimizer")
    optimizer = _OPTIMIZER_NAMES.get(code)
    if optimizer is None:
        raise MalformedError(f"optimizer code {code} is undefined (known: "
                             f"{', '.join(f'{c} {n}' for c, n in _OPTIMIZER_NAMES.items())})")
    momentum, weight_decay = r.f64("momentum"), r.f64("weight_decay")
    num_classes, digest = r.u16("num_classes"), bytes(r.take(m.CLASSES_DIGEST_SIZE, "classes_digest"))
    crop_padding, hflip = r.u8("crop_padding"), _flag(r, "hflip")
    count = r.u16("allocation count")
    if count > limits.max_allocations:
        raise LimitError(f"{count} allocations exceed the limit of {limits.max_allocations}")
    allocations = tuple(_get_allocation(r) for _ in range(count))
    return m.RoundPlan(env, version, deadline, epochs, batch, lr, allocations, optimizer, momentum, weight_decay,
                       num_classes, digest, crop_padding, hflip)


def _get_allocation(r: Reader) -> m.Allocation:
    device, up, down = r.text("allocation device_id"), r.u8("bits_up"), r.u8("bits_down")
    power, bandwidth = r.f64("tx_power_w"), r.f64("bandwidth_hz")
    return m.Allocation(device, up, down, power, bandwidth, _flag(r, "per_token"))


def _check_plan(msg: m.RoundPlan) -> None:
    check_uint(msg.model_version, "model_version")
    check_finite(msg.deadline_s, "deadline_s")
    if msg.deadline_s <= 0:
        raise MalformedError(f"deadline_s must be > 0 seconds, got {msg.deadline_s}")
    check_uint(msg.local_epochs, "local_epochs", minimum=1, maximum=0xFFFF)
    check_uint(msg.batch_size, "batch_size", minimum=1)
    check_finite(msg.lr, "lr", minimum=0)
    if msg.optimizer not in m.OPTIMIZER_CODES:
        raise MalformedError(f"optimizer must be one of {', '.join(m.OPTIMIZER_CODES)}, got {msg.optimizer!r}")
    check_finite(msg.momentum, "momentum", minimum=0)
    if msg.momentum >= 1:
        raise MalformedError(f"momentum must be < 1, got {msg.momentum}")
    check_finite(msg.weight_decay, "weight_decay", minimum=0)
    _check_plan_data(msg)
    devices = [a.device_id for a in msg.allocations]
    if len(set(devices)) != len(devices):
        raise MalformedError("a device appears twice in the plan's allocations")
    for allocation in msg.allocations:
        check_allocation(allocation)


def _check_plan_data(msg: m.RoundPlan) -> None:
    """The class list the plan states and the augmentation it asks for."""
    check_uint(msg.num_classes, "num_classes", maximum=0xFFFF)
    digest = msg.classes_digest
    if not isinstance(digest, bytes) or len(digest) != m.CLASSES_DIGEST_SIZE:  # raw bytes: the wire has no length for it
        shown = f"{len(digest)} bytes" if isinstance(digest, bytes) else repr(digest)
        raise MalformedError(f"classes_digest: must be {m.CLASSES_DIGEST_SIZE} bytes, got {shown}")
    check_uint(msg.crop_padding, "crop_padding", maximum=m.MAX_CROP_PADDING)
    check_flag(msg.hflip, "hflip")


def _put_model(w: Writer, msg: m.ModelWeights) -> None:
    w.u32(msg.version)
    _put_weights(w, msg.weights)


def _get_model(r: Reader, env: m.Envelope, limits: Limits) -> m.ModelWeights:
    return m.ModelWeights(env, r.u32("version"), _get_weights(r, limits))


def _check_model(msg: m.ModelWeights) -> None:
    check_uint(msg.version, "version")
    check_weights(msg.weights)


def _put_activations(w: Writer, msg: m.Activations) -> None:
    _put_qtensor(w, msg.tensor)
    _put_tensor(w, msg.labels)


def _get_activations(r: Reader, env: m.Envelope, limits: Limits) -> m.Activations:
    return m.Activations(env, _get_qtensor(r, limits, "activations"), _get_tensor(r, limits, "labels"))


def _check_activations(msg: m.Activations) -> None:
    check_qtensor(msg.tensor, "activations")
    if not msg.tensor.shape:
        raise MalformedError("activations need a batch dimension")
    check_labels(msg.labels, msg.tensor.shape[0])


def _put_gradient(w: Writer, msg: m.Gradient) -> None:
    _put_qtensor(w, msg.tensor)
    w.f64(msg.loss)


def _get_gradient(r: Reader, env: m.Envelope, limits: Limits) -> m.Gradient:
    return m.Gradient(env, _get_qtensor(r, limits, "gradient"), r.f64("loss"))


def _check_gradient(msg: m.Gradient) -> None:
    check_qtensor(msg.tensor, "gradient")
    check_finite(msg.loss, "loss")


def _put_update(w: Writer, msg: m.RoundUpdate) -> None:
    w.u32(msg.model_version)
    w.u32(msg.num_samples)
    _put_weights(w, msg.weights)
    _put_telemetry(w, msg.telemetry)


def _get_update(r: Reader, env: m.Envelope, limits: Limits) -> m.RoundUpdate:
    version, samples, weights = r.u32("model_version"), r.u32("num_samples"), _get_weights(r, limits)
    return m.RoundUpdate(env, version, samples, weights, _get_telemetry(r))


def _check_update(msg: m.RoundUpdate) -> None:
    check_uint(msg.model_version, "model_version")
    check_uint(msg.num_samples, "num_samples")
    check_weights(msg.weights)
    check_telemetry(msg.telemetry)


def _put_error(w: Writer, msg: m.ErrorReport) -> None:
    w.text(msg.code)
    w.text(msg.detail, width=2)


def _get_error(r: Reader, env: m.Envelope, limits: Limits) -> m.ErrorReport:
    return m.ErrorReport(env, r.text("code"), r.text("detail", width=2))


def _put_chunk(w: Writer, msg: m.Chunk) -> None:
    w.u64(msg.message_id)
    w.u32(msg.index)
    w.u32(msg.count)
    w.u32(msg.total_size)
    w.u32(len(msg.data))
    w.raw(msg.data)


def _get_chunk(r: Reader, env: m.Envelope, limits: Limits) -> m.Chunk:
    message_id, index, count, total = r.u64("message_id"), r.u32("index"), r.u32("count"), r.u32("total_size")
    if total > limits.max_frame_bytes:
        raise LimitError(f"chunked message of {total} bytes exceeds the limit of {limits.max_frame_bytes}")
    if count > limits.max_chunks:
        raise LimitError(f"a set of {count} chunks exceeds the limit of {limits.max_chunks}")
    size = r.u32("chunk size")
    return m.Chunk(env, message_id, index, count, total, bytes(r.take(size, "chunk data")))


def check_chunk(msg: m.Chunk) -> None:
    """A non-empty piece that fits its set: index < count <= total size."""
    check_uint(msg.message_id, "message_id", maximum=2**64 - 1)
    check_uint(msg.count, "chunk count", minimum=1)
    check_uint(msg.index, "chunk index", maximum=msg.count - 1)
    check_uint(msg.total_size, "chunk total_size", minimum=msg.count)
    if not isinstance(msg.data, bytes):
        raise MalformedError(f"chunk data must be bytes, got {type(msg.data).__name__}")
    if not 0 < len(msg.data) <= msg.total_size:
        raise MalformedError(f"chunk of {len(msg.data)} bytes in a message of {msg.total_size}")


def _no_rules(msg: m.Message) -> None:
    """Types whose fields the parser already fully constrains."""


@dataclass(frozen=True)
class Codec:
    """How one message type travels: its wire code, writer, parser and rules."""

    code: int
    put: Callable[[Writer, m.Message], None]
    get: Callable[[Reader, m.Envelope, Limits], m.Message]
    check: Callable[[m.Message], None]


# Codes are part of the protocol: never renumber, only add.
CODECS: dict[type[m.Message], Codec] = {
    m.Hello: Codec(1, _put_hello, _get_hello, _check_hello),
    m.Status: Codec(2, _put_status, _get_status, _check_status),
    m.RoundPlan: Codec(3, _put_plan, _get_plan, _check_plan),
    m.ModelWeights: Codec(4, _put_model, _get_model, _check_model),
    m.Activations: Codec(5, _put_activations, _get_activations, _check_activations),
    m.Gradient: Codec(6, _put_gradient, _get_gradient, _check_gradient),
    m.RoundUpdate: Codec(7, _put_update, _get_update, _check_update),
    m.ErrorReport: Codec(8, _put_error, _get_error, _no_rules),
    m.Chunk: Codec(9, _put_chunk, _get_chunk, check_chunk),
}
_BY_CODE = {codec.code: (cls, codec) for cls, codec in CODECS.items()}


def type_code(cls: type[m.Message]) -> int:
    """The wire code of a message class."""
    return CODECS[cls].code


def check_message(message: m.Message) -> None:
    """Every rule of ``message``'s type and its envelope; MalformedError on the first broken one."""
    check_envelope(message.envelope)
    CODECS[type(message)].check(message)


# --- frames -----------------------------------------------------------------------------------


def encode(message: m.Message, signer: SigningKey | None = None) -> bytes:
    """One complete frame for ``message`` (chunk it with ``chunking.split`` when too large),
    signed by ``signer`` when given (else its signature block says "unsigned").

    The message is checked first against the rules the decoder applies, so nothing is written
    that a receiver would refuse.
    """
    codec = CODECS.get(type(message))
    if codec is None:
        raise UnknownTypeError(f"no encoder for {type(message).__name__}")
    head, body = Writer(), Writer()
    try:
        check_message(message)
        _put_envelope(head, message.envelope)
        codec.put(body, message)
    except MalformedError:
        raise
    except (struct.error, ValueError, OverflowError, TypeError, AttributeError, KeyError) as exc:
        raise MalformedError(f"cannot encode {type(message).__name__}: {exc}") from exc
    # joined once: a RoundUpdate of ViT-B/32 weights is 9.4 MB, and every extra copy of it is
    # resident on the device (docs/reliability.md, "Device-sized buffers")
    header = head.getvalue()
    parts = [_PREFIX.pack(MAGIC, VERSION, codec.code, len(header), sum(len(p) for p in body.parts)), header, *body.parts]
    parts += signature_block(parts, signer)
    crc = 0
    for part in parts:
        crc = zlib.crc32(part, crc)
    parts.append(struct.pack("<I", crc))
    return b"".join(parts)


def decode(data: bytes | bytearray | memoryview, limits: Limits = DEFAULT_LIMITS, *,
           keys: Keyring | None = None, signer: str | None = None) -> m.Message:
    """Parse and validate one frame; any problem raises a ``ProtocolError`` subclass.

    With ``keys``, the frame must be signed by a key in it (by ``signer``, when given), checked
    before the envelope and body are parsed (``SignatureError``). Without, the signature block is
    parsed but not verified: the receiver runs unsigned (docs/protocol.md 2.6).
    """
    view = memoryview(data)
    code, header_len, body_len = _check_prefix(view, limits)
    frame_len = PREFIX_SIZE + header_len + body_len
    signature, end = read_signature_block(view, frame_len)
    if len(view) - end < CRC_SIZE:
        raise TruncatedError(f"frame declares {end + CRC_SIZE} bytes, received {len(view)}")
    if len(view) - end > CRC_SIZE:
        raise TrailingBytesError(f"{len(view) - end - CRC_SIZE} bytes after the end of the frame")
    (crc,) = struct.unpack_from("<I", view, end)
    if zlib.crc32(view[:end]) != crc:
        raise IntegrityError("CRC-32 mismatch: the frame was corrupted or altered")
    check_signature(view[:end], signature, keys, signer)
    if code not in _BY_CODE:
        raise UnknownTypeError(f"unknown message type code {code}")
    cls, codec = _BY_CODE[code]
    head = Reader(view[PREFIX_SIZE : PREFIX_SIZE + header_len], "header")
    envelope = _get_envelope(head)
    head.finish()
    body = Reader(view[PREFIX_SIZE + header_len : frame_len], f"{cls.__name__} body")
    message = codec.get(body, envelope, limits)
    body.finish()
    check_message(message)
    return message


def _check_prefix(view: memoryview, limits: Limits) -> tuple[int, int, int]:
    if len(view) > limits.max_frame_bytes:
        raise LimitError(f"frame of {len(view)} bytes exceeds the limit of {limits.max_frame_bytes}")
    if len(view) < PREFIX_SIZE + CRC_SIZE:
        raise TruncatedError(f"{len(view)} bytes is shorter than the smallest frame ({PREFIX_SIZE + CRC_SIZE})")
    magic, version, code, header_len, body_len = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise BadMagicError(f"not an sflam frame (magic {bytes(magic)!r})")
    if version != VERSION:
        raise VersionError(f"protocol version {version} is not supported (this side speaks {VERSION})")
    declared = PREFIX_SIZE + header_len + body_len + 1 + CRC_SIZE  # at least a one-byte signature block
    if declared > len(view):
        raise TruncatedError(f"frame declares {declared} bytes, received {len(view)}")
    return code, header_len, body_len
