"""Property tests: whatever bytes arrive, decoding refuses them with a ProtocolError or returns a
message, within memory bounded by the limits; reassembly keeps its buffers within its limits and
delivers a set once; whatever message is built, encode refuses it with a MalformedError exactly
when decode would refuse what it writes.

The seeds are the round-trip examples of every message type. Mutated frames are tried with the
CRC left as is (the integrity check must catch them) and with it recomputed, which is what gets
a mutation past the integrity check into the body parsers.
"""

from __future__ import annotations

import dataclasses
import math
import re
import struct
import tracemalloc
import zlib
from dataclasses import dataclass
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edge_runtime.protocol import (
    Activations,
    Allocation,
    Chunk,
    Envelope,
    ErrorReport,
    Gradient,
    Hello,
    LimitError,
    Limits,
    MalformedError,
    Message,
    ModelWeights,
    ProtocolError,
    Reassembler,
    RoundPlan,
    RoundUpdate,
    Status,
    Telemetry,
    Tensor,
    codec,
    decode,
    encode,
    split,
    weights_from_numpy,
)
from edge_runtime.protocol.messages import DTYPE_CODES
from edge_runtime.quantize import QuantizedTensor, quantize
from test_protocol_roundtrip import ALL_EXAMPLES

FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SEEDS = [encode(message) for message in ALL_EXAMPLES]
SMALL = Limits(max_frame_bytes=16 * 1024, max_elements=4096, max_tensors=32, max_allocations=32, max_chunks=64)
# For the memory bounds: small frames, but shapes may declare far more than a frame can hold, so a
# decoder that allocated what a header declares would show up as a peak far above the bound.
MEMORY = Limits(max_frame_bytes=16 * 1024, max_elements=2**22, max_tensors=32, max_allocations=32, max_chunks=64)
ITEMSIZE = {1: 4, 2: 2, 3: 8, 4: 4, 5: 1, 6: 1, 7: 2, 8: 8}
PREFIX = struct.Struct("<4sBBHI")
INTERESTING_U32 = [0, 1, 2, 3, 7, 8, 9, 16, 255, 256, 4096, 4097, 2**16 - 1, 2**16, 2**31 - 1, 2**31, 2**32 - 1]


def _decode_or_refuse(data: bytes, limits: Limits = SMALL) -> Message | None:
    """The decoded message, or None for a ProtocolError; anything else escapes and fails."""
    try:
        return decode(data, limits)
    except ProtocolError:
        return None


def _fix_crc(frame: bytes) -> bytes:
    if len(frame) < 4:
        return frame
    return frame[:-4] + struct.pack("<I", zlib.crc32(frame[:-4]))


def _fix_lengths(frame: bytes) -> bytes:
    """body_len set to what the frame holds, so inserted or deleted bytes reach the parsers."""
    if len(frame) < PREFIX.size + 4:
        return frame
    magic, version, code, header_len, _ = PREFIX.unpack_from(frame)
    body_len = len(frame) - PREFIX.size - header_len - 4
    if body_len < 0:
        return frame
    return PREFIX.pack(magic, version, code, header_len, body_len) + frame[PREFIX.size :]


@st.composite
def _mutation(draw: st.DrawFn, frame: bytes) -> bytes:
    data = bytearray(frame)
    last = max(len(data) - 1, 0)
    position = draw(st.integers(min(PREFIX.size, last), last) | st.integers(0, last))  # mostly past the prefix
    kind = draw(st.sampled_from(["flip", "byte", "u32", "insert", "delete", "truncate", "splice"]))
    if kind == "flip" and data:
        data[position] ^= 1 << draw(st.integers(0, 7))
    elif kind == "byte" and data:
        data[position] = draw(st.sampled_from([0, 1, 2, 8, 9, 16, 17, 32, 0x7F, 0x80, 0xC0, 0xFF]))
    elif kind == "u32":
        value = draw(st.sampled_from(INTERESTING_U32) | st.integers(0, 2**32 - 1))
        data[position : position + 4] = struct.pack("<I", value)
    elif kind == "insert":
        data[position:position] = draw(st.binary(min_size=1, max_size=16))
    elif kind == "delete":
        del data[position : position + draw(st.integers(1, 16))]
    elif kind == "truncate":
        del data[position:]
    elif kind == "splice":
        other = draw(st.sampled_from(SEEDS))
        nearby = st.integers(min(max(0, position - 8), len(other)), min(len(other), position + 8))
        data = data[:position] + other[draw(nearby | st.integers(0, len(other))) :]
    return bytes(data)


