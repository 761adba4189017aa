"""Frames over the publish limit travel as chunks and come back whole, once, within bounds."""

from __future__ import annotations

import random

import numpy as np
import pytest

from edge_runtime.protocol import chunking
from edge_runtime.protocol import (
    Chunk,
    ChunkError,
    Envelope,
    ErrorReport,
    LimitError,
    MalformedError,
    Message,
    ModelWeights,
    Reassembler,
    Status,
    decode,
    encode,
    split,
    weights_from_numpy,
)

KB, MB = 1024, 1024 * 1024


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _weights_message(device_id: str = "dev-1", num_bytes: int = 8 * KB, seed: int = 0, run_id: str = "run") -> ModelWeights:
    rng = np.random.default_rng(seed)
    values = rng.normal(size=num_bytes // 4).astype(np.float32)
    return ModelWeights(Envelope(run_id, 3, device_id, 0, 1.25), 9, weights_from_numpy({"w": values}))


def _chunks(frames: list[bytes]) -> list[Chunk]:
    return [decode(frame) for frame in frames]  # type: ignore[misc]


def _feed_all(reassembler: Reassembler, frames: list[bytes]) -> list[Message | None]:
    return [reassembler.feed(frame) for frame in frames]


# --- split ---------------------------------------------------------------------------------------


def test_a_frame_within_the_limit_is_sent_as_is() -> None:
    message = _weights_message()
    frame = encode(message)
    assert split(message, len(frame)) == [frame]
    assert split(message, 10 * len(frame)) == [frame]


def test_a_frame_one_byte_over_the_limit_is_chunked() -> None:
    message = _weights_message()
    frames = split(message, len(encode(message)) - 1)
    assert len(frames) == 2
    assert all(isinstance(chunk, Chunk) for chunk in _chunks(frames))


@pytest.mark.parametrize(
    ("max_frame_bytes", "run_id", "device_id"),
    [
        (200, "run", "dev-1"),
        (1000, "run", "dev-1"),
        (4 * KB + 3, "run", "dev-1"),
        (251, "r" * 64, "d" * 64),
        (1000, "r" * 64, "d" * 64),
        (4 * KB + 3, "r" * 64, "d" * 64),
    ],
)
def test_every_chunk_frame_fits_the_limit(max_frame_bytes: int, run_id: str, device_id: str) -> None:
    # Prepare: ids as long as the topic rule allows (64 characters) shrink the room for data.
    message = _weights_message(device_id, 16 * KB, run_id=run_id)
    # Execute
    frames = split(message, max_frame_bytes)
    # Assert
    chunks = _chunks(frames)
    assert all(len(frame) <= max_frame_bytes for frame in frames)
    assert max(len(frame) for frame in frames) > max_frame_bytes - 8  # the room is used, not wasted
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert {(c.count, c.total_size) for c in chunks} == {(len(chunks), len(encode(message)))}
    assert b"".join(c.data for c in chunks) == encode(message)
    assert Reassembler().feed(frames[0]) is None


def test_a_limit_without_room_for_data_is_refused() -> None:
    with pytest.raises(ChunkError, match="leaves no room for chunk data"):
        split(_weights_message(), 100)
    # the room shrinks with the ids: 250 bytes fit chunks of short ids, not of 64-character ones
    assert len(split(_weights_message("d"), 250)) > 1
    with pytest.raises(ChunkError, match="leaves no room for chunk data"):
        split(_weights_message("d" * 64, run_id="r" * 64), 200)


def test_split_refuses_a_message_encode_refuses() -> None:
    # split encodes first, so a message breaking a rule never becomes chunks either
    with pytest.raises(MalformedError, match="envelope device_id must be 1-64 characters"):
        split(_weights_message("装置-🦫"), 1000)


def test_five_megabytes_split_at_one_megabyte_reassemble_equal() -> None:
    # Prepare
    message = _weights_message(num_bytes=5 * MB)
    frames = split(message, 1 * MB)
    reassembler = Reassembler()
    # Execute
    results = _feed_all(reassembler, frames)
    # Assert
    assert len(frames) == 6
    assert all(len(frame) <= 1 * MB for frame in frames)
    assert results[:-1] == [None] * 5
    assert results[-1] == message
    assert reassembler.pending_sets == 0 and reassembler.buffered_bytes == 0
    assert reassembler.counters["completed_sets"] == 1


def test_the_same_message_sent_again_gets_the_same_message_id() -> None:
    # A re-send after a reconnect must land in the same set, so the id comes from the content.
    first = _chunks(split(_weights_message(), 1000))
    again = _chunks(split(_weights_message(), 1000))
    other = _chunks(split(_weights_message(seed=1), 1000))
    assert {c.message_id for c in first} == {c.message_id for c in again} and len({c.message_id for c in first}) == 1
    assert first[0].message_id != other[0].message_id


# --- reassembly ----------------------------------------------------------------------------------


def test_chunks_in_any_order_complete_on_the_last_one() -> None:
    # Prepare
    message = _weights_message()
    frames = split(message, 1000)
    order = list(range(len(frames)))
    random.Random(4).shuffle(order)
    assert order != sorted(order)
    reassembler = Reassembler()
    # Execute
    results = [reassembler.feed(frames[i]) for i in order]
    # Assert
    assert results[:-1] == [None] * (len(frames) - 1)
    assert results[-1] == message


def test_duplicated_chunks_are_counted_and_the_set_completes_once() -> None:
    # Prepare: QoS 1 redelivers chunks 0 and 1 before the set completes.
    message = _weights_message()
    frames = split(message, 3000)
    assert len(frames) == 3
    reassembler = Reassembler()
    # Execute
    results = _feed_all(reassembler, [frames[0], frames[0], frames[1], frames[1], frames[2]])
    # Assert
    assert results == [None, None, None, None, message]
    assert reassembler.counters["duplicate_chunks"] == 2
    assert reassembler.counters["completed_sets"] == 1


def test_chunks_of_two_devices_interleaved_each_complete() -> None:
    # Prepare
    first, second = _weights_message("dev-a", seed=1), _weights_message("dev-b", seed=2)
    frames_a, frames_b = split(first, 1000), split(second, 1000)
    interleaved = [f for pair in zip(frames_a, frames_b) for f in pair]
    assert len(frames_a) == len(frames_b)
    reassembler = Reassembler()
    # Execute
    results = [r for r in _feed_all(reassembler, interleaved) if r is not None]
    # Assert
    assert results == [first, second]
    assert [r.envelope.device_id for r in results] == ["dev-a", "dev-b"]


def test_the_same_chunks_from_two_devices_do_not_mix() -> None:
    # Identical content from two devices: same message id, different sets (keyed by device).
    reassembler = Reassembler()
    frames_a = split(_weights_message("dev-a"), 3000)
    frames_b = split(_weights_message("dev-b"), 3000)
    assert reassembler.feed(frames_a[0]) is None
    assert reassembler.feed(frames_b[1]) is None
    assert reassembler.pending_sets == 2
    assert reassembler.feed(frames_a[1]) is None
    assert reassembler.feed(frames_a[2]).envelope.device_id == "dev-a"


def test_frames_that_are_not_chunks_pass_straight_through() -> None:
    message = Status(Envelope("run", 1, "dev", 0, 1.0), True)
    assert Reassembler().feed(encode(message)) == message


# --- completed sets are remembered ---------------------------------------------------------------


def test_a_set_re_sent_after_it_completed_is_dropped_chunk_by_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: count how often the reassembler decodes a completed set
    decoded: list[bytes] = []
    real_decode = chunking.decode
    monkeypatch.setattr(chunking, "decode", lambda data, limits: decoded.append(bytes(data)) or real_decode(data, limits))
    message = _weights_message()
    chunks = _chunks(split(message, 3000))
    reassembler = Reassembler()
    # Execute: the whole set, then the whole set again (a re-send after a reconnect)
    first = [reassembler.add(chunk) for chunk in chunks]
    again = [reassembler.add(chunk) for chunk in chunks]
    # Assert
    assert first == [None, None, message]
    assert again == [None, None, None]
    assert decoded == [encode(message)]  # decoded once
    assert reassembler.counters["late_chunks"] == 3
    assert reassembler.counters["completed_sets"] == 1
    assert reassembler.pending_sets == 0 and reassembler.buffered_bytes == 0


def test_a_late_chunk_takes_no_buffer_space_and_opens_no_set() -> None:
    # Prepare: a completed set, then a buffer filled by other devices so no chunk of 3000 fits
    frames = split(_weights_message(), 3000)
    reassembler = Reassembler(max_buffered_bytes=9000)
    assert _feed_all(reassembler, frames)[-1] is not None
    reassembler.feed(split(_weights_message("dev-2", seed=2), 3000)[0])
    reassembler.feed(split(_weights_message("dev-3", seed=3), 3000)[0])
    reassembler.feed(split(_weights_message("dev-4", seed=4), 3000)[0])
    held = reassembler.buffered_bytes
    assert held + len(_chunks(frames)[1].data) > 9000
    # Execute: one chunk of the completed set redelivered (QoS 1)
    result = reassembler.feed(frames[1])
    # Assert: dropped as late, not refused for room, not buffered
    assert result is None
    assert reassembler.counters["late_chunks"] == 1
    assert reassembler.counters["rejected_chunks"] == 0
    assert reassembler.pending_sets == 3 and reassembler.buffered_bytes == held


def test_completed_sets_are_remembered_per_device() -> None:
    # The same content from another device is another set, not a late one.
    reassembler = Reassembler()
    first, second = _weights_message("dev-a"), _weights_message("dev-b")
    assert _feed_all(reassembler, split(first, 3000))[-1] == first
    assert _feed_all(reassembler, split(second, 3000))[-1] == second
    assert reassembler.counters["late_chunks"] == 0


def test_only_the_last_remember_completed_sets_are_remembered() -> None:
    # Prepare: room to remember two completed sets
    reassembler = Reassembler(remember_completed=2)
    messages = [_weights_message(seed=i) for i in range(3)]
    sets = [split(message, 3000) for message in messages]
    for frames in sets:
        assert _feed_all(reassembler, frames)[-1] is not None
    # Execute: re-send the newest and the oldest
    newest_again = _feed_all(reassembler, sets[2])
    oldest_again = _feed_all(reassembler, sets[0])
    # Assert: the newest is still remembered (late); the oldest was forgotten and completes again
    assert newest_again == [None, None, None]
    assert oldest_again == [None, None, messages[0]]
    assert reassembler.counters["late_chunks"] == 3
    assert reassembler.counters["completed_sets"] == 4


def test_a_set_that_failed_to_decode_is_remembered_too() -> None:
    # A set whose frame is refused (here: a chunk inside chunks) is not decoded a second time.
    inner = encode(Chunk(ENV, 12, 0, 2, 500, b"z" * 300))
    frames = _chunk_set(inner)
    reassembler = Reassembler()
    reassembler.feed(frames[0])
    with pytest.raises(ChunkError, match="must not contain another chunk"):
        reassembler.feed(frames[1])
    assert _feed_all(reassembler, frames) == [None, None]
    assert reassembler.counters["late_chunks"] == 2


# --- add validates its chunk ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("chunk", "error"),
    [
        (Chunk(Envelope("run", 3, "dev-1", 0, 1.0), 7, 3, 3, 300, b"a"), r"chunk index: must be an integer in \[0, 2\], got 3"),
        (Chunk(Envelope("run", 3, "dev-1", 0, 1.0), 7, 9, 3, 300, b"a"), "chunk index"),
        (Chunk(Envelope("run", 3, "dev-1", 0, 1.0), 7, -1, 3, 300, b"a"), "chunk index"),
        (Chunk(Envelope("run", 3, "dev-1", 0, 1.0), 7, 0, 0, 300, b"a"), "chunk count"),
        (Chunk(Envelope("run", 3, "dev-1", 0, 1.0), 7, 0, 5, 4, b"a"), "chunk total_size"),
        (Chunk(Envelope("run", 3, "dev-1", 0, 1.0), 7, 0, 1, 300, b""), "chunk of 0 bytes in a message of 300"),
        (Chunk(Envelope("run", 3, "dev-1", 0, 1.0), 7, 0, 1, 2, b"abc"), "chunk of 3 bytes in a message of 2"),
        (Chunk(Envelope("run", 3, "dev-1", 0, 1.0), 7, 0, 1, 3, "abc"), "chunk data must be bytes"),  # type: ignore[arg-type]
        (Chunk(Envelope("run", 3, "dev-1", 0, 1.0), -7, 0, 1, 3, b"abc"), "message_id"),
    ],
    ids=["index = count", "index > count", "index < 0", "count 0", "count > total", "empty", "data > total", "str data", "id < 0"],
)
def test_add_refuses_a_chunk_that_cannot_fit_its_set(chunk: Chunk, error: str) -> None:
    # Prepare
    reassembler = Reassembler()
    # Execute / Assert: a MalformedError (not a KeyError or IndexError), and nothing is kept
    with pytest.raises(MalformedError, match=error):
        reassembler.add(chunk)
    assert reassembler.pending_sets == 0 and reassembler.buffered_bytes == 0


