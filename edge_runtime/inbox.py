"""Received publishes waiting to be handled: one bounded queue per source, served in turn.

paho's network thread puts every publish here; the daemon or device loop takes them out. A
single FIFO would let one sender that publishes faster than it is served (a flooding device, a
hostile client) grow the process without bound and delay everyone behind it. So:

- one queue per *source*, the topic without a chunk sub-topic (``d/dev-3/up``, ``plan``), kept in
  arrival order; sources are served round-robin, so a flood on one topic delays the others by at
  most one message per turn;
- limits: ``max_source_bytes`` and ``max_source_messages`` per source, ``max_bytes`` in all; a
  publish beyond a limit is dropped (``dropped_source_full`` / ``dropped_full``);
- expiry: a message that waited longer than ``expiry_s`` is dropped when its turn comes
  (``expired``): whatever it was for is long over, and a sender that still needs it re-sends.

Every drop is counted and logged at most once a second. Thread-safe.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Incoming:
    """One received publish."""

    topic: str
    payload: bytes
    retained: bool


@dataclass(frozen=True)
class InboxLimits:
    """How much an :class:`Inbox` holds at most, and for how long (seconds)."""

    max_bytes: int = 256 * 1024 * 1024
    max_source_bytes: int = 64 * 1024 * 1024
    max_source_messages: int = 4096
    expiry_s: float = 300.0

    def __post_init__(self) -> None:
        problems = [f"{name} must be > 0, got {value!r}" for name, value in vars(self).items() if not value > 0]
        if self.max_source_bytes > self.max_bytes:
            problems.append(f"max_source_bytes ({self.max_source_bytes}) exceeds max_bytes ({self.max_bytes})")
        if problems:
            raise ValueError("bad inbox limits: " + "; ".join(problems))


def source_of(topic: str) -> str:
    """The queue a topic's messages share: the topic without a ``/c/{i}`` chunk sub-topic."""
    head, sep, tail = topic.rpartition("/c/")
    return head if sep and tail.isdigit() else topic


class Inbox:
    """Per-source bounded FIFO queues with expiry, served round-robin (module doc)."""

    def __init__(self, limits: InboxLimits | None = None, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits or InboxLimits()
        self.counters: Counter[str] = Counter()
        self._clock = clock
        self._queues: OrderedDict[str, deque[tuple[float, Incoming]]] = OrderedDict()
        self._source_bytes: Counter[str] = Counter()
        self._bytes = 0
        self._ready = threading.Condition()
        self._last_warning = 0.0

    @property
    def buffered_bytes(self) -> int:
        """Payload bytes waiting now."""
        return self._bytes

    @property
    def pending(self) -> int:
        """Messages waiting now."""
        with self._ready:
            return sum(len(q) for q in self._queues.values())

    def put(self, item: Incoming) -> bool:
        """Queue ``item``; False (counted) when a limit refuses it."""
        size, source, lim = len(item.payload), source_of(item.topic), self.limits
        with self._ready:
            queue = self._queues.get(source)
            if queue is not None and (len(queue) >= lim.max_source_messages
                                      or self._source_bytes[source] + size > lim.max_source_bytes):
                return self._refuse("dropped_source_full", source)
            if self._bytes + size > lim.max_bytes:
                return self._refuse("dropped_full", source)
            if size > lim.max_source_bytes:
                return self._refuse("dropped_source_full", source)
            if queue is None:
                queue = self._queues[source] = deque()
            queue.append((self._clock(), item))
            self._source_bytes[source] += size
            self._bytes += size
            self.counters["queued"] += 1
            self._ready.notify()
        return True

    def get(self, timeout_s: float) -> Incoming | None:
        """The next message in round-robin order over sources, or None after ``timeout_s``."""
        deadline = self._clock() + max(0.0, timeout_s)
        with self._ready:
            while True:
                item = self._take()
                if item is not None:
                    return item
                remaining = deadline - self._clock()
                if remaining <= 0:
                    return None
                self._ready.wait(remaining)

    def _take(self) -> Incoming | None:
        """Pop the head of the next source's queue (under the lock), dropping expired ones."""
        now = self._clock()
        while self._queues:
            source, queue = next(iter(self._queues.items()))
            queued_at, item = queue.popleft()
            self._source_bytes[source] -= len(item.payload)
            self._bytes -= len(item.payload)
            if queue:
                self._queues.move_to_end(source)
            else:
                del self._queues[source]
                del self._source_bytes[source]
            if now - queued_at > self.limits.expiry_s:
                self.counters["expired"] += 1
                self._warn("expired", source)
                continue
            return item
        return None

    def _refuse(self, reason: str, source: str) -> bool:
        self.counters[reason] += 1
        self._warn(reason, source)
        return False

    def _warn(self, reason: str, source: str) -> None:
        now = self._clock()
        if now - self._last_warning >= 1.0:
            self._last_warning = now
            log.warning("inbox: %s on %s (%d messages, %d bytes waiting; counters %s)", reason, source,
                        sum(len(q) for q in self._queues.values()), self._bytes, dict(self.counters))
