"""The receiving side in one place: reassembly, duplicate and stale filtering, counters.

A daemon or device feeds every payload to :meth:`Receiver.accept` and gets a message, ``None``
(a chunk or a duplicate, nothing to do), or a ``ProtocolError`` that it logs and moves past;
``Receiver.counters`` tells what was refused and why.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict

from edge_runtime.protocol import messages as m
from edge_runtime.protocol.chunking import Reassembler
from edge_runtime.protocol.errors import ProtocolError, StaleMessageError

log = logging.getLogger(__name__)
# Messages whose (device, round, step) identifies one piece of work: applying one twice is a bug.
STEP_KEYED = (m.Activations, m.Gradient, m.RoundUpdate)


class Deduplicator:
    """Remembers the last ``capacity`` (type, run, device, round, step) keys it has seen."""

    def __init__(self, capacity: int = 65536) -> None:
        self.capacity = capacity
        self._seen: OrderedDict[tuple, None] = OrderedDict()

    def is_duplicate(self, message: m.Message) -> bool:
        """True if this piece of work was seen before; records it otherwise."""
        if not isinstance(message, STEP_KEYED):
            return False
        env = message.envelope
        key = (type(message).__name__, env.run_id, env.device_id, env.round, env.step)
        if key in self._seen:
            self._seen.move_to_end(key)
            return True
        self._seen[key] = None
        if len(self._seen) > self.capacity:
            self._seen.popitem(last=False)
        return False


class Receiver:
    """Decode, reassemble, drop duplicates and stale rounds; count every outcome."""

    def __init__(self, run_id: str, reassembler: Reassembler | None = None, dedup: Deduplicator | None = None) -> None:
        self.run_id = run_id
        self.reassembler = reassembler or Reassembler()
        self.dedup = dedup or Deduplicator()
        self.min_round = 0
        self.counters: Counter[str] = Counter()

    def accept(self, data: bytes) -> m.Message | None:
        """The message in ``data``, None when there is nothing to act on, or a ProtocolError."""
        try:
            message = self.reassembler.feed(data)
            if message is not None:
                self._check(message)
        except ProtocolError as exc:
            self.counters[f"rejected.{type(exc).__name__}"] += 1
            raise
        if message is None:
            self.counters["chunks"] += 1
            return None
        if self.dedup.is_duplicate(message):
            self.counters["duplicates"] += 1
            return None
        self.counters[f"accepted.{type(message).__name__}"] += 1
        return message

    def _check(self, message: m.Message) -> None:
        env = message.envelope
        if env.run_id != self.run_id:
            raise StaleMessageError(f"message for run {env.run_id!r}, serving {self.run_id!r}")
        if isinstance(message, STEP_KEYED) and env.round < self.min_round:
            raise StaleMessageError(f"{type(message).__name__} for round {env.round}, serving round {self.min_round}")