@st.composite
def mutated_frames(draw: st.DrawFn, seeds: list[bytes] = SEEDS) -> tuple[bytes, str]:
    """A seed frame after 1-4 mutations, and how its prefix/CRC were then repaired."""
    frame = draw(st.sampled_from(seeds))
    for _ in range(draw(st.integers(1, 4))):
        frame = draw(_mutation(frame))
    repair = draw(st.sampled_from(["none", "crc", "lengths+crc"]))
    if repair == "lengths+crc":
        frame = _fix_lengths(frame)
    if repair != "none":
        frame = _fix_crc(frame)
    return frame, repair


@st.composite
def framed_noise(draw: st.DrawFn) -> bytes:
    """A valid prefix and CRC around a random header and body: straight into the parsers."""
    header = draw(st.binary(max_size=64) | st.just(SEEDS[0][12 : 12 + struct.unpack_from("<H", SEEDS[0], 6)[0]]))
    body = draw(st.binary(max_size=512))
    code = draw(st.integers(1, 9))
    frame = PREFIX.pack(b"SFLM", 1, code, len(header), len(body)) + header + body
    return frame + struct.pack("<I", zlib.crc32(frame))


def _assert_reencodes_to_an_equal_message(message: Message) -> None:
    # Every float the decoder accepts is finite, so a decoded message always equals itself.
    frame = encode(message)
    again = decode(frame, Limits(max_frame_bytes=2**31))
    assert type(again) is type(message)
    assert encode(again) == frame
    assert again == message


# --- decode never raises anything but ProtocolError ----------------------------------------------


@settings(FUZZ, max_examples=300)
@given(st.binary(max_size=4096))
def test_random_bytes_are_refused_with_a_protocol_error(data: bytes) -> None:
    _decode_or_refuse(data)


@settings(FUZZ, max_examples=600)
@given(framed_noise())
def test_random_bodies_behind_a_valid_prefix_are_refused_or_decoded(frame: bytes) -> None:
    message = _decode_or_refuse(frame)
    if message is not None:
        _assert_reencodes_to_an_equal_message(message)


@settings(FUZZ, max_examples=1000)
@given(mutated_frames())
def test_mutated_frames_are_refused_or_decode_to_a_message_that_round_trips(case: tuple[bytes, str]) -> None:
    # Execute
    frame, repair = case
    message = _decode_or_refuse(frame, Limits())
    # Assert
    if message is None:
        return
    if repair == "none":  # only a mutation that changed nothing covered by the CRC can decode
        assert frame in SEEDS
    _assert_reencodes_to_an_equal_message(message)


def test_the_mutations_do_reach_the_body_parsers() -> None:
    # A fuzz test whose inputs all die at the CRC check tests nothing; count where they end.
    outcomes: dict[str, int] = {}

    @settings(FUZZ, max_examples=300)
    @given(mutated_frames())
    def run(case: tuple[bytes, str]) -> None:
        frame, _ = case
        try:
            decode(frame)
            outcome = "decoded"
        except ProtocolError as exc:
            outcome = type(exc).__name__
        outcomes[outcome] = outcomes.get(outcome, 0) + 1

    run()
    assert outcomes.get("IntegrityError", 0) > 0
    assert outcomes.get("MalformedError", 0) + outcomes.get("LimitError", 0) > 0
    assert outcomes.get("decoded", 0) > 0
    assert outcomes.get("TruncatedError", 0) + outcomes.get("TrailingBytesError", 0) > 0


