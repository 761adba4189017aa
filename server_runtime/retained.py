"""Publishing the retained ``plan`` and ``model`` (docs/protocol.md 8.5), and the plan-round lease.

A message too large for one frame is retained chunk by chunk on ``{kind}/c/{i}``; whatever the
previous message left beyond the new one is cleared with empty retained payloads, so exactly
one message stays retained under ``{kind}/#``. How many chunk sub-topics are retained is kept
in the lease file (``issued.json``) next to the checkpoints, written *before* publishing, so a
server restarted with ``--resume`` knows what to clear and never reuses a plan round.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from edge_runtime import protocol as p

log = logging.getLogger(__name__)
LEASE_FILE = "issued.json"
KINDS = ("plan", "model")


@dataclass
class Lease:
    """The last plan round issued and the chunk sub-topics left retained per kind."""

    plan_round: int = 0
    parts: dict[str, int] = field(default_factory=lambda: {kind: 0 for kind in KINDS})

    @classmethod
    def read(cls, directory: Path) -> "Lease":
        """The lease in ``directory``; a fresh one when there is none (a malformed file is an error)."""
        path = directory / LEASE_FILE
        if not path.exists():
            return cls()
        try:
            data = json.loads(path.read_text())
            return cls(int(data["plan_round"]), {kind: int(data["parts"][kind]) for kind in KINDS})
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: unreadable plan-round lease ({exc}); remove it only if no run uses this directory") from None

    def write(self, directory: Path) -> None:
        """Atomically replace the lease file (temp file + fsync + rename)."""
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".{LEASE_FILE}.tmp"
        with open(tmp, "w") as f:
            json.dump({"plan_round": self.plan_round, "parts": self.parts}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, directory / LEASE_FILE)


class RetainedPublisher:
    """Publishes plan/model retained, chunked onto sub-topics when needed, clearing leftovers."""

    def __init__(self, link, topics: p.Topics, max_frame_bytes: int, lease: Lease, lease_dir: Path,
                 signer: p.SigningKey | None = None) -> None:
        self.link, self.topics, self.max_frame_bytes, self.signer = link, topics, max_frame_bytes, signer
        self.lease, self.lease_dir = lease, lease_dir

    def issue(self, plan_round: int) -> None:
        """Record ``plan_round`` as issued before anything of it is published."""
        self.lease.plan_round = plan_round
        self.lease.write(self.lease_dir)

    def publish(self, kind: str, message: p.Message) -> int:
        """Retain ``message`` under ``kind``; returns the bytes published."""
        frames = p.split(message, self.max_frame_bytes, self.signer)
        previous = self.lease.parts[kind]
        new_parts = len(frames) if len(frames) > 1 else 0
        self.lease.parts[kind] = max(previous, new_parts)  # covers a crash mid-publish
        self.lease.write(self.lease_dir)
        if new_parts:
            for index, frame in enumerate(frames):
                self.link.publish(self.topics.retained_part(kind, index), frame, retain=True)
            if previous == 0:
                self.link.publish(self._whole(kind), b"", retain=True)
        else:
            self.link.publish(self._whole(kind), frames[0], retain=True)
        for index in range(new_parts, previous):
            self.link.publish(self.topics.retained_part(kind, index), b"", retain=True)
        self.lease.parts[kind] = new_parts
        self.lease.write(self.lease_dir)
        return sum(len(f) for f in frames)

    def clear(self, kind: str) -> None:
        """Leave nothing retained under ``kind`` (end of run)."""
        self.link.publish(self._whole(kind), b"", retain=True)
        for index in range(self.lease.parts[kind]):
            self.link.publish(self.topics.retained_part(kind, index), b"", retain=True)
        self.lease.parts[kind] = 0
        self.lease.write(self.lease_dir)

    def _whole(self, kind: str) -> str:
        return self.topics.plan() if kind == "plan" else self.topics.model()