@pytest.mark.parametrize("data", [None, 7], ids=["None", "int"])
def test_add_refuses_chunk_data_that_is_not_bytes(data: object) -> None:
    reassembler = Reassembler()
    with pytest.raises(MalformedError, match="chunk data must be bytes"):
        reassembler.add(Chunk(ENV, 7, 0, 1, 3, data))  # type: ignore[arg-type]


def test_an_index_beyond_the_count_of_an_open_set_is_refused_and_the_set_kept() -> None:
    reassembler = Reassembler()
    reassembler.add(Chunk(ENV, 7, 0, 3, 300, b"a" * 100))
    with pytest.raises(MalformedError, match="chunk index"):
        reassembler.add(Chunk(ENV, 7, 3, 3, 300, b"b" * 100))
    assert reassembler.pending_sets == 1 and reassembler.buffered_bytes == 100


# --- the byte count ------------------------------------------------------------------------------


def test_buffered_bytes_follows_every_way_a_set_leaves() -> None:
    # The count is kept as it goes, so each exit must give back exactly what its set held.
    # Prepare
    clock = FakeClock()
    reassembler = Reassembler(max_sets_per_device=1, expiry_s=60.0, clock=clock)
    env_b = Envelope("run", 3, "dev-b", 0, 1.0)
    # Execute / Assert
    reassembler.add(Chunk(ENV, 1, 0, 3, 300, b"a" * 100))
    reassembler.add(Chunk(env_b, 1, 0, 2, 300, b"b" * 120))
    assert reassembler.buffered_bytes == 220
    reassembler.add(Chunk(ENV, 2, 0, 2, 300, b"c" * 50))  # evicts dev-1's set 1 (100 bytes)
    assert reassembler.counters["evicted_sets"] == 1
    assert reassembler.buffered_bytes == 170
    reassembler.add(Chunk(ENV, 2, 0, 2, 300, b"c" * 50))  # a duplicate adds nothing
    assert reassembler.buffered_bytes == 170
    with pytest.raises(ChunkError, match="exceed its declared 300 bytes"):
        reassembler.add(Chunk(env_b, 1, 1, 2, 300, b"d" * 200))  # overflow drops dev-b's set
    assert reassembler.buffered_bytes == 50
    with pytest.raises(ChunkError, match="reassembled 100 bytes"):
        reassembler.add(Chunk(ENV, 2, 1, 2, 300, b"e" * 50))  # completes short of its size
    assert reassembler.buffered_bytes == 0
    reassembler.add(Chunk(ENV, 3, 0, 2, 300, b"f" * 70))
    clock.now += 61.0
    assert reassembler.expire() == 1
    assert reassembler.buffered_bytes == 0 and reassembler.pending_sets == 0