# --- memory stays bounded by what was received and the limits ------------------------------------


def _peak_traced(data: bytes) -> int:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        _decode_or_refuse(data, MEMORY)
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def _memory_bound(data: bytes) -> int:
    return 4 * len(data) + 64 * 1024


@settings(FUZZ, max_examples=400)
@given(mutated_frames() | framed_noise())
def test_decode_memory_is_bounded_by_the_input_and_the_limits(case: tuple[bytes, str] | bytes) -> None:
    data = case[0] if isinstance(case, tuple) else case
    assert _peak_traced(data) <= _memory_bound(data)


@st.composite
def claimed_shapes(draw: st.DrawFn) -> bytes:
    """Frames whose tensors declare shapes and sizes (mostly self-consistent) over little data."""
    env = SEEDS[0][12 : 12 + struct.unpack_from("<H", SEEDS[0], 6)[0]]
    dim = st.integers(0, 64) | st.integers(0, 2**13) | st.integers(2**14, 2**24) | st.sampled_from(INTERESTING_U32)
    # Mostly plausible ranks; (n, 0) has no elements but n per-token ranges; 9 dims is one too many.
    rank = draw(st.sampled_from([0, 1, 2, 2, 3, 4, 9]))
    shape = [draw(dim) for _ in range(rank)] if draw(st.integers(0, 3)) else [draw(dim), 0]
    dims = struct.pack("<B", len(shape)) + b"".join(struct.pack("<I", d) for d in shape)
    data = draw(st.binary(max_size=2048))
    count = math.prod(shape)
    if draw(st.booleans()):  # ModelWeights: version, one named plain tensor
        dtype_code = draw(st.integers(1, 8))
        size = draw(st.just(count * ITEMSIZE[dtype_code] % 2**32) | st.sampled_from(INTERESTING_U32))
        tensor = struct.pack("<B", dtype_code) + dims + struct.pack("<I", size) + data
        code, body = 4, struct.pack("<IH", 1, 1) + b"\x01\x00w" + tensor
    else:  # Activations: bits, granularity, shape, groups, lo, hi, payload size, payload
        bits, per = draw(st.sampled_from([1, 3, 8, 16, 32])), draw(st.integers(0, 1))
        groups = 0 if bits > 8 else (1 if per == 0 or not shape else math.prod(shape[:-1]))
        groups = draw(st.just(groups % 2**32) | st.sampled_from(INTERESTING_U32))
        code, body = 5, struct.pack("<BB", bits, per) + dims + struct.pack("<I", groups) + data
    frame = PREFIX.pack(b"SFLM", 1, code, len(env), len(body)) + env + body
    return frame + struct.pack("<I", zlib.crc32(frame))


@settings(FUZZ, max_examples=400)
@given(claimed_shapes())
def test_declared_shapes_never_allocate_beyond_what_was_received(frame: bytes) -> None:
    assert _peak_traced(frame) <= _memory_bound(frame)


def _declaring_frame(elements: int) -> bytes:
    """A ModelWeights frame declaring ``elements`` float32 values (and their size) but no data."""
    env = SEEDS[0][12 : 12 + struct.unpack_from("<H", SEEDS[0], 6)[0]]
    tensor = struct.pack("<BBI", 1, 1, elements) + struct.pack("<I", 4 * elements)
    body = struct.pack("<IH", 1, 1) + b"\x01\x00w" + tensor
    frame = PREFIX.pack(b"SFLM", 1, 4, len(env), len(body)) + env + body
    return frame + struct.pack("<I", zlib.crc32(frame))


