"""The MQTT topic layout (docs/protocol.md section 1). No topic string is formatted anywhere else.

All topics live under ``sflam/v1/{run_id}/``::

    plan                   server -> devices   QoS 1, retained
    model                  server -> devices   QoS 1, retained
    d/{device_id}/up       device -> server    QoS 1
    d/{device_id}/down     server -> device    QoS 1
    d/{device_id}/status   device (last will)  QoS 1, retained

A retained message too large for one publish (plan or model) is chunked onto retained
sub-topics ``plan/c/{i}`` / ``model/c/{i}`` so a late subscriber to ``model/#`` receives every
chunk; non-retained chunks travel on the message's own topic.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from edge_runtime.protocol.errors import TopicError

ROOT = "sflam/v1"
QOS = 1
_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_INDEX = re.compile(r"0|[1-9][0-9]{0,5}")
MAX_PARTS = 1_000_000  # what _INDEX accepts; far above Limits.max_chunks
RETAINED = frozenset({"plan", "model", "status"})
DEVICE_KINDS = ("up", "down", "status")


def check_id(value: str, what: str) -> str:
    """A run or device id usable as one topic level: 1-64 of [A-Za-z0-9_.-]."""
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise TopicError(f"{what} must be 1-64 characters of A-Z a-z 0-9 _ . -, got {value!r}")
    return value


@dataclass(frozen=True)
class TopicRef:
    """A parsed topic: which run, which kind, which device (None for plan/model)."""

    run_id: str
    kind: str
    device_id: str | None = None
    part: int | None = None  # chunk index of a chunked retained message

    @property
    def retained(self) -> bool:
        return self.kind in RETAINED


@dataclass(frozen=True)
class Topics:
    """Topic builders for one run."""

    run_id: str

    def __post_init__(self) -> None:
        check_id(self.run_id, "run id")

    @property
    def prefix(self) -> str:
        return f"{ROOT}/{self.run_id}"

    def plan(self) -> str:
        return f"{self.prefix}/plan"

    def retained_part(self, kind: str, index: int) -> str:
        """Where chunk ``index`` of a chunked retained ``plan``/``model`` message is retained."""
        if kind not in ("plan", "model"):
            raise TopicError(f"only plan and model are chunked onto sub-topics, got {kind!r}")
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < MAX_PARTS:
            raise TopicError(f"chunk index must be an integer in [0, {MAX_PARTS}), got {index!r}")
        return f"{self.prefix}/{kind}/c/{index}"

    def retained_filter(self, kind: str) -> str:
        """Subscription filter for a retained message and its chunk sub-topics (``model/#``)."""
        if kind not in ("plan", "model"):
            raise TopicError(f"retained kinds are plan and model, got {kind!r}")
        return f"{self.prefix}/{kind}/#"

    def model(self) -> str:
        return f"{self.prefix}/model"

    def device(self, device_id: str, kind: str) -> str:
        """``d/{device_id}/{kind}`` for kind in up, down, status."""
        if kind not in DEVICE_KINDS:
            raise TopicError(f"device topic kind must be one of {DEVICE_KINDS}, got {kind!r}")
        return f"{self.prefix}/d/{check_id(device_id, 'device id')}/{kind}"

    def up(self, device_id: str) -> str:
        return self.device(device_id, "up")

    def down(self, device_id: str) -> str:
        return self.device(device_id, "down")

    def status(self, device_id: str) -> str:
        return self.device(device_id, "status")

    def all_devices(self, kind: str) -> str:
        """Subscription filter for one kind of every device's topic (``d/+/up``)."""
        if kind not in DEVICE_KINDS:
            raise TopicError(f"device topic kind must be one of {DEVICE_KINDS}, got {kind!r}")
        return f"{self.prefix}/d/+/{kind}"

    def shared(self, group: str, kind: str) -> str:
        """An MQTT 5 shared subscription over every device's ``kind`` topic."""
        return f"$share/{check_id(group, 'share group')}/{self.all_devices(kind)}"

    def parse(self, topic: str) -> TopicRef:
        """Which topic of this run ``topic`` is; TopicError for anything else."""
        ref = parse_topic(topic)
        if ref.run_id != self.run_id:
            raise TopicError(f"topic {topic!r} belongs to run {ref.run_id!r}, not {self.run_id!r}")
        return ref


def parse_topic(topic: str) -> TopicRef:
    """Parse any sflam topic."""
    parts = topic.split("/")
    if len(parts) < 4 or "/".join(parts[:2]) != ROOT:
        raise TopicError(f"not an sflam topic: {topic!r}")
    run_id = check_id(parts[2], "run id")
    rest = parts[3:]
    if rest in (["plan"], ["model"]):
        return TopicRef(run_id, rest[0])
    if len(rest) == 3 and rest[0] in ("plan", "model") and rest[1] == "c" and _INDEX.fullmatch(rest[2]):
        return TopicRef(run_id, rest[0], None, int(rest[2]))
    if len(rest) == 3 and rest[0] == "d" and rest[2] in DEVICE_KINDS:
        return TopicRef(run_id, rest[2], check_id(rest[1], "device id"))
    raise TopicError(f"not an sflam topic: {topic!r}")
