"""The link's inbox: per-source bounded queues, round-robin service, expiry, counted drops."""

from __future__ import annotations

import threading

import pytest

from edge_runtime.inbox import Inbox, InboxLimits, Incoming, source_of


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _msg(topic: str, size: int = 10) -> Incoming:
    return Incoming(topic, bytes(size), False)


def test_chunk_sub_topics_share_their_topic_s_queue() -> None:
    assert source_of("sflam/v1/r/d/dev-1/up/c/17") == "sflam/v1/r/d/dev-1/up"
    assert source_of("sflam/v1/r/d/dev-1/up") == "sflam/v1/r/d/dev-1/up"
    assert source_of("sflam/v1/r/c/x") == "sflam/v1/r/c/x"  # not a chunk index


def test_sources_are_served_in_turn_so_a_flood_delays_others_by_one_message() -> None:
    # Prepare: a flood of 100 on one topic, then one message each on two others
    inbox = Inbox()
    for i in range(100):
        inbox.put(Incoming("flood", bytes([i % 256]), False))
    inbox.put(_msg("a"))
    inbox.put(_msg("b/c/0"))
    # Execute
    order = [inbox.get(0).topic for _ in range(4)]
    # Assert
    assert order == ["flood", "a", "b/c/0", "flood"]
    assert inbox.pending == 98


def test_each_source_keeps_its_arrival_order() -> None:
    inbox = Inbox()
    for i in range(5):
        inbox.put(Incoming("t", bytes([i]), False))
    assert [inbox.get(0).payload[0] for _ in range(5)] == [0, 1, 2, 3, 4]
    assert inbox.get(0) is None


def test_a_full_source_drops_its_own_messages_and_counts_them_not_others() -> None:
    # Prepare
    inbox = Inbox(InboxLimits(max_bytes=1000, max_source_bytes=100, max_source_messages=3))
    # Execute
    accepted = [inbox.put(_msg("flood")) for _ in range(5)]
    other = inbox.put(_msg("device"))
    # Assert
    assert accepted == [True, True, True, False, False] and other
    assert inbox.counters == {"queued": 4, "dropped_source_full": 2}


def test_the_total_byte_limit_holds_over_all_sources() -> None:
    inbox = Inbox(InboxLimits(max_bytes=250, max_source_bytes=100))
    results = [inbox.put(_msg(f"s{i}", 100)) for i in range(4)]
    assert results == [True, True, False, False]
    assert inbox.counters["dropped_full"] == 2
    assert inbox.buffered_bytes == 200


def test_a_payload_larger_than_a_source_may_hold_is_dropped() -> None:
    inbox = Inbox(InboxLimits(max_bytes=1000, max_source_bytes=100))
    assert not inbox.put(_msg("t", 101))
    assert inbox.counters == {"dropped_source_full": 1}
    assert inbox.buffered_bytes == 0


def test_messages_that_waited_too_long_are_dropped_when_their_turn_comes() -> None:
    # Prepare
    clock = FakeClock()
    inbox = Inbox(InboxLimits(expiry_s=5.0), clock=clock)
    inbox.put(_msg("old"))
    clock.now += 6.0
    inbox.put(_msg("new"))
    # Execute
    got = inbox.get(0)
    # Assert
    assert got.topic == "new"
    assert inbox.counters["expired"] == 1
    assert inbox.buffered_bytes == 0 and inbox.pending == 0


def test_taking_frees_the_space_for_more() -> None:
    inbox = Inbox(InboxLimits(max_bytes=100, max_source_bytes=100, max_source_messages=1))
    assert inbox.put(_msg("t")) and not inbox.put(_msg("t"))
    inbox.get(0)
    assert inbox.put(_msg("t"))


def test_get_waits_for_a_put_from_another_thread() -> None:
    inbox = Inbox()
    timer = threading.Timer(0.05, inbox.put, args=(_msg("late"),))
    timer.start()
    try:
        assert inbox.get(5.0).topic == "late"
    finally:
        timer.join()


def test_get_returns_none_after_its_timeout() -> None:
    assert Inbox().get(0.01) is None


@pytest.mark.parametrize("kwargs, problem", [
    ({"max_bytes": 0}, "max_bytes must be > 0"),
    ({"expiry_s": -1}, "expiry_s must be > 0"),
    ({"max_bytes": 10, "max_source_bytes": 20}, "max_source_bytes (20) exceeds max_bytes (10)"),
])
def test_bad_limits_say_what_is_wrong(kwargs: dict, problem: str) -> None:
    with pytest.raises(ValueError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        InboxLimits(**kwargs)


def test_every_problem_of_bad_limits_is_listed() -> None:
    with pytest.raises(ValueError) as info:
        InboxLimits(max_bytes=0, max_source_messages=0)
    assert "max_bytes" in str(info.value) and "max_source_messages" in str(info.value)