# --- bounds --------------------------------------------------------------------------------------


def test_a_set_older_than_the_expiry_is_dropped() -> None:
    # Prepare
    clock = FakeClock()
    reassembler = Reassembler(expiry_s=120.0, clock=clock)
    frames = split(_weights_message(), 3000)
    assert reassembler.feed(frames[0]) is None
    # Execute: the rest arrives 121 s later
    clock.now += 121.0
    results = _feed_all(reassembler, frames[1:])
    # Assert: chunk 0 was dropped, so the set cannot complete
    assert results == [None, None]
    assert reassembler.counters["expired_sets"] == 1
    assert reassembler.counters["completed_sets"] == 0


def test_a_set_within_the_expiry_completes() -> None:
    clock = FakeClock()
    reassembler = Reassembler(expiry_s=120.0, clock=clock)
    message = _weights_message()
    frames = split(message, 3000)
    reassembler.feed(frames[0])
    clock.now += 119.0
    assert _feed_all(reassembler, frames[1:])[-1] == message
    assert reassembler.counters["expired_sets"] == 0


def test_expire_reports_how_many_sets_it_dropped() -> None:
    clock = FakeClock()
    reassembler = Reassembler(expiry_s=10.0, clock=clock)
    reassembler.feed(split(_weights_message("a"), 3000)[0])
    clock.now += 5.0
    reassembler.feed(split(_weights_message("b"), 3000)[0])
    clock.now += 6.0
    assert reassembler.expire() == 1
    assert reassembler.pending_sets == 1
    clock.now += 5.0
    assert reassembler.expire() == 1
    assert reassembler.pending_sets == 0 and reassembler.buffered_bytes == 0


