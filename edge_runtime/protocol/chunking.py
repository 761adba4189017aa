"""Frames larger than a publish limit travel as ``Chunk`` frames and are put back together.

Brokers cap message sizes (EMQX defaults to 1 MB), so :func:`split` cuts a frame into chunk
frames of at most ``max_frame_bytes`` each. A chunk set's id is derived from the frame's bytes,
so re-sending the same message after a reconnect yields the same set (and is idempotent).
:class:`Reassembler` bounds what it buffers: incomplete sets per device, bytes in all, age.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from edge_runtime.protocol import messages as m
from edge_runtime.protocol.codec import DEFAULT_LIMITS, Limits, check_chunk, decode, encode
from edge_runtime.protocol.errors import ChunkError, LimitError

log = logging.getLogger(__name__)
DEFAULT_MAX_BUFFERED_BYTES = 512 * 1024 * 1024  # a server's; a device's is sized to its RAM (edge_runtime.memory)
# Bytes a chunk frame adds around its data, beyond the envelope's strings.
_CHUNK_OVERHEAD = 12 + 4 + 8 + 4 + 4 + 4 + 4 + 2 + 16


def split(message: m.Message, max_frame_bytes: int) -> list[bytes]:
    """``[encode(message)]`` when it fits, else chunk frames no larger than ``max_frame_bytes``."""
    frame = encode(message)
    if len(frame) <= max_frame_bytes:
        return [frame]
    env = message.envelope
    room = max_frame_bytes - _CHUNK_OVERHEAD - len(env.run_id.encode()) - len(env.device_id.encode())
    if room < 64:
        raise ChunkError(f"max_frame_bytes {max_frame_bytes} leaves no room for chunk data")
    message_id = int.from_bytes(hashlib.blake2b(frame, digest_size=8).digest(), "little")
    view = memoryview(frame)  # pieces are views: the frame is not copied twice on the way out
    count = -(-len(frame) // room)
    return [encode(m.Chunk(env, message_id, i, count, len(frame), bytes(view[i * room : (i + 1) * room])))
            for i in range(count)]


@dataclass
class _PartialSet:
    count: int
    total_size: int
    started: float
    received: int = 0
    pieces: dict[int, bytes] = field(default_factory=dict)


class Reassembler:
    """Collects chunk sets; returns the inner message once a set is complete.

    Bounded: at most ``max_sets_per_device`` incomplete sets per device (the oldest is evicted),
    ``max_buffered_bytes`` in all (a chunk beyond it is refused), sets older than ``expiry_s``
    dropped. Sets completed recently are remembered, so a re-sent set is not decoded twice.
    """

    def __init__(
        self,
        limits: Limits = DEFAULT_LIMITS,
        *,
        max_sets_per_device: int = 4,
        max_buffered_bytes: int = DEFAULT_MAX_BUFFERED_BYTES,
        expiry_s: float = 120.0,
        remember_completed: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = limits
        self.max_sets_per_device = max_sets_per_device
        self.max_buffered_bytes = max_buffered_bytes
        self.expiry_s = expiry_s
        self.remember_completed = remember_completed
        self._clock = clock
        self._sets: dict[tuple[str, int], _PartialSet] = {}
        self._completed: OrderedDict[tuple[str, int], None] = OrderedDict()
        self._buffered = 0
        self.counters: Counter[str] = Counter()

    @property
    def buffered_bytes(self) -> int:
        """Bytes held in incomplete sets."""
        return self._buffered

    @property
    def pending_sets(self) -> int:
        return len(self._sets)

    def is_completed(self, chunk: m.Chunk) -> bool:
        """Whether ``chunk`` belongs to a set this reassembler recently completed (a re-send)."""
        return (chunk.envelope.device_id, chunk.message_id) in self._completed

    def feed(self, data: bytes) -> m.Message | None:
        """Decode a frame; a chunk completing its set yields the inner message, others None."""
        message = decode(data, self.limits)
        if not isinstance(message, m.Chunk):
            return message
        return self.add(message)

    def add(self, chunk: m.Chunk) -> m.Message | None:
        """Store one decoded chunk; returns the message when its set completes."""
        check_chunk(chunk)
        self.expire()
        key = (chunk.envelope.device_id, chunk.message_id)
        if key in self._completed:
            self.counters["late_chunks"] += 1
            return None
        partial = self._sets.get(key)
        if partial is not None and (chunk.count, chunk.total_size) != (partial.count, partial.total_size):
            raise ChunkError(f"chunk {chunk.index} disagrees with its set on count or total size")
        if partial is not None and chunk.index in partial.pieces:
            self.counters["duplicate_chunks"] += 1
            return None
        self._reserve(len(chunk.data))
        partial = partial or self._open(key, chunk)
        if partial.received + len(chunk.data) > partial.total_size:
            self._drop(key, "overflowing_sets")
            raise ChunkError(f"chunks of set {chunk.message_id:#x} exceed its declared {partial.total_size} bytes")
        partial.pieces[chunk.index] = chunk.data
        partial.received += len(chunk.data)
        self._buffered += len(chunk.data)
        return self._complete(key, partial) if len(partial.pieces) == partial.count else None

    def expire(self) -> int:
        """Drop sets older than ``expiry_s``; returns how many."""
        now = self._clock()
        stale = [key for key, s in self._sets.items() if now - s.started > self.expiry_s]
        for key in stale:
            self._drop(key, "expired_sets")
        return len(stale)

    def _open(self, key: tuple[str, int], chunk: m.Chunk) -> _PartialSet:
        device_sets = sorted((s.started, k) for k, s in self._sets.items() if k[0] == key[0])
        while len(device_sets) >= self.max_sets_per_device:
            self._drop(device_sets.pop(0)[1], "evicted_sets")
        partial = _PartialSet(chunk.count, chunk.total_size, self._clock())
        self._sets[key] = partial
        return partial

    def _reserve(self, size: int) -> None:
        if self._buffered + size > self.max_buffered_bytes:
            self.counters["rejected_chunks"] += 1
            raise LimitError(f"chunk buffer full ({self._buffered} of {self.max_buffered_bytes} bytes)")

    def _complete(self, key: tuple[str, int], partial: _PartialSet) -> m.Message:
        self._drop(key, None)
        self._completed[key] = None
        if len(self._completed) > self.remember_completed:
            self._completed.popitem(last=False)
        if partial.received != partial.total_size:
            self.counters["incomplete_sets"] += 1
            raise ChunkError(f"reassembled {partial.received} bytes, set declared {partial.total_size}")
        frame = b"".join(partial.pieces[i] for i in range(partial.count))
        message = decode(frame, self.limits)
        if isinstance(message, m.Chunk):
            raise ChunkError("a chunk set must not contain another chunk")
        if message.envelope.device_id != key[0]:
            raise ChunkError(f"chunks from {key[0]!r} carried a message of {message.envelope.device_id!r}")
        self.counters["completed_sets"] += 1
        return message

    def _drop(self, key: tuple[str, int], reason: str | None) -> None:
        partial = self._sets.pop(key, None)
        if partial is None:
            return
        self._buffered -= partial.received
        if reason is not None:
            self.counters[reason] += 1
            log.debug("dropped chunk set %s of %s: %s", key[1], key[0], reason)