def test_the_memory_bound_would_catch_a_decoder_trusting_a_declared_size() -> None:
    # A frame under 200 bytes declaring 2**22 float32 elements: allocating what it declares
    # (16 MiB) would break the bound by two orders of magnitude; refusing it stays within.
    frame = _declaring_frame(2**22)
    assert len(frame) < 200
    assert 4 * 2**22 > 100 * _memory_bound(frame)
    assert _peak_traced(frame) <= _memory_bound(frame)
    with pytest.raises(ProtocolError):
        decode(frame, MEMORY)


# --- reassembly under mutated chunk streams ------------------------------------------------------


def _chunk_frames() -> list[bytes]:
    rng = np.random.default_rng(5)
    frames = []
    for device, size in (("dev-a", 300), ("dev-b", 500), ("dev-a", 200), ("dev-a", 250)):
        weights = weights_from_numpy({"w": rng.normal(size=size).astype(np.float32)})
        frames += split(ModelWeights(Envelope("run", 1, device, 0, 1.0), 1, weights), 400)
    return frames


CHUNK_FRAMES = _chunk_frames()
MAX_SETS, MAX_BUFFERED = 1, 1500  # tight, so that the stream runs into both bounds


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _chunk_sets() -> list[list[bytes]]:
    sets: dict[tuple[str, int], list[bytes]] = {}
    for frame in CHUNK_FRAMES:
        chunk = decode(frame)
        sets.setdefault((chunk.envelope.device_id, chunk.message_id), []).append(frame)
    return list(sets.values())


CHUNK_SETS = _chunk_sets()


@st.composite
def chunk_streams(draw: st.DrawFn) -> list[tuple[bytes, float]]:
    """Chunk frames in any order, some repeated, some mutated, with time passing between them;
    now and then a whole set in a burst (a re-send), so that sets complete, and complete again."""
    stream = []
    for _ in range(draw(st.integers(1, 40))):
        if draw(st.integers(0, 4)) == 0:
            stream += [(frame, 0.0) for frame in draw(st.sampled_from(CHUNK_SETS))]
            continue
        frame = draw(st.sampled_from(CHUNK_FRAMES))
        if draw(st.integers(0, 3)) == 0:
            frame, _ = draw(mutated_frames([frame]))
        stream.append((frame, draw(st.sampled_from([0.0, 0.0, 0.0, 1.0, 200.0]))))
    return stream


def test_the_chunk_seeds_need_reassembly() -> None:
    decoded = [decode(frame) for frame in CHUNK_FRAMES]
    assert all(isinstance(chunk, Chunk) for chunk in decoded)
    assert len({(c.envelope.device_id, c.message_id) for c in decoded}) == 4 == len(CHUNK_SETS)
    assert all(len(frame) <= 400 for frame in CHUNK_FRAMES)


@settings(FUZZ, max_examples=200)
@given(chunk_streams())
def test_reassembly_of_mutated_chunk_streams_stays_within_its_limits(stream: list[tuple[bytes, float]]) -> None:
    # Prepare
    clock = _Clock()
    reassembler = Reassembler(SMALL, max_sets_per_device=MAX_SETS, max_buffered_bytes=MAX_BUFFERED, expiry_s=120.0, clock=clock)
    devices: set[str] = set()
    delivered: list[Message] = []
    for frame, advance in stream:
        clock.now += advance
        sender = _decode_or_refuse(frame)
        if isinstance(sender, Chunk):
            devices.add(sender.envelope.device_id)
        # Execute
        pending_before = reassembler.pending_sets
        try:
            message = reassembler.feed(frame)
        except LimitError:
            message = None
            assert reassembler.pending_sets <= pending_before  # a refused chunk opens no set
        except ProtocolError:
            message = None
        # Assert
        assert 0 <= reassembler.buffered_bytes <= MAX_BUFFERED
        assert reassembler.pending_sets <= MAX_SETS * max(len(devices), 1)
        if message is not None:
            assert not isinstance(message, Chunk)
            if isinstance(sender, Chunk):
                assert message.envelope.device_id == sender.envelope.device_id
                assert message not in delivered  # a set completes once, however often it is re-sent
            delivered.append(message)