def test_a_device_over_its_set_limit_loses_its_oldest_set() -> None:
    # Prepare
    clock = FakeClock()
    reassembler = Reassembler(max_sets_per_device=2, clock=clock)
    messages = [_weights_message("dev-a", seed=i) for i in range(3)]
    frames = [split(message, 3000) for message in messages]
    other = split(_weights_message("dev-b", seed=9), 3000)
    reassembler.feed(other[0])
    for set_frames in frames:
        clock.now += 1.0
        reassembler.feed(set_frames[0])
    evicted_on_open = reassembler.counters["evicted_sets"]
    # Execute: the rest of the two newer dev-a sets, of dev-b's set, then of the oldest dev-a set
    newer = [_feed_all(reassembler, set_frames[1:])[-1] for set_frames in frames[1:]]
    other_result = _feed_all(reassembler, other[1:])[-1]
    oldest = _feed_all(reassembler, frames[0][1:])
    # Assert: the oldest dev-a set was evicted when the third opened; dev-b kept its set
    assert evicted_on_open == 1
    assert newer == messages[1:]
    assert other_result is not None and other_result.envelope.device_id == "dev-b"
    assert oldest == [None, None]


def test_a_full_buffer_evicts_the_oldest_set_of_the_device_holding_the_most() -> None:
    # Prepare: room for four 2933-byte chunks, not five; dev-1 holds three of them in two sets
    clock = FakeClock()
    reassembler = Reassembler(max_buffered_bytes=12_000, clock=clock)
    older, newer = (split(_weights_message("dev-1", seed=i), 3000) for i in (1, 2))
    reassembler.feed(split(_weights_message("dev-0"), 3000)[0])
    clock.now += 1.0
    _feed_all(reassembler, older[:2])
    clock.now += 1.0
    reassembler.feed(newer[0])
    # Execute: dev-2's first chunk does not fit
    assert reassembler.feed(split(_weights_message("dev-2", seed=3), 3000)[0]) is None
    # Assert: dev-1's older set made room (not dev-0's smaller one); nothing was refused
    assert reassembler.counters["evicted_for_space"] == 1 and reassembler.counters["rejected_chunks"] == 0
    chunk = len(_chunks(newer)[0].data)
    assert [reassembler.buffered_bytes_of(d) for d in ("dev-0", "dev-1", "dev-2")] == [chunk] * 3
    assert reassembler.pending_sets == 3 and reassembler.buffered_bytes <= 12_000


