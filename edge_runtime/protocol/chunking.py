"""Frames larger than a publish limit travel as ``Chunk`` frames and are put back together.

Brokers cap message sizes (EMQX defaults to 1 MB), so :func:`split` cuts a frame into chunk
frames of at most ``max_frame_bytes`` each. A chunk set's id is derived from the frame's bytes,
so re-sending the same message after a reconnect yields the same set (and is idempotent).
:class:`Reassembler` bounds what it buffers: incomplete sets and bytes per device, bytes in all,
age; when the bytes in all run out it evicts the sets of the device holding the most.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NoReturn

from edge_runtime.protocol import messages as m
from edge_runtime.protocol.codec import DEFAULT_LIMITS, Limits, check_chunk, decode, encode
from edge_runtime.protocol.errors import ChunkError, LimitError
from edge_runtime.protocol.signing import SIGNATURE_SIZE, SigningKey

log = logging.getLogger(__name__)
DEFAULT_MAX_BUFFERED_BYTES = 512 * 1024 * 1024  # a server's; a device's is sized to its RAM (edge_runtime.memory)
# One device's share of it: a quarter, so the default budget takes four devices at their cap; it holds
# the largest update a shipped preset sends (ViT-S/32's whole model in FL mode, 87 MiB). A server
# sizes both from its model (server_runtime.budgets).
DEFAULT_MAX_BYTES_PER_DEVICE = 128 * 1024 * 1024
DEFAULT_MAX_SETS_PER_DEVICE = 4
# Bytes a chunk frame adds around its data, beyond the envelope's strings.
_CHUNK_OVERHEAD = 12 + 4 + 8 + 4 + 4 + 4 + 4 + 2 + 16 + 1  # + the unsigned block's scheme byte


def split(message: m.Message, max_frame_bytes: int, signer: SigningKey | None = None) -> list[bytes]:
    """``[encode(message)]`` when it fits, else chunk frames no larger than ``max_frame_bytes``;
    every frame (the whole one, and each chunk) signed by ``signer`` when given."""
    frame = encode(message, signer)
    if len(frame) <= max_frame_bytes:
        return [frame]
    env = message.envelope
    signature = 0 if signer is None else 1 + len(signer.key_id.encode()) + SIGNATURE_SIZE
    room = max_frame_bytes - _CHUNK_OVERHEAD - signature - len(env.run_id.encode()) - len(env.device_id.encode())
    if room < 64:
        raise ChunkError(f"max_frame_bytes {max_frame_bytes} leaves no room for chunk data")
    message_id = int.from_bytes(hashlib.blake2b(frame, digest_size=8).digest(), "little")
    view = memoryview(frame)  # pieces are views: the frame is not copied twice on the way out
    count = -(-len(frame) // room)
    return [encode(m.Chunk(env, message_id, i, count, len(frame), bytes(view[i * room : (i + 1) * room])), signer)
            for i in range(count)]


@dataclass
class _PartialSet:
    count: int
    total_size: int
    started: float
    received: int = 0
    pieces: dict[int, bytes] = field(default_factory=dict)


_Key = tuple[str, int]  # (envelope device_id, message_id): one chunk set


class _EvictionPlan:
    """Which incomplete sets must go to make room for one chunk, worked out before any goes, so that
    a refused chunk evicts nothing."""

    def __init__(self, sets: dict[_Key, _PartialSet], device_bytes: Counter[str], total: int, key: _Key) -> None:
        self.sets, self.key, self.total = sets, key, total
        self.held: Counter[str] = Counter(device_bytes)
        self.victims: list[tuple[_Key, str]] = []
        self._queues: dict[str, list[_Key]] = {}

    def queue(self, device: str) -> list[_Key]:
        """The device's incomplete sets still kept, oldest first, without the chunk's own set."""
        if device not in self._queues:
            ordered = sorted((s.started, k) for k, s in self.sets.items() if k[0] == device and k != self.key)
            self._queues[device] = [k for _, k in ordered]
        return self._queues[device]

    def evict(self, device: str, reason: str) -> None:
        """Plan to drop the device's oldest kept set (counted ``reason``)."""
        victim = self.queue(device).pop(0)
        self.held[device] -= self.sets[victim].received
        self.total -= self.sets[victim].received
        self.victims.append((victim, reason))

    def largest_holder(self) -> str:
        """The device holding the most bytes; on a tie the chunk's own device (it never evicts an equal)."""
        own = self.key[0]
        return max(self.held, key=lambda device: (self.held[device], device == own), default=own)