def test_the_fuzzed_configuration_completes_a_clean_set_and_refuses_an_oversized_one() -> None:
    # The control for the property above: its bounds are tight, but not so tight that nothing
    # completes (dev-a's first message, 4 chunks) or that nothing is refused (dev-b's, 2 KB).
    reassembler = Reassembler(SMALL, max_sets_per_device=MAX_SETS, max_buffered_bytes=MAX_BUFFERED, clock=_Clock())
    decoded = [decode(frame) for frame in CHUNK_FRAMES]
    first_set = [f for f, c in zip(CHUNK_FRAMES, decoded) if c.message_id == decoded[0].message_id]
    oversized = [f for f, c in zip(CHUNK_FRAMES, decoded) if c.envelope.device_id == "dev-b"]
    assert [reassembler.feed(frame) for frame in first_set][-1] is not None
    with pytest.raises(LimitError):
        for frame in oversized:
            reassembler.feed(frame)


# --- encode and decode apply the same rules ------------------------------------------------------
#
# For every message type, messages are drawn either entirely from valid values or with one named
# field broken, so each case knows its outcome: a valid message must encode and come back equal; a
# broken one must be refused by encode with a MalformedError and, where a bare writer (the rules
# switched off) can still put it on the wire, refused by decode too. The boolean flags (heartbeat,
# online, per_token) are drawn from True/False only: test_protocol_errors.py documents the flag
# values encode writes and decode refuses.

NAN, INF = float("nan"), float("inf")
ID_RULE = r"[A-Za-z0-9_.-]{1,64}"


@dataclass(frozen=True)
class Field:
    """A field's valid values, the values a rule refuses, and whether a bare writer can write those."""

    valid: st.SearchStrategy
    invalid: st.SearchStrategy | None = None
    writable: bool = True


GOOD_IDS = st.from_regex(ID_RULE, fullmatch=True)
BAD_IDS = st.sampled_from(["", "ü", "a/b", "x" * 65, "+", "#", "dev 1", "dev\n", "装置"]) | st.text(min_size=1, max_size=3).filter(
    lambda text: re.fullmatch(ID_RULE, text) is None
)
ID = Field(GOOD_IDS, BAD_IDS)
U32 = Field(st.integers(0, 2**32 - 1), st.sampled_from([-1, 2**32]), writable=False)
U64 = Field(st.integers(0, 2**64 - 1), st.sampled_from([-1, 2**64]), writable=False)
FINITE = Field(st.floats(allow_nan=False, allow_infinity=False), st.sampled_from([NAN, INF, -INF]))
NON_NEGATIVE = Field(st.floats(min_value=0.0, allow_infinity=False), st.sampled_from([-1.0, -1e-300, NAN, INF]))
POSITIVE = Field(st.floats(min_value=0.0, exclude_min=True, allow_infinity=False), st.sampled_from([0.0, -0.0, -1.0, NAN, INF]))
TEXT8 = Field(st.text(max_size=20), st.sampled_from(["\ud800", "é" * 128]), writable=False)  # u8 length: 256 bytes is one too many
TEXT16 = Field(st.text(max_size=20), st.just("x\udfff"), writable=False)
FLAG = Field(st.booleans())
ENVELOPE_FIELDS = {"run_id": ID, "round": U32, "device_id": ID, "step": U32, "created_at": FINITE}


@st.composite
def _build(draw: st.DrawFn, cls: type, fields: dict[str, Field], bad: str | None) -> object:
    return cls(**{name: draw(field.invalid if name == bad else field.valid) for name, field in fields.items()})


ENVELOPE = Field(_build(Envelope, ENVELOPE_FIELDS, None))