def test_one_device_filling_the_buffer_cannot_shut_another_out() -> None:
    # The review's scenario: dev-a opens 4 sets it never finishes (2 of 3 chunks each) and, with a
    # per-device cap as large as the buffer, fills it; dev-b's message must still get through
    clock = FakeClock()
    reassembler = Reassembler(max_buffered_bytes=24_000, max_bytes_per_device=24_000, clock=clock)
    messages_a = [_weights_message("dev-a", seed=i) for i in range(4)]
    for message in messages_a:
        clock.now += 1.0
        _feed_all(reassembler, split(message, 3000)[:2])
    assert reassembler.pending_sets == 4 and 24_000 - reassembler.buffered_bytes < 2933  # full
    other = _weights_message("dev-b", seed=9)
    # Execute
    results, peak = [], 0
    for frame in split(other, 3000):
        results.append(reassembler.feed(frame))
        peak = max(peak, reassembler.buffered_bytes)
    # Assert: dev-b's message completed within the budget; dev-a's two oldest sets were evicted for
    # it (counted), its two newest are kept and still complete
    assert results[-1] == other and reassembler.counters["rejected_chunks"] == 0
    assert reassembler.counters["evicted_for_space"] == 2 and peak <= 24_000
    assert [reassembler.feed(split(m, 3000)[2]) for m in messages_a[2:]] == messages_a[2:]


