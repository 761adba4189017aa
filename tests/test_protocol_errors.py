"""Every way a frame can be wrong is refused with a specific ProtocolError and a clear message.

Frames are built by hand from the layout in codec.py's docstring (``_frame`` adds the prefix and
a valid CRC-32), so each test changes exactly one field of an otherwise valid frame and the
refusal reaches the check it is about. ``test_hand_built_frames_equal_the_encoders_bytes``
proves the builders write what the encoder writes.
"""

from __future__ import annotations

import dataclasses
import struct
import tracemalloc
import zlib
from collections.abc import Callable

import numpy as np
import pytest

from edge_runtime.protocol import (
    Activations,
    Allocation,
    BadMagicError,
    Chunk,
    Envelope,
    ErrorReport,
    Gradient,
    Hello,
    IntegrityError,
    LimitError,
    Limits,
    MalformedError,
    Message,
    ModelWeights,
    ProtocolError,
    RoundPlan,
    RoundUpdate,
    Status,
    Telemetry,
    Tensor,
    TrailingBytesError,
    TruncatedError,
    UnknownTypeError,
    VersionError,
    decode,
    encode,
)
from edge_runtime.protocol import codec
from edge_runtime.quantize import QuantizedTensor, quantize

NAN, INF = float("nan"), float("inf")
HELLO, STATUS, PLAN, MODEL, ACTIVATIONS, GRADIENT, UPDATE, ERROR, CHUNK = range(1, 10)
ENV = Envelope("run", 2, "dev", 3, 1.5)
DIGEST = bytes(range(1, 33))  # a classes_digest whose every byte differs, so a misplaced one shows


# --- frame builders (the documented layout, little-endian) ---------------------------------------


def _u8(value: int) -> bytes:
    return struct.pack("<B", value)


def _u16(value: int) -> bytes:
    return struct.pack("<H", value)


def _u32(value: int) -> bytes:
    return struct.pack("<I", value)


def _text(value: str | bytes, width: int = 1) -> bytes:
    data = value.encode("utf-8") if isinstance(value, str) else value
    return (_u8 if width == 1 else _u16)(len(data)) + data


def _header(run_id: str | bytes = "run", device_id: str | bytes = "dev", created_at: float = 1.5) -> bytes:
    return _text(run_id) + _text(device_id) + struct.pack("<IId", 2, 3, created_at)


def _frame(code: int, body: bytes, header: bytes | None = None, version: int = 4, magic: bytes = b"SFLM") -> bytes:
    header = _header() if header is None else header
    frame = struct.pack("<4sBBHI", magic, version, code, len(header), len(body)) + header + body + b"\x00"  # unsigned
    return frame + _u32(zlib.crc32(frame))


def _with_crc(frame: bytes | bytearray) -> bytes:
    """``frame`` with its CRC-32 trailer recomputed, so a patch gets past the integrity check."""
    return bytes(frame[:-4]) + _u32(zlib.crc32(bytes(frame[:-4])))


def _shape(shape: tuple[int, ...]) -> bytes:
    return _u8(len(shape)) + b"".join(_u32(d) for d in shape)


def _tensor(dtype_code: int = 3, shape: tuple[int, ...] = (2,), size: int | None = None, data: bytes | None = None) -> bytes:
    itemsize = {1: 4, 2: 2, 3: 8, 4: 4, 5: 1, 6: 1, 7: 2, 8: 8}.get(dtype_code, 1)
    count = int(np.prod(shape)) if shape else 1
    data = bytes(count * itemsize) if data is None else data
    return _u8(dtype_code) + _shape(shape) + _u32(len(data) if size is None else size) + data