@st.composite
def _tensor(draw: st.DrawFn, broken: bool) -> Tensor:
    dtype = draw(st.sampled_from(list(DTYPE_CODES)))
    shape = draw(st.sampled_from([(), (0,), (3,), (2, 2), (1, 2, 1)]))
    width = {"float16": 16, "float32": 32, "float64": 64}.get(dtype)
    elements = st.floats(width=width, allow_nan=False, allow_infinity=False) if width else None
    tensor = Tensor.from_numpy(draw(hnp.arrays(np.dtype(dtype), shape, elements=elements)))
    if not broken:
        return tensor
    how = draw(st.sampled_from(["short data", "long data"] + (["NaN", "inf"] if width and tensor.num_elements else [])))
    if how in ("NaN", "inf"):
        values = tensor.to_numpy().copy()
        values.flat[draw(st.integers(0, values.size - 1))] = NAN if how == "NaN" else -INF
        return Tensor.from_numpy(values)
    return Tensor(tensor.dtype, tensor.shape, tensor.data[:-1] if how == "short data" and tensor.data else tensor.data + b"\x00")


@st.composite
def _weights(draw: st.DrawFn, broken: bool) -> tuple[tuple[str, Tensor], ...]:
    names = draw(st.lists(st.text(min_size=1, max_size=10), max_size=3, unique=True))
    weights = [(name, draw(_tensor(False))) for name in names]
    if not broken:
        return tuple(weights)
    how = draw(st.sampled_from(["tensor", "empty name", "name twice"]))
    if how == "tensor" or not weights:
        weights.append((draw(st.text(min_size=1, max_size=10).filter(lambda n: n not in names)), draw(_tensor(True))))
    elif how == "empty name":
        weights.append(("", draw(_tensor(False))))
    else:
        weights.insert(draw(st.integers(0, len(weights))), (draw(st.sampled_from(names)), draw(_tensor(False))))
    return tuple(weights)


WEIGHTS = Field(_weights(False), _weights(True))


@st.composite
def _quantized(draw: st.DrawFn, broken: bool, batch_dimension: bool) -> QuantizedTensor:
    shape = draw(st.sampled_from([(1,), (3,), (2, 3), (2, 1, 4)] + ([] if batch_dimension else [()])))
    width, per = draw(st.sampled_from([1, 2, 3, 5, 8, 16, 32])), draw(st.sampled_from(["tensor", "token"]))
    values = draw(hnp.arrays(np.float32, shape, elements=st.floats(-100.0, 100.0, width=32)))
    tensor = quantize(values, width, per=per, rng=np.random.default_rng(draw(st.integers(0, 3))))
    if not broken:
        return tensor
    how = draw(st.sampled_from(["bits", "empty", "not finite"] + (["scalar"] if batch_dimension else [])))
    if how == "bits":
        return dataclasses.replace(tensor, bits=draw(st.sampled_from([0, 9, 15, 17, 33])))
    if how == "empty":
        empty = draw(st.sampled_from([(0,), (0, 3), (2, 0)]))
        groups = 1 if per == "tensor" else math.prod(empty[:-1])
        return QuantizedTensor(8, empty, per, np.zeros(groups, np.float32), np.ones(groups, np.float32), b"")
    if how == "scalar":
        return QuantizedTensor(8, (), "tensor", np.zeros(1, np.float32), np.ones(1, np.float32), b"\x07")
    float_width = draw(st.sampled_from([16, 32]))
    payload = np.full(math.prod(shape), draw(st.sampled_from([NAN, INF, -INF])), "<f2" if float_width == 16 else "<f4").tobytes()
    return QuantizedTensor(float_width, shape, per, np.zeros(0, np.float32), np.zeros(0, np.float32), payload)


@st.composite
def _labels(draw: st.DrawFn, batch: int, broken: bool) -> Tensor:
    dtype = draw(st.sampled_from(["uint8", "uint16", "int32", "int64"]))
    values = draw(hnp.arrays(np.dtype(dtype), (batch,), elements=st.integers(0, 255)))
    if not broken:
        return Tensor.from_numpy(values)
    how = draw(st.sampled_from(["count", "2-D", "float", "int8", "negative"]))
    if how == "count":
        return Tensor.from_numpy(np.zeros(batch + draw(st.sampled_from([-1, 1])), dtype))
    if how == "2-D":
        return Tensor.from_numpy(values.reshape(batch, 1))
    if how in ("float", "int8"):
        return Tensor.from_numpy(values.astype("float32" if how == "float" else "int8"))
    signed = values.astype(draw(st.sampled_from(["int32", "int64"])))
    signed[draw(st.integers(0, batch - 1))] = -draw(st.integers(1, 2**31))
    return Tensor.from_numpy(signed)