def test_a_device_over_its_byte_cap_loses_its_own_oldest_sets_and_no_other_devices() -> None:
    # Prepare: the same four unfinished dev-a sets against a cap of 12,000 bytes per device
    clock = FakeClock()
    reassembler = Reassembler(max_buffered_bytes=24_000, max_bytes_per_device=12_000, clock=clock)
    messages_a = [_weights_message("dev-a", seed=i) for i in range(4)]
    held_a = []
    # Execute
    for message in messages_a:
        clock.now += 1.0
        _feed_all(reassembler, split(message, 3000)[:2])
        held_a.append(reassembler.buffered_bytes_of("dev-a"))
    other = _weights_message("dev-b", seed=9)
    other_result = _feed_all(reassembler, split(other, 3000))[-1]
    # Assert: dev-a never held more than its cap: its two oldest sets made way for its newer ones
    # (as a fifth set would); dev-b's message went through with nothing evicted for it
    assert max(held_a) <= 12_000 < 3 * held_a[0]
    assert reassembler.counters["evicted_sets"] == 2 and reassembler.counters["evicted_for_space"] == 0
    assert other_result == other
    assert reassembler.feed(split(messages_a[3], 3000)[2]) == messages_a[3]


def test_a_device_never_evicts_a_device_holding_no_more_than_itself() -> None:
    # Prepare: dev-0 and dev-1 hold one chunk each; a second dev-0 chunk does not fit
    reassembler = Reassembler(max_buffered_bytes=8500)
    own, peer = (split(_weights_message(f"dev-{i}", seed=i), 3000) for i in (0, 1))
    reassembler.feed(peer[0])
    reassembler.feed(own[0])
    # Execute / Assert: on a tie the chunk's own device counts as the largest holder, so it is refused
    with pytest.raises(LimitError, match="chunk buffer full"):
        reassembler.feed(own[1])
    assert reassembler.buffered_bytes_of("dev-1") == reassembler.buffered_bytes_of("dev-0") > 0
    assert reassembler.counters["rejected_chunks"] == 1 and reassembler.pending_sets == 2


def test_the_byte_bounds_hold_under_a_shuffled_stream_of_three_devices() -> None:
    # Prepare: 30 sets of 3 chunks from 3 devices, shuffled 4 sets at a time, against bounds that
    # hold one set per device, and two sets in all
    clock = FakeClock()
    reassembler = Reassembler(max_buffered_bytes=20_000, max_bytes_per_device=9000, clock=clock)
    frames = [f for i in range(30) for f in split(_weights_message(f"dev-{i % 3}", seed=i), 3000)]
    rng = random.Random(4)
    windows = [frames[start : start + 12] for start in range(0, len(frames), 12)]
    frames = [f for window in windows for f in rng.sample(window, len(window))]
    completed, refused = 0, 0
    for frame in frames:
        clock.now += 1.0
        # Execute
        try:
            completed += reassembler.feed(frame) is not None
        except LimitError:
            refused += 1
        # Assert: both bounds, and the per-device counts add up to the total
        held = [reassembler.buffered_bytes_of(f"dev-{d}") for d in range(3)]
        assert max(held) <= 9000 and sum(held) == reassembler.buffered_bytes <= 20_000
    assert completed > 0 and refused == reassembler.counters["rejected_chunks"]
    assert reassembler.counters["evicted_sets"] > 0 and reassembler.counters["evicted_for_space"] > 0