class Reassembler:
    """Collects chunk sets; returns the inner message once a set is complete.

    Bounded (docs/protocol.md 8.3): per envelope device_id at most ``max_sets_per_device``
    incomplete sets and ``max_bytes_per_device`` bytes (never more than ``max_buffered_bytes``),
    over which its own oldest sets are evicted; a set declaring more than a device may hold is
    refused at its first chunk. Over ``max_buffered_bytes`` in all, the sets of the device holding
    the most are evicted, oldest first, unless that is the chunk's own device with nothing else to
    give up (the chunk is refused). Sets older than ``expiry_s`` are dropped. Sets completed
    recently are remembered, so a re-sent set is not decoded twice.
    """

    def __init__(
        self,
        limits: Limits = DEFAULT_LIMITS,
        *,
        max_sets_per_device: int = DEFAULT_MAX_SETS_PER_DEVICE,
        max_buffered_bytes: int = DEFAULT_MAX_BUFFERED_BYTES,
        max_bytes_per_device: int = DEFAULT_MAX_BYTES_PER_DEVICE,
        expiry_s: float = 120.0,
        remember_completed: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        for name, value in (("max_sets_per_device", max_sets_per_device), ("max_buffered_bytes", max_buffered_bytes),
                            ("max_bytes_per_device", max_bytes_per_device)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.limits = limits
        self.max_sets_per_device = max_sets_per_device
        self.max_buffered_bytes = max_buffered_bytes
        self.max_bytes_per_device = max_bytes_per_device
        self.expiry_s = expiry_s
        self.remember_completed = remember_completed
        self._clock = clock
        self._sets: dict[_Key, _PartialSet] = {}
        self._completed: OrderedDict[_Key, None] = OrderedDict()
        self._buffered = 0
        self._device_bytes: Counter[str] = Counter()
        self.counters: Counter[str] = Counter()

    @property
    def buffered_bytes(self) -> int:
        """Bytes held in incomplete sets."""
        return self._buffered

    @property
    def device_budget_bytes(self) -> int:
        """The most one device's incomplete sets may hold: ``max_bytes_per_device``, within the total."""
        return min(self.max_bytes_per_device, self.max_buffered_bytes)

    def buffered_bytes_of(self, device_id: str) -> int:
        """Bytes held in the incomplete sets of ``device_id``."""
        return self._device_bytes[device_id]

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

    def add(self, chunk: m.Chunk, *, decoder: Callable[[bytes], m.Message] | None = None) -> m.Message | None:
        """Store one decoded chunk; returns the message when its set completes, decoded by ``decoder``
        (default: :func:`decode` with this reassembler's limits)."""
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
        if partial is None and chunk.total_size > self.device_budget_bytes:
            self._refuse(f"a set of {chunk.total_size} bytes exceeds the {self.device_budget_bytes} bytes "
                         f"one device may buffer")
        if partial is not None and partial.received + len(chunk.data) > partial.total_size:
            self._drop(key, "overflowing_sets")
            raise ChunkError(f"chunks of set {chunk.message_id:#x} exceed its declared {partial.total_size} bytes")
        for victim, reason in self._plan_room(key, len(chunk.data), opening=partial is None):
            self._drop(victim, reason)
        partial = partial or self._open(key, chunk)
        partial.pieces[chunk.index] = chunk.data
        partial.received += len(chunk.data)
        self._buffered += len(chunk.data)
        self._device_bytes[key[0]] += len(chunk.data)
        return self._complete(key, partial, decoder) if len(partial.pieces) == partial.count else None

    def expire(self) -> int:
        """Drop sets older than ``expiry_s``; returns how many."""
        now = self._clock()
        stale = [key for key, s in self._sets.items() if now - s.started > self.expiry_s]
        for key in stale:
            self._drop(key, "expired_sets")
        return len(stale)

    def _plan_room(self, key: _Key, size: int, *, opening: bool) -> list[tuple[_Key, str]]:
        """The sets to evict before ``size`` more bytes of set ``key`` are stored (docs/protocol.md
        8.3, step 8); LimitError, evicting nothing, when no eviction the rules allow makes room."""
        plan, device = _EvictionPlan(self._sets, self._device_bytes, self._buffered, key), key[0]
        while opening and len(plan.queue(device)) >= self.max_sets_per_device:
            plan.evict(device, "evicted_sets")
        while plan.held[device] + size > self.device_budget_bytes:
            if not plan.queue(device):
                self._refuse(f"device {device!r} holds {plan.held[device]} of the {self.device_budget_bytes} "
                             f"bytes one device may buffer")
            plan.evict(device, "evicted_sets")
        while plan.total + size > self.max_buffered_bytes:
            holder = plan.largest_holder()
            if holder == device and not plan.queue(device):
                self._refuse(f"chunk buffer full ({self._buffered} of {self.max_buffered_bytes} bytes, "
                             f"{plan.held[device]} of them this device's)")
            plan.evict(holder, "evicted_for_space")
        return plan.victims

    def _open(self, key: _Key, chunk: m.Chunk) -> _PartialSet:
        partial = _PartialSet(chunk.count, chunk.total_size, self._clock())
        self._sets[key] = partial
        return partial

    def _refuse(self, reason: str) -> NoReturn:
        self.counters["rejected_chunks"] += 1
        raise LimitError(reason)

    def _complete(self, key: _Key, partial: _PartialSet, decoder: Callable[[bytes], m.Message] | None) -> m.Message:
        self._drop(key, None)
        self._completed[key] = None
        if len(self._completed) > self.remember_completed:
            self._completed.popitem(last=False)
        if partial.received != partial.total_size:
            self.counters["incomplete_sets"] += 1
            raise ChunkError(f"reassembled {partial.received} bytes, set declared {partial.total_size}")
        frame = b"".join(partial.pieces[i] for i in range(partial.count))
        message = decoder(frame) if decoder is not None else decode(frame, self.limits)
        if isinstance(message, m.Chunk):
            raise ChunkError("a chunk set must not contain another chunk")
        if message.envelope.device_id != key[0]:
            raise ChunkError(f"chunks from {key[0]!r} carried a message of {message.envelope.device_id!r}")
        self.counters["completed_sets"] += 1
        return message

    def _drop(self, key: _Key, reason: str | None) -> None:
        partial = self._sets.pop(key, None)
        if partial is None:
            return
        self._buffered -= partial.received
        self._device_bytes[key[0]] -= partial.received
        if not self._device_bytes[key[0]]:
            del self._device_bytes[key[0]]
        if reason is not None:
            self.counters[reason] += 1
            log.debug("dropped chunk set %s of %s: %s", key[1], key[0], reason)