@st.composite
def _activations(draw: st.DrawFn, bad: str | None) -> Activations:
    tensor = draw(_quantized(bad == "tensor", batch_dimension=True))
    batch = tensor.shape[0] if tensor.shape else 1
    return Activations(draw(ENVELOPE.valid), tensor, draw(_labels(batch, bad == "labels")))


BITS = Field(st.sampled_from([1, 2, 3, 4, 5, 6, 7, 8, 16, 32]), st.sampled_from([0, 9, 15, 17, 31, 33, 64]))
ALLOCATION_FIELDS = {"device_id": ID, "bits_up": BITS, "bits_down": BITS, "tx_power_w": NON_NEGATIVE, "bandwidth_hz": NON_NEGATIVE, "per_token": FLAG}


@st.composite
def _allocations(draw: st.DrawFn, broken: bool) -> tuple[Allocation, ...]:
    devices = draw(st.lists(GOOD_IDS, max_size=3, unique=True))
    allocations = [dataclasses.replace(draw(_build(Allocation, ALLOCATION_FIELDS, None)), device_id=d) for d in devices]
    if broken:
        how = draw(st.sampled_from(["device_id", "bits_up", "bits_down", "tx_power_w", "bandwidth_hz", "twice"]))
        if how == "twice" and devices:
            allocations.append(dataclasses.replace(draw(_build(Allocation, ALLOCATION_FIELDS, None)), device_id=draw(st.sampled_from(devices))))
        else:
            allocations.append(draw(_build(Allocation, ALLOCATION_FIELDS, "device_id" if how == "twice" else how)))
    return tuple(allocations)


TELEMETRY_FIELDS = {
    "compute_time_s": NON_NEGATIVE, "uplink_time_s": NON_NEGATIVE, "energy_j": NON_NEGATIVE,
    "energy_source": Field(st.sampled_from(["measured", "estimated"])), "bytes_sent": U64, "bytes_received": U64, "steps": U32,
}


@st.composite
def _telemetry(draw: st.DrawFn, broken: bool) -> Telemetry:
    bad = draw(st.sampled_from(["compute_time_s", "uplink_time_s", "energy_j"])) if broken else None
    return draw(_build(Telemetry, TELEMETRY_FIELDS, bad))


@st.composite
def _chunk(draw: st.DrawFn, bad: str | None) -> Chunk:
    count, data = draw(st.integers(1, 6)), draw(st.binary(min_size=1, max_size=16))
    least = max(count, len(data))
    fields = {
        "envelope": ENVELOPE,
        "message_id": U64,
        "index": Field(st.integers(0, count - 1), st.sampled_from([count, count + 1, 2**32 - 1])),
        "count": Field(st.just(count), st.just(0)),
        "total_size": Field(st.integers(least, 2**32 - 1), st.integers(1, least - 1) if least > 1 else st.just(0)),
        "data": Field(st.just(data), st.just(b"")),
    }
    chunk = draw(_build(Chunk, fields, bad))
    return dataclasses.replace(chunk, index=0) if bad == "count" else chunk