@pytest.mark.parametrize("bound", ["max_sets_per_device", "max_buffered_bytes", "max_bytes_per_device"])
def test_a_bound_below_one_is_refused(bound: str) -> None:
    with pytest.raises(ValueError, match=f"{bound} must be >= 1, got 0"):
        Reassembler(**{bound: 0})


def test_the_buffer_frees_its_bytes_when_a_set_completes() -> None:
    reassembler = Reassembler(max_buffered_bytes=9000)
    message = _weights_message("dev-0")
    frames = split(message, 3000)
    assert _feed_all(reassembler, frames)[-1] == message
    assert reassembler.buffered_bytes == 0
    assert reassembler.feed(split(_weights_message("dev-1"), 3000)[0]) is None


def test_a_set_larger_than_a_device_may_hold_is_refused_at_its_first_chunk() -> None:
    # Prepare: a device may hold 5000 bytes; dev-0 has a 4 KB set open
    reassembler = Reassembler(max_buffered_bytes=50_000, max_bytes_per_device=5000)
    small = _weights_message("dev-0", num_bytes=4 * KB)
    frames = split(small, 3000)
    reassembler.feed(frames[0])
    held = reassembler.buffered_bytes
    # Execute: first chunks of 8 KB sets (8254 bytes declared) from dev-0 itself and 20 others
    for i in range(21):
        with pytest.raises(LimitError, match="exceeds the 5000 bytes one device may buffer"):
            reassembler.feed(split(_weights_message(f"dev-{i}", seed=i + 1), 3000)[0])
    # Assert: none took a byte, opened a set or evicted one (not even dev-0's); dev-0's set completes
    assert reassembler.counters["rejected_chunks"] == 21
    assert reassembler.pending_sets == 1 and reassembler.buffered_bytes == held
    assert not {"evicted_sets", "evicted_for_space"} & set(reassembler.counters)
    assert reassembler.feed(frames[1]) == small


def test_a_chunk_of_the_device_holding_the_most_is_refused_and_its_set_kept() -> None:
    # Prepare: dev-0 holds two of its three chunks, dev-1 one chunk; dev-0's last chunk does not
    # fit, and dev-0 (the largest holder) has no other set to give up
    reassembler = Reassembler(max_buffered_bytes=10_000)
    message = _weights_message("dev-0")
    frames = split(message, 3000)
    assert len(frames) == 3
    _feed_all(reassembler, frames[:2])
    reassembler.feed(split(_weights_message("dev-1", seed=1), 3000)[0])
    # Execute
    with pytest.raises(LimitError, match="chunk buffer full"):
        reassembler.feed(frames[2])
    # Assert: the set is kept with what it had and dev-1's smaller set was not evicted for it;
    # once room is made the last chunk completes it
    assert reassembler.pending_sets == 2 and reassembler.counters["rejected_chunks"] == 1
    assert not {"evicted_sets", "evicted_for_space"} & set(reassembler.counters)
    reassembler.max_buffered_bytes = 12_000
    assert reassembler.feed(frames[2]) == message


# --- sets that cannot be right -------------------------------------------------------------------

ENV = Envelope("run", 3, "dev-1", 0, 1.0)


def test_a_chunk_disagreeing_with_its_set_on_count_is_refused() -> None:
    reassembler = Reassembler()
    reassembler.add(Chunk(ENV, 7, 0, 3, 300, b"a" * 100))
    with pytest.raises(ChunkError, match="disagrees with its set on count or total size"):
        reassembler.add(Chunk(ENV, 7, 1, 4, 300, b"b" * 100))


def test_a_chunk_disagreeing_with_its_set_on_total_size_is_refused() -> None:
    reassembler = Reassembler()
    reassembler.feed(encode(Chunk(ENV, 7, 0, 3, 300, b"a" * 100)))
    with pytest.raises(ChunkError, match="disagrees"):
        reassembler.feed(encode(Chunk(ENV, 7, 1, 3, 301, b"b" * 100)))


