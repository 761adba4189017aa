"""Property tests: whatever bytes arrive, decoding refuses them with a ProtocolError or returns a
message, within memory bounded by the limits; reassembly keeps its buffers within its limits.

The seeds are the round-trip examples of every message type. Mutated frames are tried with the
CRC left as is (the integrity check must catch them) and with it recomputed, which is what gets
a mutation past the integrity check into the body parsers.
"""

from __future__ import annotations

import math
import struct
import tracemalloc
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_runtime.protocol import (
    Chunk,
    Envelope,
    LimitError,
    Limits,
    Message,
    ModelWeights,
    ProtocolError,
    Reassembler,
    decode,
    encode,
    split,
    weights_from_numpy,
)
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
    frame = encode(message)
    again = decode(frame, Limits(max_frame_bytes=2**31))
    assert type(again) is type(message)
    assert encode(again) == frame
    if message == message:  # noqa: PLR0124 - False only when a float field is NaN
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


@st.composite
def chunk_streams(draw: st.DrawFn) -> list[tuple[bytes, float]]:
    """Chunk frames in any order, some repeated, some mutated, with time passing between them."""
    stream = []
    for _ in range(draw(st.integers(1, 40))):
        frame = draw(st.sampled_from(CHUNK_FRAMES))
        if draw(st.integers(0, 3)) == 0:
            frame, _ = draw(mutated_frames([frame]))
        stream.append((frame, draw(st.sampled_from([0.0, 0.0, 0.0, 1.0, 200.0]))))
    return stream


def test_the_chunk_seeds_need_reassembly() -> None:
    decoded = [decode(frame) for frame in CHUNK_FRAMES]
    assert all(isinstance(chunk, Chunk) for chunk in decoded)
    assert len({(c.envelope.device_id, c.message_id) for c in decoded}) == 4
    assert all(len(frame) <= 400 for frame in CHUNK_FRAMES)


@settings(FUZZ, max_examples=200)
@given(chunk_streams())
def test_reassembly_of_mutated_chunk_streams_stays_within_its_limits(stream: list[tuple[bytes, float]]) -> None:
    # Prepare
    clock = _Clock()
    reassembler = Reassembler(SMALL, max_sets_per_device=MAX_SETS, max_buffered_bytes=MAX_BUFFERED, expiry_s=120.0, clock=clock)
    devices: set[str] = set()
    for frame, advance in stream:
        clock.now += advance
        sender = _decode_or_refuse(frame)
        if isinstance(sender, Chunk):
            devices.add(sender.envelope.device_id)
        # Execute
        try:
            message = reassembler.feed(frame)
        except ProtocolError:
            message = None
        # Assert
        assert reassembler.buffered_bytes <= MAX_BUFFERED
        assert reassembler.pending_sets <= MAX_SETS * max(len(devices), 1)
        if message is not None:
            assert not isinstance(message, Chunk)
            if isinstance(sender, Chunk):
                assert message.envelope.device_id == sender.envelope.device_id


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