FIELDS: dict[type[Message], dict[str, Field]] = {
    Hello: {"envelope": ENVELOPE, "profile": TEXT8, "backend": TEXT8, "software_version": TEXT8, "num_samples": U32, "heartbeat": FLAG},
    Status: {"envelope": ENVELOPE, "online": FLAG, "reason": TEXT16},
    RoundPlan: {
        "envelope": ENVELOPE, "model_version": U32, "deadline_s": POSITIVE,
        "local_epochs": Field(st.integers(1, 2**16 - 1), st.just(0)), "batch_size": Field(st.integers(1, 2**32 - 1), st.just(0)),
        "lr": NON_NEGATIVE, "allocations": Field(_allocations(False), _allocations(True)),
    },
    ModelWeights: {"envelope": ENVELOPE, "version": U32, "weights": WEIGHTS},
    Gradient: {"envelope": ENVELOPE, "tensor": Field(_quantized(False, False), _quantized(True, False)), "loss": FINITE},
    RoundUpdate: {
        "envelope": ENVELOPE, "model_version": U32, "num_samples": U32, "weights": WEIGHTS,
        "telemetry": Field(_telemetry(False), _telemetry(True)),
    },
    ErrorReport: {"envelope": ENVELOPE, "code": TEXT8, "detail": TEXT16},
}
CUSTOM = {  # types whose fields depend on each other: (builder, {broken field: writable})
    Activations: (_activations, {"tensor": True, "labels": True}),
    Chunk: (_chunk, {"message_id": False, "index": True, "count": True, "total_size": True, "data": True}),
}


def _case_strategy(cls: type[Message], bad: str | None) -> st.SearchStrategy:
    if bad is not None and bad.startswith("envelope."):  # the envelope's own rules, on a Status
        envelope = _build(Envelope, ENVELOPE_FIELDS, bad.removeprefix("envelope."))
        return st.builds(Status, envelope, st.booleans(), TEXT16.valid)
    if cls in CUSTOM:
        return CUSTOM[cls][0](bad)
    return _build(cls, FIELDS[cls], bad)


# (type, broken field or None, whether a bare writer can write the broken message)
RULE_CASES = (
    [(cls, None, True) for cls in [*FIELDS, *CUSTOM]]
    + [(cls, name, field.writable) for cls, fields in FIELDS.items() for name, field in fields.items() if field.invalid is not None]
    + [(cls, name, writable) for cls, (_, breakable) in CUSTOM.items() for name, writable in breakable.items()]
    + [(Status, f"envelope.{name}", field.writable) for name, field in ENVELOPE_FIELDS.items()]
)
ANY_SIZE = Limits(max_frame_bytes=2**32, max_elements=2**40, max_tensors=2**16, max_allocations=2**16, max_chunks=2**32)


def _write_without_the_rules(message: Message) -> bytes | None:
    """What an encoder without the rules would send; None when the writer cannot write it."""
    with mock.patch.object(codec, "check_message", lambda message: None):
        try:
            return encode(message)
        except MalformedError:
            return None


def test_every_message_type_has_rule_cases() -> None:
    assert {cls for cls, _, _ in RULE_CASES} == set(codec.CODECS)
    assert len(RULE_CASES) > 40


@pytest.mark.parametrize(
    ("cls", "bad", "writable"), RULE_CASES, ids=[f"{cls.__name__}-{bad or 'valid'}" for cls, bad, _ in RULE_CASES]
)
def test_encode_refuses_exactly_what_decode_would_refuse(cls: type[Message], bad: str | None, writable: bool) -> None:
    @settings(FUZZ, max_examples=40 if bad is None else 15)
    @given(_case_strategy(cls, bad))
    def check(message: Message) -> None:
        if bad is None:
            # Execute: a valid message is written (any exception fails the test) ...
            frame = encode(message)
            # Assert: ... and read back unchanged
            decoded = decode(frame, ANY_SIZE)
            assert decoded == message
            assert encode(decoded) == frame
            return
        # Execute / Assert: refused as MalformedError (anything else escaping fails the test) ...
        with pytest.raises(MalformedError):
            encode(message)
        # ... and, where a bare writer can put it on the wire, refused by the decoder too
        written = _write_without_the_rules(message)
        assert (written is not None) == writable
        if written is not None:
            with pytest.raises(MalformedError):
                decode(written, ANY_SIZE)

    check()