def test_chunks_larger_in_all_than_their_set_are_refused_and_the_set_dropped() -> None:
    reassembler = Reassembler()
    reassembler.add(Chunk(ENV, 7, 0, 3, 300, b"a" * 200))
    with pytest.raises(ChunkError, match="exceed its declared 300 bytes"):
        reassembler.add(Chunk(ENV, 7, 1, 3, 300, b"b" * 200))
    assert reassembler.counters["overflowing_sets"] == 1
    assert reassembler.pending_sets == 0


def test_a_set_that_completes_short_of_its_size_is_refused() -> None:
    reassembler = Reassembler()
    reassembler.add(Chunk(ENV, 7, 0, 2, 300, b"a" * 100))
    with pytest.raises(ChunkError, match="reassembled 200 bytes, set declared 300"):
        reassembler.add(Chunk(ENV, 7, 1, 2, 300, b"b" * 100))
    assert reassembler.counters["incomplete_sets"] == 1
    assert reassembler.pending_sets == 0


def _chunk_set(inner: bytes, env: Envelope = ENV) -> list[bytes]:
    half = len(inner) // 2
    return [encode(Chunk(env, 11, i, 2, len(inner), part)) for i, part in enumerate((inner[:half], inner[half:]))]


def test_a_chunk_set_carrying_a_chunk_is_refused() -> None:
    inner = encode(Chunk(ENV, 12, 0, 2, 500, b"z" * 300))
    frames = _chunk_set(inner)
    reassembler = Reassembler()
    assert reassembler.feed(frames[0]) is None
    with pytest.raises(ChunkError, match="must not contain another chunk"):
        reassembler.feed(frames[1])


def test_a_chunk_set_carrying_another_devices_message_is_refused() -> None:
    inner = encode(ErrorReport(Envelope("run", 3, "dev-2", 0, 1.0), "spoof", "x" * 200))
    frames = _chunk_set(inner)
    reassembler = Reassembler()
    reassembler.feed(frames[0])
    with pytest.raises(ChunkError, match="chunks from 'dev-1' carried a message of 'dev-2'"):
        reassembler.feed(frames[1])


def test_the_same_hand_built_set_with_a_matching_device_completes() -> None:
    # The control for the two tests above: the helper builds a set that does complete.
    message = ErrorReport(Envelope("run", 3, "dev-1", 0, 1.0), "ok", "x" * 200)
    frames = _chunk_set(encode(message))
    assert _feed_all(Reassembler(), frames) == [None, message]


class _CountedBytes(bytes):
    """Chunk data that counts how often its length is asked for (by every piece, in all)."""

    calls = 0

    def __len__(self) -> int:
        _CountedBytes.calls += 1
        return super().__len__()


def test_a_set_of_many_small_chunks_is_reassembled_with_constant_work_per_chunk() -> None:
    # Summing the stored pieces on every chunk (as the reassembler once did) asks each stored
    # piece for its length again and again: about n^2 / 2 = 8 million calls here. Keeping running
    # counts asks each arriving piece a few times. Counting the calls measures that without a clock.
    # Prepare: a real frame of about 4,000 bytes, one byte per chunk
    message = ErrorReport(ENV, "big", "x" * 4000)
    frame = encode(message)
    count = len(frame)
    chunks = [Chunk(ENV, 5, i, count, count, _CountedBytes(frame[i : i + 1])) for i in range(count)]
    reassembler = Reassembler()
    _CountedBytes.calls = 0
    # Execute
    for chunk in chunks[:-1]:
        assert reassembler.add(chunk) is None
        assert reassembler.buffered_bytes == chunk.index + 1
    calls_while_adding = _CountedBytes.calls
    for _ in range(count):
        assert reassembler.buffered_bytes == count - 1
    completed = reassembler.add(chunks[-1])
    # Assert: a constant number of length calls per chunk, none for reading the running count
    assert count > 4000
    assert calls_while_adding <= 10 * count
    assert _CountedBytes.calls <= calls_while_adding + 10  # and the last chunk
    assert completed == message
    assert reassembler.buffered_bytes == 0 and reassembler.pending_sets == 0