def _qtensor(
    bits: int = 8,
    per: int = 0,
    shape: tuple[int, ...] = (2, 3),
    groups: int | None = None,
    lo: list[float] | None = None,
    hi: list[float] | None = None,
    payload_size: int | None = None,
    payload: bytes | None = None,
) -> bytes:
    if groups is None:
        groups = 0 if bits in (16, 32) else (1 if per == 0 else int(np.prod(shape[:-1])))
    lo = [-1.0] * groups if lo is None else lo
    hi = [1.0] * groups if hi is None else hi
    if payload is None:
        count = int(np.prod(shape))
        payload = bytes(count * bits // 8 if bits in (16, 32) else (count * bits + 7) // 8)
    return (
        _u8(bits) + _u8(per) + _shape(shape) + _u32(groups)
        + np.asarray(lo, "<f4").tobytes() + np.asarray(hi, "<f4").tobytes()
        + _u32(len(payload) if payload_size is None else payload_size) + payload
    )


def _activations_body(labels: bytes | None = None, **qtensor: object) -> bytes:
    return _qtensor(**qtensor) + (_tensor(3, (2,)) if labels is None else labels)


def _allocation(device: str = "d", up: int = 8, down: int = 8, power: float = 0.5, bandwidth: float = 1e6, per_token: int = 0) -> bytes:
    # tx_power_w and bandwidth_hz are both f64
    return _text(device) + _u8(up) + _u8(down) + struct.pack("<dd", power, bandwidth) + _u8(per_token)


def _plan_body(
    deadline: float = 30.0,
    lr: float = 0.5,
    allocations: tuple[bytes, ...] | None = None,
    count: int | None = None,
    epochs: int = 1,
    batch: int = 16,
    optimizer: int = 0,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    num_classes: int = 0,
    digest: bytes = bytes(32),
    crop_padding: int = 0,
    hflip: int = 0,
) -> bytes:
    allocations = (_allocation(),) if allocations is None else allocations
    head = _u32(4) + struct.pack("<d", deadline) + _u16(epochs) + _u32(batch) + struct.pack("<d", lr)  # lr is f64
    head += _u8(optimizer) + struct.pack("<dd", momentum, weight_decay)
    head += _u16(num_classes) + digest + _u8(crop_padding) + _u8(hflip)  # the digest is 32 raw bytes, no length
    return head + _u16(len(allocations) if count is None else count) + b"".join(allocations)


def _gradient_body(loss: float = 0.5, **qtensor: object) -> bytes:
    return _qtensor(**qtensor) + struct.pack("<d", loss)  # loss is f64


def _weights(*tensors: tuple[str, bytes], count: int | None = None) -> bytes:
    items = b"".join(_text(name, 2) + tensor for name, tensor in tensors)
    return _u16(len(tensors) if count is None else count) + items


def _model_body(*tensors: tuple[str, bytes], count: int | None = None) -> bytes:
    return _u32(7) + _weights(*(tensors or (("w", _tensor(1, (2,))),)), count=count)


def _update_body(times: tuple[float, float, float] = (1.0, 2.0, 3.0), source: int = 0, weights: bytes | None = None) -> bytes:
    weights = _weights() if weights is None else weights
    return _u32(7) + _u32(100) + weights + struct.pack("<3d", *times) + _u8(source) + struct.pack("<QQI", 10, 20, 5)


def _chunk_body(index: int = 0, count: int = 2, total: int = 100, size: int | None = None, data: bytes = b"x" * 50) -> bytes:
    return struct.pack("<QIII", 99, index, count, total) + _u32(len(data) if size is None else size) + data


def _status_body(online: int = 1, reason: bytes = b"ok") -> bytes:
    return _u8(online) + _text(reason, 2)


def _telemetry_bytes(times: tuple[float, float, float] = (1.0, 2.0, 3.0), source: int = 0) -> bytes:
    return struct.pack("<3d", *times) + _u8(source) + struct.pack("<QQI", 10, 20, 5)


def _hello_body(heartbeat: int = 0, has_telemetry: int = 0, telemetry: bytes = b"", skipped: int = 0) -> bytes:
    texts = _text("pi-4") + _text("onnx") + _text("0.1")
    return texts + _u32(10) + _u32(skipped) + _u8(heartbeat) + _u8(has_telemetry) + telemetry


# --- the builders are right (otherwise every rejection below could be an accident) --------------


def test_hand_built_frames_equal_the_encoders_bytes() -> None:
    # Prepare
    quantized = QuantizedTensor(8, (2, 3), "tensor", np.array([-1.0], np.float32), np.array([1.0], np.float32), bytes(6))
    labels = Tensor.from_numpy(np.zeros(2, np.int64))
    expected = {
        ACTIVATIONS: Activations(ENV, quantized, labels),
        STATUS: Status(ENV, True, "ok"),
        PLAN: RoundPlan(ENV, 4, 30.0, 1, 16, 0.1, (Allocation("d", 8, 8, 0.1, 1e6), Allocation("e", 2, 16, 1e39, 0.0, True)),
                        num_classes=10, classes_digest=DIGEST, crop_padding=4, hflip=True),
        MODEL: ModelWeights(ENV, 7, (("w", Tensor.from_numpy(np.zeros(2, np.float32))),)),
        GRADIENT: Gradient(ENV, quantized, 0.1),
        CHUNK: Chunk(ENV, 99, 0, 2, 100, b"x" * 50),
        HELLO: Hello(ENV, "pi-4", "onnx", "0.1", 10, last_telemetry=Telemetry(1.0, 2.0, 3.0, "measured", 10, 20, 5), skipped_samples=3),
        UPDATE: RoundUpdate(ENV, 7, 100, (), Telemetry(1.0, 2.0, 3.0, "measured", 10, 20, 5)),
    }
    built = {
        ACTIVATIONS: _frame(ACTIVATIONS, _activations_body()),
        STATUS: _frame(STATUS, _status_body()),
        PLAN: _frame(PLAN, _plan_body(lr=0.1, allocations=(_allocation(power=0.1), _allocation("e", 2, 16, 1e39, 0.0, 1)),
                                      num_classes=10, digest=DIGEST, crop_padding=4, hflip=1)),
        MODEL: _frame(MODEL, _model_body()),
        GRADIENT: _frame(GRADIENT, _gradient_body(loss=0.1)),
        CHUNK: _frame(CHUNK, _chunk_body()),
        HELLO: _frame(HELLO, _hello_body(has_telemetry=1, telemetry=_telemetry_bytes(), skipped=3)),
        UPDATE: _frame(UPDATE, _update_body()),
    }
    # Assert
    for code, message in expected.items():
        assert built[code] == encode(message), code
        assert decode(built[code]) == message, code


# --- frame prefix --------------------------------------------------------------------------------


# 1: the layout before RoundPlan carried the optimizer; 2: before the signature block; 3: before
# the plan's class list and augmentation and the Hello's skipped count
@pytest.mark.parametrize("version", [0, 1, 2, 3, 5, 255])
def test_unknown_protocol_version_is_refused(version: int) -> None:
    frame = _frame(STATUS, _status_body(), version=version)
    with pytest.raises(VersionError, match=f"protocol version {version} is not supported"):
        decode(frame)


# A genuine version 3 frame (the Status of test_protocol_roundtrip's golden bytes, as v3 wrote it)
V3_STATUS = bytes.fromhex("53464c4d03021600050000000272310264370300000005000000000000000000f83f0102006f6b00c735b45b")


def test_a_version_3_frame_is_refused_with_version_error() -> None:
    assert struct.unpack("<I", V3_STATUS[-4:])[0] == zlib.crc32(V3_STATUS[:-4])  # intact: only the version is wrong
    with pytest.raises(VersionError, match="protocol version 3 is not supported \\(this side speaks 4\\)"):
        decode(V3_STATUS)


@pytest.mark.parametrize("magic", [b"SFLN", b"sflm", b"\x00\x00\x00\x00", b"MQTT"])
def test_bad_magic_is_refused(magic: bytes) -> None:
    with pytest.raises(BadMagicError, match="not an sflam frame"):
        decode(_frame(STATUS, _status_body(), magic=magic))


@pytest.mark.parametrize("code", [0, 10, 200, 255])
def test_unknown_type_code_with_a_valid_crc_is_refused(code: int) -> None:
    with pytest.raises(UnknownTypeError, match=f"unknown message type code {code}"):
        decode(_frame(code, _status_body()))


def test_a_frame_over_the_size_limit_is_refused_before_parsing() -> None:
    frame = _frame(STATUS, _status_body(reason=b"r" * 200))
    with pytest.raises(LimitError, match=f"frame of {len(frame)} bytes exceeds the limit of 100"):
        decode(frame, Limits(max_frame_bytes=100))


def _expected_for_flipped_byte(offset: int, size: int) -> tuple[type[ProtocolError], ...]:
    if offset < 4:
        return (BadMagicError,)
    if offset == 4:
        return (VersionError,)
    if 6 <= offset < 12:  # header_len / body_len: the declared size no longer matches (or a
        # shorter body leaves bytes that do not parse as a signature block, or the CRC catches it)
        return (TruncatedError, TrailingBytesError, MalformedError, IntegrityError)
    if offset == size - 5:  # the (unsigned) signature block's scheme: now it announces a key id and
        # a signature that are not there, or an unknown scheme
        return (TruncatedError, MalformedError)
    return (IntegrityError,)  # type code, header, body and the CRC itself are all covered


FLIP_FRAMES = {
    "status": encode(Status(ENV, True, "connected")),
    "activations": encode(
        Activations(ENV, quantize(np.linspace(-1, 1, 12).reshape(2, 6), 3, per="token"), Tensor.from_numpy(np.array([3, 4], np.uint8)))
    ),
}


@pytest.mark.parametrize("name", list(FLIP_FRAMES))
def test_every_single_bit_flip_is_refused_with_the_right_error(name: str) -> None:
    frame = FLIP_FRAMES[name]
    for offset in range(len(frame)):
        expected = _expected_for_flipped_byte(offset, len(frame))
        for bit in range(8):
            # Prepare
            corrupted = bytearray(frame)
            corrupted[offset] ^= 1 << bit
            # Execute / Assert
            with pytest.raises(expected):
                decode(bytes(corrupted))


def test_a_crc_mismatch_says_so() -> None:
    frame = bytearray(FLIP_FRAMES["status"])
    frame[-1] ^= 0x80
    with pytest.raises(IntegrityError, match="CRC-32 mismatch"):
        decode(bytes(frame))


@pytest.mark.parametrize("name", list(FLIP_FRAMES))
def test_every_truncation_is_refused_as_truncated(name: str) -> None:
    frame = FLIP_FRAMES[name]
    for length in range(len(frame)):
        with pytest.raises(TruncatedError):
            decode(frame[:length])


def test_truncation_messages_give_the_sizes() -> None:
    frame = FLIP_FRAMES["status"]
    with pytest.raises(TruncatedError, match="5 bytes is shorter than the smallest frame"):
        decode(frame[:5])
    with pytest.raises(TruncatedError, match=f"frame declares {len(frame)} bytes, received {len(frame) - 1}"):
        decode(frame[:-1])


@pytest.mark.parametrize("extra", [b"\x00", b"SFLM", bytes(100)])
def test_bytes_after_the_frame_are_refused(extra: bytes) -> None:
    with pytest.raises(TrailingBytesError, match=f"{len(extra)} bytes after the end of the frame"):
        decode(FLIP_FRAMES["status"] + extra)


def test_body_longer_than_its_content_is_refused() -> None:
    # Prepare: body_len covers one byte more than the Status fields use; CRC valid.
    frame = _frame(STATUS, _status_body() + b"\x00")
    # Execute / Assert
    with pytest.raises(TrailingBytesError, match="Status body: 1 unexpected trailing bytes"):
        decode(frame)


def test_header_longer_than_the_envelope_is_refused() -> None:
    frame = _frame(STATUS, _status_body(), header=_header() + b"\x00\x00")
    with pytest.raises(TrailingBytesError, match="header: 2 unexpected trailing bytes"):
        decode(frame)


def test_body_shorter_than_its_fields_is_refused() -> None:
    frame = _frame(STATUS, _status_body()[:-1])
    with pytest.raises(TruncatedError, match="Status body: reason needs 2 bytes, only 1 left"):
        decode(frame)


def test_a_plan_body_cut_inside_the_classes_digest_is_refused_as_truncated() -> None:
    # Prepare: the fixed fields up to num_classes (45 bytes), then 31 of the digest's 32 bytes
    body = _plan_body(allocations=())[: 45 + 31]
    # Execute / Assert
    with pytest.raises(TruncatedError, match="RoundPlan body: classes_digest needs 32 bytes, only 31 left"):
        decode(_frame(PLAN, body))


def test_patching_a_field_with_the_crc_recomputed_reaches_the_body_check() -> None:
    # Prepare: a valid encoded Status whose online byte (the first body byte) becomes 2.
    frame = bytearray(encode(Status(ENV, True, "ok")))
    header_len = struct.unpack_from("<H", frame, 6)[0]
    frame[12 + header_len] = 2
    # Execute / Assert
    with pytest.raises(IntegrityError):
        decode(bytes(frame))
    with pytest.raises(MalformedError, match="online must be 0 or 1, got 2"):
        decode(_with_crc(frame))


# --- sizes claimed, not sent ---------------------------------------------------------------------


def _peak_traced_bytes(action: Callable[[], object]) -> tuple[BaseException | None, int]:
    """Run ``action``; the exception it raised and the peak memory traced while it ran."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        try:
            action()
        except BaseException as exc:  # noqa: BLE001 - returned to the test, which asserts its type
            error = exc
        else:
            error = None
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    return error, peak


TERA_FRAMES = {
    "model weights": _frame(MODEL, _model_body(("w", _tensor(1, (10**6, 10**6), size=0, data=b"")))),
    "activations": _frame(ACTIVATIONS, _activations_body(shape=(10**6, 10**6), groups=1, payload_size=0, payload=b"")),
    "per-token ranges": _frame(ACTIVATIONS, _activations_body(per=1, shape=(10**6, 10**6), groups=10**6, lo=[], hi=[], payload=b"")),
}


@pytest.mark.parametrize("name", list(TERA_FRAMES))
def test_a_header_claiming_a_trillion_elements_is_refused_without_allocating(name: str) -> None:
    # Prepare
    frame = TERA_FRAMES[name]
    assert len(frame) < 200
    # Execute
    error, peak = _peak_traced_bytes(lambda: decode(frame))
    # Assert: refused from the header alone, without allocating what it declares
    assert isinstance(error, LimitError), repr(error)
    assert "declares 1000000000000 elements, limit is 67108864" in str(error)
    assert peak < 1_000_000


CLAIMED_FRAMES = {
    # 60M float32 elements (within max_elements) and a matching 240 MB size, but no data.
    "tensor data": _frame(MODEL, _model_body(("w", _tensor(1, (60_000_000,), size=240_000_000, data=b"")))),
    # Zero elements, so no element limit applies, but 2**24 per-token ranges claimed.
    "ranges": _frame(ACTIVATIONS, _activations_body(per=1, shape=(2**24, 0), lo=[], hi=[], payload=b"")),
    "payload": _frame(ACTIVATIONS, _activations_body(bits=32, shape=(2, 2**24), payload_size=2**27, payload=b"")),
}


@pytest.mark.parametrize("name", list(CLAIMED_FRAMES))
def test_sizes_claimed_but_not_received_are_refused_before_allocating(name: str) -> None:
    error, peak = _peak_traced_bytes(lambda: decode(CLAIMED_FRAMES[name]))
    assert isinstance(error, TruncatedError), repr(error)
    assert "needs" in str(error) and "left" in str(error)
    assert peak < 1_000_000


def test_more_weight_tensors_than_the_limit_are_refused() -> None:
    frame = _frame(MODEL, _model_body(*[(f"w{i}", _tensor(5, (1,))) for i in range(3)]))
    assert len(decode(frame, Limits(max_tensors=3)).weights) == 3
    with pytest.raises(LimitError, match="3 weight tensors exceed the limit of 2"):
        decode(frame, Limits(max_tensors=2))


def test_weights_over_the_element_limit_in_all_are_refused() -> None:
    # Each tensor is within max_elements; together they are not.
    frame = _frame(MODEL, _model_body(("a", _tensor(5, (60,))), ("b", _tensor(5, (60,)))))
    assert len(decode(frame, Limits(max_elements=120)).weights) == 2
    with pytest.raises(LimitError, match="weights exceed 100 elements in all"):
        decode(frame, Limits(max_elements=100))


def test_more_allocations_than_the_limit_are_refused() -> None:
    frame = _frame(PLAN, _plan_body(allocations=(_allocation("a"), _allocation("b"), _allocation("c"))))
    assert len(decode(frame, Limits(max_allocations=3)).allocations) == 3
    with pytest.raises(LimitError, match="3 allocations exceed the limit of 2"):
        decode(frame, Limits(max_allocations=2))


# --- field rules: one change to a valid body each ------------------------------------------------

LABELS_3 = _tensor(3, (3,))
F32_NAN, F32_INF = np.array([NAN], "<f4").tobytes(), np.array([INF], "<f4").tobytes()
F16_INF, F64_NAN = np.array([INF], "<f2").tobytes(), np.array([NAN], "<f8").tobytes()
MALFORMED = {
    # quantization ranges
    "lo NaN": (ACTIVATIONS, _activations_body(lo=[NAN]), "NaN or infinite quantization range"),
    "hi NaN": (ACTIVATIONS, _activations_body(hi=[NAN]), "NaN or infinite quantization range"),
    "lo -inf": (ACTIVATIONS, _activations_body(lo=[-INF]), "NaN or infinite quantization range"),
    "hi +inf": (ACTIVATIONS, _activations_body(hi=[INF]), "NaN or infinite quantization range"),
    "token range NaN": (ACTIVATIONS, _activations_body(per=1, lo=[0.0, NAN], hi=[1.0, 1.0]), "NaN or infinite"),
    "lo > hi": (ACTIVATIONS, _activations_body(lo=[2.0], hi=[1.0]), r"a range has lo > hi"),
    "token lo > hi": (ACTIVATIONS, _activations_body(per=1, lo=[0.0, 1.5], hi=[1.0, 1.0]), r"lo > hi"),
    "range wider than float32": (ACTIVATIONS, _activations_body(lo=[-3e38], hi=[3e38]), "wider than float32 can represent"),
    "gradient lo > hi": (GRADIENT, _gradient_body(lo=[1.0], hi=[0.0]), r"lo > hi"),
    # shape / bits / groups / payload agreement
    "two ranges per tensor": (ACTIVATIONS, _activations_body(groups=2), r"per tensor at 8 bits has 1 ranges, header says 2"),
    "one range for two tokens": (ACTIVATIONS, _activations_body(per=1, groups=1), r"per token at 8 bits has 2 ranges, header says 1"),
    "ranges at 16 bits": (ACTIVATIONS, _activations_body(bits=16, groups=1), r"at 16 bits has 0 ranges, header says 1"),
    "payload too long": (ACTIVATIONS, _activations_body(bits=3, payload=bytes(6)), r"6 values at 3 bits need 3 bytes, header says 6"),
    "payload too short": (ACTIVATIONS, _activations_body(bits=32, payload=bytes(12)), r"6 values at 32 bits need 24 bytes, header says 12"),
    "float16 payload": (ACTIVATIONS, _activations_body(bits=16, payload=bytes(6)), r"need 12 bytes, header says 6"),
    "bits 0": (ACTIVATIONS, _activations_body(bits=0), "0 bits is not one of 1..8, 16, 32"),
    "bits 9": (ACTIVATIONS, _activations_body(bits=9), "9 bits is not one of"),
    "bits 17": (ACTIVATIONS, _activations_body(bits=17), "17 bits is not one of"),
    "bits 33": (GRADIENT, _gradient_body(bits=33), "33 bits is not one of"),
    "granularity 2": (ACTIVATIONS, _activations_body(per=2), "unknown granularity code 2"),
    "nine dimensions": (ACTIVATIONS, _activations_body(shape=(1,) * 9), r"9 dimensions \(max 8\)"),
    # quantized tensors: not empty, a batch dimension, float payloads finite
    "empty activations": (ACTIVATIONS, _activations_body(shape=(0, 3), labels=_tensor(3, (0,))), r"empty quantized tensor of shape \(0, 3\)"),
    "empty gradient": (GRADIENT, _gradient_body(shape=(2, 0)), r"gradient: empty quantized tensor of shape \(2, 0\)"),
    "activations without a batch dimension": (ACTIVATIONS, _activations_body(shape=()), "activations need a batch dimension"),
    "q=32 payload NaN": (ACTIVATIONS, _activations_body(bits=32, payload=bytes(20) + F32_NAN), "activations: contains NaN or infinite"),
    "q=32 payload inf": (GRADIENT, _gradient_body(bits=32, payload=F32_INF + bytes(20)), "gradient: contains NaN or infinite"),
    "q=16 payload inf": (ACTIVATIONS, _activations_body(bits=16, payload=bytes(10) + F16_INF), "activations: contains NaN or infinite"),
    # labels
    "3 labels for a batch of 2": (ACTIVATIONS, _activations_body(labels=LABELS_3), "3 labels for a batch of 2 activations"),
    "labels 2-D": (ACTIVATIONS, _activations_body(labels=_tensor(3, (2, 1))), "labels: must be a 1-D integer tensor, got int64"),
    "labels float": (ACTIVATIONS, _activations_body(labels=_tensor(1, (2,))), "labels: must be a 1-D integer tensor, got float32"),
    "labels negative int64": (
        ACTIVATIONS, _activations_body(labels=_tensor(3, (2,), data=np.array([1, -1], "<i8").tobytes())), "labels: negative class index"
    ),
    "labels negative int32": (
        ACTIVATIONS, _activations_body(labels=_tensor(4, (2,), data=np.array([-5, 0], "<i4").tobytes())), "labels: negative class index"
    ),
    "labels size": (
        ACTIVATIONS, _activations_body(labels=_tensor(3, (2,), size=8, data=bytes(8))), r"int64 \(2,\) needs 16 bytes, header says 8"
    ),
    "dtype code 0": (ACTIVATIONS, _activations_body(labels=_tensor(0, (2,))), "unknown dtype code 0"),
    "dtype code 9": (MODEL, _model_body(("w", _tensor(9, (2,)))), "unknown dtype code 9"),
    # weights: unique non-empty names, finite floats
    "duplicate weight names": (MODEL, _model_body(("w", _tensor(1, (2,))), ("w", _tensor(1, (3,)))), "names appear twice: w"),
    "empty weight name": (MODEL, _model_body(("", _tensor(1, (2,)))), "a tensor name must be a non-empty string"),
    "float32 weight NaN": (MODEL, _model_body(("w", _tensor(1, (2,), data=bytes(4) + F32_NAN))), "weights 'w': contains NaN or infinite"),
    "float16 weight inf": (MODEL, _model_body(("w", _tensor(2, (1,), data=F16_INF))), "weights 'w': contains NaN or infinite"),
    "float64 weight NaN": (MODEL, _model_body(("w", _tensor(8, (1,), data=F64_NAN))), "weights 'w': contains NaN or infinite"),
    "update weight NaN": (UPDATE, _update_body(weights=_weights(("w", _tensor(1, (1,), data=F32_NAN)))), "weights 'w': contains NaN"),
    # flags
    "online 2": (STATUS, _status_body(online=2), "online must be 0 or 1, got 2"),
    "heartbeat 2": (HELLO, _hello_body(heartbeat=2), "heartbeat must be 0 or 1, got 2"),
    "has_telemetry 2": (HELLO, _hello_body(has_telemetry=2), "has_telemetry must be 0 or 1, got 2"),
    "hello telemetry NaN": (HELLO, _hello_body(has_telemetry=1, telemetry=_telemetry_bytes((float("nan"), 0.0, 1.0))),
                            "compute_time_s"),
    "per_token 255": (PLAN, _plan_body(allocations=(_allocation(per_token=255),)), "per_token must be 0 or 1, got 255"),
    "hflip 2": (PLAN, _plan_body(hflip=2), "hflip must be 0 or 1, got 2"),
    # text
    "reason not UTF-8": (STATUS, _status_body(reason=b"\xff\xfe"), "reason is not valid UTF-8"),
    "truncated UTF-8": (STATUS, _status_body(reason="é".encode()[:1]), "reason is not valid UTF-8"),
    "surrogate in UTF-8": (ERROR, _text("c") + _text(b"\xed\xa0\x80", 2), "detail is not valid UTF-8"),
    # plan and allocations
    "deadline NaN": (PLAN, _plan_body(deadline=NAN), "deadline_s: must be a finite number, got nan"),
    "deadline 0": (PLAN, _plan_body(deadline=0.0), "deadline_s must be > 0 seconds, got 0.0"),
    "deadline negative": (PLAN, _plan_body(deadline=-1.0), "deadline_s must be > 0 seconds"),
    "epochs 0": (PLAN, _plan_body(epochs=0), r"local_epochs: must be an integer in \[1, 65535\], got 0"),
    "batch 0": (PLAN, _plan_body(batch=0), r"batch_size: must be an integer in \[1, 4294967295\], got 0"),
    "lr inf": (PLAN, _plan_body(lr=INF), "lr: must be a finite number, got inf"),
    "lr NaN": (PLAN, _plan_body(lr=NAN), "lr: must be a finite number"),
    "lr negative": (PLAN, _plan_body(lr=-0.5), "lr: must be >= 0, got -0.5"),
    "optimizer 3": (PLAN, _plan_body(optimizer=3), "optimizer code 3 is undefined"),
    "momentum 1": (PLAN, _plan_body(momentum=1.0), "momentum must be < 1, got 1.0"),
    "momentum NaN": (PLAN, _plan_body(momentum=NAN), "momentum: must be a finite number"),
    "weight decay negative": (PLAN, _plan_body(weight_decay=-1e-4), "weight_decay: must be >= 0"),
    "crop_padding 65": (PLAN, _plan_body(crop_padding=65), r"crop_padding: must be an integer in \[0, 64\], got 65"),
    "crop_padding 255": (PLAN, _plan_body(crop_padding=255), r"crop_padding: must be an integer in \[0, 64\], got 255"),
    "bits_up 0": (PLAN, _plan_body(allocations=(_allocation(up=0),)), "allocation 'd' bits_up: 0 is not one of 1..8, 16, 32"),
    "bits_down 17": (PLAN, _plan_body(allocations=(_allocation(down=17),)), "allocation 'd' bits_down: 17 is not one of"),
    "negative power": (PLAN, _plan_body(allocations=(_allocation(power=-1.0),)), "allocation 'd' tx_power_w: must be >= 0"),
    "power inf": (PLAN, _plan_body(allocations=(_allocation(power=INF),)), "tx_power_w: must be a finite number"),
    "bandwidth NaN": (PLAN, _plan_body(allocations=(_allocation(bandwidth=NAN),)), "bandwidth_hz: must be a finite number"),
    "negative bandwidth": (PLAN, _plan_body(allocations=(_allocation(bandwidth=-1.0),)), "bandwidth_hz: must be >= 0"),
    "a device allocated twice": (PLAN, _plan_body(allocations=(_allocation("d"), _allocation("d"))), "a device appears twice"),
    "allocation id with a slash": (PLAN, _plan_body(allocations=(_allocation("a/b"),)), "device_id must be 1-64 characters"),
    "allocation id empty": (PLAN, _plan_body(allocations=(_allocation(""),)), "device_id must be 1-64 characters"),
    # telemetry
    "energy source 2": (UPDATE, _update_body(source=2), "unknown energy source code 2"),
    "negative compute time": (UPDATE, _update_body(times=(-1.0, 0.0, 0.0)), "telemetry compute_time_s: must be >= 0"),
    "negative uplink time": (UPDATE, _update_body(times=(0.0, -0.5, 0.0)), "telemetry uplink_time_s: must be >= 0"),
    "energy NaN": (UPDATE, _update_body(times=(1.0, 1.0, NAN)), "telemetry energy_j: must be a finite number"),
    "energy inf": (UPDATE, _update_body(times=(1.0, 1.0, INF)), "telemetry energy_j: must be a finite number"),
    # chunks
    "chunk index = count": (CHUNK, _chunk_body(index=2, count=2), r"chunk index: must be an integer in \[0, 1\], got 2"),
    "chunk count 0": (CHUNK, _chunk_body(index=0, count=0), r"chunk count: must be an integer in \[1, 4294967295\], got 0"),
    "chunk count > total": (CHUNK, _chunk_body(count=200, total=100), r"chunk total_size: must be an integer in \[200, .*\], got 100"),
    "chunk size 0": (CHUNK, _chunk_body(data=b""), "chunk of 0 bytes in a message of 100"),
    "chunk larger than its message": (CHUNK, _chunk_body(total=40), "chunk of 50 bytes in a message of 40"),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_contradictory_fields_are_refused_as_malformed(name: str) -> None:
    # Prepare
    code, body, message = MALFORMED[name]
    # Execute / Assert
    with pytest.raises(MalformedError, match=message):
        decode(_frame(code, body))


# The controls for MALFORMED: the same builders one step inside each rule decode fine.
ACCEPTED = {
    "labels uint8": (ACTIVATIONS, _activations_body(labels=_tensor(5, (2,), data=bytes([0, 255])))),
    "labels uint16": (ACTIVATIONS, _activations_body(labels=_tensor(7, (2,)))),
    "labels int32 zero": (ACTIVATIONS, _activations_body(labels=_tensor(4, (2,)))),
    "q=32 finite payload": (ACTIVATIONS, _activations_body(bits=32, payload=np.array([1e38] * 6, "<f4").tobytes())),
    "q=16 largest float16": (ACTIVATIONS, _activations_body(bits=16, payload=np.array([65504.0] * 6, "<f2").tobytes())),
    "weights float32 max": (MODEL, _model_body(("w", _tensor(1, (1,), data=np.array([3.4e38], "<f4").tobytes())))),
    "empty plain weight": (MODEL, _model_body(("w", _tensor(1, (0,))))),
    "two weight names": (MODEL, _model_body(("w", _tensor(1, (2,))), ("v", _tensor(1, (3,))))),
    "integer weights negative": (MODEL, _model_body(("w", _tensor(3, (1,), data=np.array([-1], "<i8").tobytes())))),
    "deadline tiny": (PLAN, _plan_body(deadline=5e-324)),
    "lr 0": (PLAN, _plan_body(lr=0.0)),
    "lr 1e39": (PLAN, _plan_body(lr=1e39)),
    "epochs 65535": (PLAN, _plan_body(epochs=65535)),
    "crop_padding 64": (PLAN, _plan_body(crop_padding=64)),
    "num_classes 65535": (PLAN, _plan_body(num_classes=65535, digest=b"\xff" * 32)),
    "hflip 1": (PLAN, _plan_body(hflip=1)),
    "skipped u32 max": (HELLO, _hello_body(skipped=2**32 - 1)),
    "no allocations": (PLAN, _plan_body(allocations=())),
    "two devices": (PLAN, _plan_body(allocations=(_allocation("d"), _allocation("D")))),
    "zero power and bandwidth": (PLAN, _plan_body(allocations=(_allocation(power=0.0, bandwidth=0.0),))),
    "zero telemetry": (UPDATE, _update_body(times=(0.0, 0.0, 0.0), source=1)),
    "negative loss": (GRADIENT, _gradient_body(loss=-3.5)),
    "chunk count = total": (CHUNK, _chunk_body(index=99, count=100, total=100, data=b"x")),
    "chunk of the whole message": (CHUNK, _chunk_body(index=0, count=1, total=50)),
}


@pytest.mark.parametrize("name", list(ACCEPTED))
def test_values_at_the_edge_of_each_rule_are_accepted(name: str) -> None:
    # Prepare
    code, body = ACCEPTED[name]
    frame = _frame(code, body)
    # Execute
    message = decode(frame)
    # Assert: and the encoder writes the same bytes back
    assert encode(message) == frame


def test_invalid_utf8_in_the_envelope_is_refused() -> None:
    with pytest.raises(MalformedError, match="header: device_id is not valid UTF-8"):
        decode(_frame(STATUS, _status_body(), header=_header(device_id=b"d\xc3")))


@pytest.mark.parametrize("bad", ["dév", "a/b", "+", "#", "", "x" * 65, "dev 1", "dev\n", "🦫"])
@pytest.mark.parametrize("field", ["run_id", "device_id"])
def test_an_envelope_id_outside_the_topic_rule_is_refused_at_decode(field: str, bad: str) -> None:
    # Prepare: valid UTF-8, valid CRC, only the id breaks the rule
    frame = _frame(STATUS, _status_body(), header=_header(**{field: bad}))
    # Execute / Assert
    with pytest.raises(MalformedError, match=f"envelope {field} must be 1-64 characters"):
        decode(frame)


def test_an_envelope_id_of_64_characters_is_accepted_at_decode() -> None:
    frame = _frame(STATUS, _status_body(), header=_header(run_id="r" * 64, device_id="A-z_0.9" * 9 + "d"))
    assert decode(frame).envelope.device_id == "A-z_0.9" * 9 + "d"


@pytest.mark.parametrize("created_at", [NAN, INF, -INF])
def test_a_created_at_that_is_not_finite_is_refused_at_decode(created_at: float) -> None:
    with pytest.raises(MalformedError, match="created_at: must be a finite number"):
        decode(_frame(STATUS, _status_body(), header=_header(created_at=created_at)))


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (_chunk_body(count=70_000, total=10**6), "a set of 70000 chunks exceeds the limit of 65536"),
        (_chunk_body(total=2**31), f"chunked message of {2**31} bytes exceeds the limit of {256 * 1024 * 1024}"),
        # the limits are checked while parsing, before the (also broken) chunk rules
        (_chunk_body(index=80_000, count=70_000, total=10**6), "a set of 70000 chunks exceeds the limit"),
    ],
)
def test_chunk_sets_beyond_the_limits_are_refused(body: bytes, message: str) -> None:
    with pytest.raises(LimitError, match=message):
        decode(_frame(CHUNK, body))


def test_the_chunk_count_limit_is_configurable() -> None:
    frame = _frame(CHUNK, _chunk_body(count=10, total=100))
    assert decode(frame, Limits(max_chunks=10)).count == 10
    with pytest.raises(LimitError, match="a set of 10 chunks exceeds the limit of 9"):
        decode(frame, Limits(max_chunks=9))


# --- encode refuses what it cannot write (always as MalformedError) ------------------------------

QUANTIZED = quantize(np.ones((2, 3), np.float32), 8, rng=np.random.default_rng(0))
LABELS = Tensor.from_numpy(np.zeros(2, np.int64))
TELEMETRY = Telemetry(1.0, 2.0, 3.0, "measured", 10, 20, 5)


@pytest.mark.parametrize(
    ("message", "error"),
    [
        (Status(Envelope("r", 1, "d", 0, "yesterday"), True), "created_at: must be a finite number, got 'yesterday'"),
        (RoundPlan(ENV, 2**32, 1.0, 1, 1, 0.5, ()), "model_version: must be an integer"),
        (RoundPlan(ENV, 1, 1.0, 2**16, 1, 0.5, ()), r"local_epochs: must be an integer in \[1, 65535\]"),
        (RoundPlan(ENV, 1, 1.0, 1, 1, 0.5, (), "lion"), "optimizer must be one of sgd, adam, adamw, got 'lion'"),
        (ModelWeights(ENV, 1, (("w", Tensor("bool", (1,), b"\x01")),)), "dtype 'bool' cannot travel"),
        (
            Activations(
                ENV,
                QuantizedTensor(8, (1,), "channel", np.zeros(1, np.float32), np.ones(1, np.float32), b"\x00"),
                Tensor.from_numpy(np.zeros(1, np.int64)),
            ),
            "per must be one of",
        ),
        (Hello(ENV, "p", "b", "v", 2**32), "num_samples: must be an integer"),
        (Hello(ENV, "p", "b", "v", 1, skipped_samples=2**32), "skipped_samples: must be an integer"),
        (Hello(ENV, "p", "b", "v", 1, skipped_samples=-1), "skipped_samples: must be an integer"),
        (RoundPlan(ENV, 1, 1.0, 1, 1, 0.5, (), num_classes=2**16), r"num_classes: must be an integer in \[0, 65535\]"),
        (RoundPlan(ENV, 1, 1.0, 1, 1, 0.5, (), classes_digest=bytes(31)), "classes_digest: must be 32 bytes, got 31 bytes"),
        (RoundPlan(ENV, 1, 1.0, 1, 1, 0.5, (), classes_digest=bytes(33)), "classes_digest: must be 32 bytes, got 33 bytes"),
        (RoundPlan(ENV, 1, 1.0, 1, 1, 0.5, (), classes_digest="0" * 32), "classes_digest: must be 32 bytes, got '0"),
        (RoundPlan(ENV, 1, 1.0, 1, 1, 0.5, (), crop_padding=65), r"crop_padding: must be an integer in \[0, 64\], got 65"),
        (RoundPlan(ENV, 1, 1.0, 1, 1, 0.5, (), crop_padding=-1), r"crop_padding: must be an integer in \[0, 64\], got -1"),
        (Chunk(ENV, 2**64, 0, 1, 1, b"x"), "message_id: must be an integer"),
        (RoundUpdate(ENV, 1, 1, (), dataclasses.replace(TELEMETRY, bytes_sent=2**64)), "telemetry bytes_sent: must be an integer"),
        (RoundUpdate(ENV, 1, 1, (), dataclasses.replace(TELEMETRY, energy_source="guessed")), "telemetry energy_source: must be one of"),
    ],
    ids=[
        "created_at text", "version 2**32", "epochs 2**16", "optimizer lion", "dtype bool", "granularity channel", "samples 2**32",
        "skipped 2**32", "skipped -1", "num_classes 2**16", "digest 31 bytes", "digest 33 bytes", "digest text", "crop 65", "crop -1",
        "message_id 2**64", "bytes 2**64", "energy source",
    ],
)
def test_encode_refuses_values_the_wire_cannot_carry(message: object, error: str) -> None:
    with pytest.raises(MalformedError, match=error):
        encode(message)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "message",
    [
        RoundPlan(ENV, 1, 1.0, 1, 1, 1e39, ()),
        RoundPlan(ENV, 1, 1.0, 1, 1, 0.5, (Allocation("d", 8, 8, 1e39, 1e6),)),
        Gradient(ENV, QUANTIZED, -1e39),
    ],
    ids=["lr", "tx_power_w", "loss"],
)
def test_values_beyond_float32_range_travel_as_float64(message: object) -> None:
    # These fields used to be float32 on the wire (where 1e39 overflows); they are float64 now.
    assert decode(encode(message)) == message  # type: ignore[arg-type]


# Exceptions from Python itself (struct.error, OverflowError, TypeError, AttributeError,
# ValueError) while checking or writing come out of encode as MalformedError "cannot encode".
WRAPPED = {
    "lr int beyond float": (RoundPlan(ENV, 1, 1.0, 1, 1, 10**400, ()), OverflowError),
    "profile None": (Hello(ENV, None, "b", "v", 1), AttributeError),  # type: ignore[arg-type]
    "reason bytes": (Status(ENV, True, b"ok"), AttributeError),  # type: ignore[arg-type]
    "lone surrogate": (ErrorReport(ENV, "c", "\ud800"), UnicodeEncodeError),
    "weights None": (ModelWeights(ENV, 1, None), TypeError),  # type: ignore[arg-type]
    "weight not a pair": (ModelWeights(ENV, 1, (("w",),)), ValueError),  # type: ignore[arg-type]
    "telemetry None": (RoundUpdate(ENV, 1, 1, (), None), AttributeError),  # type: ignore[arg-type]
    "allocation None": (RoundPlan(ENV, 1, 1.0, 1, 1, 0.5, (None,)), AttributeError),  # type: ignore[arg-type]
    "labels None": (Activations(ENV, QUANTIZED, None), AttributeError),  # type: ignore[arg-type]
}


@pytest.mark.parametrize("name", list(WRAPPED))
def test_every_failure_during_encode_is_a_malformed_error(name: str) -> None:
    # Prepare
    message, cause = WRAPPED[name]
    # Execute
    with pytest.raises(MalformedError, match=f"cannot encode {type(message).__name__}") as caught:
        encode(message)
    # Assert: the original error is kept as the cause
    assert isinstance(caught.value.__cause__, cause), repr(caught.value.__cause__)


@pytest.mark.parametrize(("up", "shown"), [(8.0, "8.0"), (True, "True")])
def test_a_bit_width_that_is_not_an_int_is_refused_by_the_rule(up: object, shown: str) -> None:
    # Prepare: 8.0 and True compare equal to bit widths, yet a u8 on the wire needs an int
    plan = RoundPlan(ENV, 1, 1.0, 1, 1, 0.5, (Allocation("d", up, 8, 0.5, 1e6),))  # type: ignore[arg-type]

    # Execute
    with pytest.raises(MalformedError) as caught:
        encode(plan)

    # Assert
    assert str(caught.value) == f"allocation 'd' bits_up: {shown} is not one of 1..8, 16, 32"
    assert caught.value.__cause__ is None


def _float_payload(bits: int, values: list[float]) -> QuantizedTensor:
    """A q=16/q=32 tensor carrying ``values`` as is (the quantizer itself refuses NaN and inf)."""
    payload = np.array(values, "<f2" if bits == 16 else "<f4").tobytes()
    return QuantizedTensor(bits, (1, len(values)), "tensor", np.zeros(0, np.float32), np.zeros(0, np.float32), payload)


# Messages breaking one rule each that the writer could put on the wire; encode must refuse them
# as the decoder would, and with the rules switched off the decoder does refuse what is written.
BROKEN = {
    "bits_up 9": RoundPlan(ENV, 1, 1.0, 1, 1, 0.5, (Allocation("d", 9, 8, 0.5, 1e6),)),
    "deadline NaN": RoundPlan(ENV, 1, NAN, 1, 1, 0.5, ()),
    "deadline 0": RoundPlan(ENV, 1, 0.0, 1, 1, 0.5, ()),
    "epochs 0": RoundPlan(ENV, 1, 1.0, 0, 1, 0.5, ()),
    "batch 0": RoundPlan(ENV, 1, 1.0, 1, 0, 0.5, ()),
    "lr negative": RoundPlan(ENV, 1, 1.0, 1, 1, -0.1, ()),
    "lr inf": RoundPlan(ENV, 1, 1.0, 1, 1, INF, ()),
    "device twice": RoundPlan(ENV, 1, 1.0, 1, 1, 0.5, (Allocation("d", 8, 8, 0.5, 1e6), Allocation("d", 4, 4, 0.5, 1e6))),
    "allocation id": RoundPlan(ENV, 1, 1.0, 1, 1, 0.5, (Allocation("d/1", 8, 8, 0.5, 1e6),)),
    "power NaN": RoundPlan(ENV, 1, 1.0, 1, 1, 0.5, (Allocation("d", 8, 8, NAN, 1e6),)),
    "bandwidth negative": RoundPlan(ENV, 1, 1.0, 1, 1, 0.5, (Allocation("d", 8, 8, 0.5, -1.0),)),
    "crop_padding 65": RoundPlan(ENV, 1, 1.0, 1, 1, 0.5, (), crop_padding=65),
    "tensor bytes != shape": ModelWeights(ENV, 1, (("w", Tensor("float32", (3,), bytes(4))),)),
    "weight NaN": ModelWeights(ENV, 1, (("w", Tensor.from_numpy(np.array([1.0, NAN], np.float32))),)),
    "weight inf": ModelWeights(ENV, 1, (("w", Tensor.from_numpy(np.array([INF], np.float64))),)),
    "duplicate weight names": ModelWeights(ENV, 1, (("w", LABELS), ("w", LABELS))),
    "empty weight name": ModelWeights(ENV, 1, (("", LABELS),)),
    "q=32 NaN": Gradient(ENV, _float_payload(32, [1.0, NAN]), 0.5),
    "q=16 inf": Gradient(ENV, _float_payload(16, [1.0, INF]), 0.5),
    "empty quantized": Gradient(ENV, QuantizedTensor(8, (0, 3), "tensor", np.zeros(1, np.float32), np.ones(1, np.float32), b""), 0.5),
    "loss NaN": Gradient(ENV, QUANTIZED, NAN),
    "scalar activations": Activations(ENV, QuantizedTensor(8, (), "tensor", np.zeros(1, np.float32), np.ones(1, np.float32), b"\x00"), LABELS),
    "labels count": Activations(ENV, QUANTIZED, Tensor.from_numpy(np.zeros(3, np.int64))),
    "labels negative": Activations(ENV, QUANTIZED, Tensor.from_numpy(np.array([0, -1], np.int64))),
    "labels float": Activations(ENV, QUANTIZED, Tensor.from_numpy(np.zeros(2, np.float32))),
    "labels 2-D": Activations(ENV, QUANTIZED, Tensor.from_numpy(np.zeros((2, 1), np.int64))),
    "energy negative": RoundUpdate(ENV, 1, 1, (), dataclasses.replace(TELEMETRY, energy_j=-1.0)),
    "uplink inf": RoundUpdate(ENV, 1, 1, (), dataclasses.replace(TELEMETRY, uplink_time_s=INF)),
    "chunk index = count": Chunk(ENV, 1, 5, 5, 100, b"x"),
    "chunk count 0": Chunk(ENV, 1, 0, 0, 100, b"x"),
    "chunk count > total": Chunk(ENV, 1, 0, 200, 100, b"x"),
    "chunk empty": Chunk(ENV, 1, 0, 1, 100, b""),
    "chunk data > total": Chunk(ENV, 1, 0, 1, 2, b"xyz"),
    "run_id unicode": Status(Envelope("ран", 1, "d", 0, 1.0), True),
    "device_id slash": Status(Envelope("r", 1, "a/b", 0, 1.0), True),
    "device_id empty": Hello(Envelope("r", 1, "", 0, 1.0), "p", "b", "v", 1),
    "created_at NaN": Status(Envelope("r", 1, "d", 0, NAN), True),
}


@pytest.mark.parametrize("name", list(BROKEN))
def test_encode_refuses_what_decode_would_refuse(name: str) -> None:
    with pytest.raises(MalformedError):
        encode(BROKEN[name])


@pytest.mark.parametrize("name", list(BROKEN))
def test_decode_refuses_what_encode_refuses(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: write the broken message with the rules switched off (what an older or foreign
    # encoder could send), then switch them back on.
    with monkeypatch.context() as patched:
        patched.setattr(codec, "check_message", lambda message: None)
        frame = encode(BROKEN[name])
    # Execute / Assert: the decoder applies the same rule
    with pytest.raises(MalformedError):
        decode(frame)


def test_the_rules_switched_off_would_let_a_broken_message_through(monkeypatch: pytest.MonkeyPatch) -> None:
    # The control for the test above: with the rules off on both sides the frame decodes, so the
    # refusal there comes from the rules and not from the writer producing garbage.
    monkeypatch.setattr(codec, "check_message", lambda message: None)
    decoded = decode(encode(BROKEN["deadline 0"]))
    assert decoded.deadline_s == 0.0


def test_duplicate_weight_names_are_refused() -> None:
    frame = _frame(MODEL, _model_body(("w", _tensor(1, (2,))), ("w", _tensor(1, (3,)))))
    with pytest.raises(MalformedError, match="weights: names appear twice: w"):
        decode(frame)
    with pytest.raises(MalformedError, match="weights: names appear twice: w"):
        encode(ModelWeights(ENV, 1, (("w", Tensor.from_numpy(np.zeros(2, np.float32))), ("w", Tensor.from_numpy(np.zeros(3, np.float32))))))


# --- flags are real booleans on both sides -------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        Status(ENV, 2, "x"),  # type: ignore[arg-type]
        Status(ENV, 1.5, "x"),  # type: ignore[arg-type]
        Hello(ENV, "p", "b", "v", 1, heartbeat=2),  # type: ignore[arg-type]
        RoundPlan(ENV, 1, 1.0, 1, 1, 0.5, (Allocation("d", 8, 8, 0.5, 1e6, per_token=2),)),  # type: ignore[arg-type]
        RoundPlan(ENV, 1, 1.0, 1, 1, 0.5, (), hflip=2),  # type: ignore[arg-type]
        RoundPlan(ENV, 1, 1.0, 1, 1, 0.5, (), hflip=1),  # type: ignore[arg-type]
    ],
    ids=["online 2", "online 1.5", "heartbeat 2", "per_token 2", "hflip 2", "hflip 1"],
)
def test_encode_refuses_a_flag_that_is_not_a_bool(message: Message) -> None:
    with pytest.raises(MalformedError, match="must be True or False"):
        encode(message)
