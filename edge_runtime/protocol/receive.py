"""The receiving side in one place: reassembly, topic, run, duplicate and stale checks, counters.

A daemon or device feeds every payload (with the topic it arrived on) to
:meth:`Receiver.accept` and gets a message, ``None`` (nothing to act on: a chunk, a duplicate,
an empty retained-clear payload) or a ``ProtocolError`` that it logs and moves past. Replays are
refused by three checks: work and round broadcasts seen before are duplicates (``Deduplicator``),
those of a finished round are stale (``min_round``), and a device's Hello or Status not newer than
its last one is a duplicate or stale (``PresenceOrder``);
``Receiver.counters`` tells what was refused and why.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable

from edge_runtime.protocol import messages as m
from edge_runtime.protocol.chunking import Reassembler
from edge_runtime.protocol.codec import Limits, decode
from edge_runtime.protocol.errors import ForeignRunError, ProtocolError, StaleMessageError, TopicError
from edge_runtime.protocol.signing import SERVER_KEY_ID, Keyring
from edge_runtime.protocol.topics import TopicRef, Topics

log = logging.getLogger(__name__)
# Messages whose (device, round, step) identifies one piece of work: applying one twice is a bug.
STEP_KEYED = (m.Activations, m.Gradient, m.RoundUpdate)
# Messages that belong to one round: refused once that round is over (``Receiver.min_round``),
# dropped as duplicates when seen again (a plan and a model are issued once per plan round; a
# retained one comes again after every reconnect).
ROUND_KEYED = STEP_KEYED + (m.RoundPlan, m.ModelWeights)
# Presence: ordered per device by (created_at, step), see PresenceOrder.
PRESENCE = (m.Hello, m.Status)
# Topics whose frames reach every device of a run as the same bytes.
BROADCAST_KINDS = ("plan", "model")
# Topics a device signs (its own); the server signs every other kind.
DEVICE_SIGNED = ("up", "status")
# Which messages may arrive on which kind of topic (chunks carry any of them).
ALLOWED_ON = {
    "up": (m.Hello, m.Activations, m.RoundUpdate, m.ErrorReport),
    "down": (m.Gradient, m.ErrorReport),
    "status": (m.Status,),
    "plan": (m.RoundPlan,),
    "model": (m.ModelWeights,),
}


def signer_of(ref: TopicRef | None) -> str | None:
    """Whose signature a frame on ``ref`` must carry: the device on its own ``up`` and ``status``,
    the server on ``down``, ``plan`` and ``model``; None (any key of the ring) without a topic."""
    if ref is None:
        return None
    return ref.device_id if ref.kind in DEVICE_SIGNED else SERVER_KEY_ID


class Deduplicator:
    """Remembers the last ``capacity`` (type, run, device, round, step) keys it has seen."""

    def __init__(self, capacity: int = 65536) -> None:
        self.capacity = capacity
        self._seen: OrderedDict[tuple, None] = OrderedDict()

    def is_duplicate(self, message: m.Message) -> bool:
        """True if this piece of work (or this round's plan or model) was seen before; records it otherwise."""
        if not isinstance(message, ROUND_KEYED):
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


class PresenceOrder:
    """Per device, the newest Hello and the newest Status seen; older ones are replays.

    A device stamps every Hello with the time it made it, and its online Status and the last
    will of one connection with that connection's start time, steps 0 and 1 (so the will, which
    the broker publishes later, supersedes the online Status it was registered with). A Hello or
    Status that is not newer than the newest of its kind from that device is a replay, or a
    delayed copy: telling the server "online" or "offline" again from it would be a lie.
    Memory: one stamp per (kind, device) seen, at most ``capacity`` of them (the oldest forgotten).
    """

    def __init__(self, capacity: int = 65536) -> None:
        self.capacity = capacity
        self._newest: OrderedDict[tuple[str, str], tuple[float, int]] = OrderedDict()

    def check(self, message: m.Message) -> bool:
        """True when ``message`` is newer than its device's last of its kind (recorded); False when
        it is the same one again; StaleMessageError when it is older."""
        env = message.envelope
        key, stamp = (type(message).__name__, env.device_id), (env.created_at, env.step)
        newest = self._newest.get(key)
        if newest is not None and stamp <= newest:
            if stamp == newest:
                return False
            raise StaleMessageError(f"{key[0]} from {env.device_id!r} made at {env.created_at:.3f}, "
                                    f"older than the last one (made at {newest[0]:.3f}): a replay")
        self._newest[key] = stamp
        self._newest.move_to_end(key)
        if len(self._newest) > self.capacity:
            self._newest.popitem(last=False)
        return True


class Receiver:
    """Decode, reassemble, check topic/run/round, drop duplicates; count every outcome."""

    def __init__(self, run_id: str, reassembler: Reassembler | None = None, dedup: Deduplicator | None = None,
                 broadcast_decode: Callable[..., m.Message] | None = None, keys: Keyring | None = None) -> None:
        self.topics = Topics(run_id)
        # signed mode: every frame must carry the signature of the party allowed on its topic
        # (signer_of); None: unsigned mode, signatures are not checked (docs/protocol.md 2.6)
        self.keys = keys
        # how frames on the broadcast topics (plan, model) are decoded: a device host passes one
        # shared decoder, so the identical bytes every device receives are decoded once
        self.broadcast_decode = broadcast_decode or decode
        self.reassembler = reassembler or Reassembler()
        self.dedup = dedup or Deduplicator()
        self.presence = PresenceOrder()
        self.min_round = 0
        self.counters: Counter[str] = Counter()
        # Envelope of the last duplicate dropped (a whole message, or a chunk of a set already
        # delivered): lets a server re-answer a step whose reply was lost.
        self.last_duplicate: m.Envelope | None = None
        self._logged_at, self._unlogged = 0.0, 0

    def log_refusal(self, topic: str, exc: ProtocolError) -> None:
        """Log a refused message: at most one line a second, saying how many went unlogged (a flood
        of hostile input must not become a flood of log lines; the counters have every one)."""
        now = time.monotonic()
        if now - self._logged_at < 1.0:
            self._unlogged += 1
            return
        more = f" (and {self._unlogged} more refused since the last line)" if self._unlogged else ""
        log.warning("refused a message on %s: %s%s", topic, exc, more)
        self._logged_at, self._unlogged = now, 0

    @property
    def run_id(self) -> str:
        return self.topics.run_id

    def accept(self, data: bytes, topic: str | None = None) -> m.Message | None:
        """The message in ``data``, None when there is nothing to act on, or a ProtocolError."""
        self.last_duplicate = None
        if not data:  # an empty publish clears a retained topic: not an error
            self.counters["empty"] += 1
            return None
        if self.keys is not None:
            self.keys.refresh()  # a revoked device's key leaves the ring without a restart
        try:
            message = self._receive(data, topic)
        except ProtocolError as exc:
            self.counters[f"rejected.{type(exc).__name__}"] += 1
            raise
        if message is None:
            return None
        if self.dedup.is_duplicate(message):
            self._duplicate(message.envelope)
            return None
        if isinstance(message, PRESENCE) and not self._fresh_presence(message):
            self.counters["duplicates"] += 1
            return None
        self.counters[f"accepted.{type(message).__name__}"] += 1
        return message

    def _receive(self, data: bytes, topic: str | None) -> m.Message | None:
        ref = self.topics.parse(topic) if topic is not None else None
        broadcast = ref is not None and ref.kind in BROADCAST_KINDS
        limits, signer = self.reassembler.limits, signer_of(ref)
        # a device host shares the decoding (and signature check) of broadcast frames, the frame a
        # chunked plan or model carries included: every device reassembles the same bytes
        decoding = self.broadcast_decode if broadcast else decode
        message = decoding(data, limits, keys=self.keys, signer=signer)
        self._check_origin(message, ref)  # before a chunk takes buffer space
        if isinstance(message, m.Chunk):
            late = self.reassembler.is_completed(message)
            chunk, message = message, self.reassembler.add(
                message, decoder=lambda frame: decoding(frame, limits, keys=self.keys, signer=signer))
            if message is None:
                if late:
                    self._duplicate(chunk.envelope)
                else:
                    self.counters["chunks"] += 1
                return None
            self._check_origin(message, ref)
        if ref is not None and not isinstance(message, ALLOWED_ON[ref.kind]):
            raise TopicError(f"{type(message).__name__} does not belong on a {ref.kind!r} topic")
        if isinstance(message, ROUND_KEYED) and message.envelope.round < self.min_round:
            raise StaleMessageError(
                f"{type(message).__name__} for round {message.envelope.round}, serving round {self.min_round}"
            )
        return message

    def _fresh_presence(self, message: m.Message) -> bool:
        try:
            return self.presence.check(message)
        except StaleMessageError as exc:
            self.counters[f"rejected.{type(exc).__name__}"] += 1
            raise

    def _duplicate(self, envelope: m.Envelope) -> None:
        self.counters["duplicates"] += 1
        self.last_duplicate = envelope

    def _check_origin(self, message: m.Message, ref: TopicRef | None) -> None:
        env = message.envelope
        if env.run_id != self.run_id:
            raise ForeignRunError(f"message for run {env.run_id!r}, this is run {self.run_id!r}")
        if ref is not None and ref.device_id is not None and env.device_id != ref.device_id:
            raise TopicError(f"envelope claims device {env.device_id!r} on the topic of {ref.device_id!r}")
        if ref is not None and ref.device_id is None and env.device_id != m.SERVER_ID:
            raise TopicError(f"envelope claims device {env.device_id!r} on the broadcast {ref.kind!r} topic, "
                             f"which only the server ({m.SERVER_ID!r}) publishes")
