"""What the fleet page shows: the devices and the rounds, as snapshots built on the daemon's thread.

The daemon calls :meth:`FleetView.refresh` from its message loop (which does the work at most
every ``REFRESH_S``) and :meth:`FleetView.add_round` with each round record. The page's HTTP
threads (server_runtime/dashboard.py) only read the last published :class:`FleetSnapshot` and
encode it once per snapshot, so what a polling page costs the training is the refresh itself,
bounded by ``REFRESH_S`` and the fleet's size, never by how many pages poll or how often.
``GET /api/fleet`` is documented in docs/dashboard.md.
"""

from __future__ import annotations

import bisect
import json
import math
import statistics
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from server_runtime.config import RunConfig
from server_runtime.coordinator import DeviceInfo, DeviceRegistry, DeviceRound, RoundState
from server_runtime.round_record import AllocationRecord, RoundRecord

SCHEMA = 1  # of GET /api/fleet; grows only by new keys
REFRESH_S = 0.5  # the most often the daemon rebuilds the snapshot
MAX_REFRESH_SHARE = 0.02  # and a large fleet's refresh takes at most this share of the daemon's time
LATE_FACTOR = 1.5  # unfinished past this x the median finish time of half the round's devices: late
PHASES = ("waiting", "training")  # for devices, or a round in flight (the page says "finished" at the last round)


@dataclass
class DeviceHistory:
    """One device's run so far, from the round records."""

    energy_j: float = 0.0
    round_energy_j: float | None = None
    rounds_done: int = 0
    rounds_failed: int = 0
    failure: str | None = None  # of the last round it took part in (None when that one was done)
    allocation: AllocationRecord | None = None
    steps: int = 0

    def add(self, record: RoundRecord, device_id: str) -> None:
        """Take in the device's figures of one round record."""
        figures = record.devices[device_id]
        self.allocation, self.steps, self.round_energy_j = figures.allocation, figures.steps, figures.energy_j
        if figures.energy_j is not None and math.isfinite(figures.energy_j) and figures.energy_j >= 0:
            self.energy_j += figures.energy_j
        self.failure = record.failed.get(device_id)
        if self.failure is not None:
            self.rounds_failed += 1
        elif device_id in record.completed:
            self.rounds_done += 1


@dataclass(frozen=True)
class FleetSnapshot:
    """What ``GET /api/fleet`` returns, as of one refresh (``records``: how many round records)."""

    number: int
    generated: float
    run: Mapping[str, Any]
    devices: tuple[Mapping[str, Any], ...]
    records: int


@dataclass
class _RoundClock:
    """The round in flight as the view follows it: when each device was first seen finished."""

    plan_round: int
    started: float  # unix time
    deadline_s: float  # the plan's
    finished_after_s: dict[str, float] = field(default_factory=dict)


def run_info(config: RunConfig) -> dict[str, Any]:
    """The run's fixed facts the page shows."""
    training = config.training
    return {"run_id": config.broker.run_id, "mode": training.mode, "preset": config.model.preset,
            "rounds": training.rounds, "devices_per_round": training.devices_per_round,
            "bits": str(config.quant.bits), "deadline_s": config.round.deadline_s, "started": time.time()}


class FleetView:
    """The fleet as the page sees it: refreshed by the daemon, read by any number of HTTP threads."""

    def __init__(self, run: Mapping[str, Any], records: Iterable[RoundRecord] = ()) -> None:
        """``run``: :func:`run_info`; ``records``: the run's earlier rounds (a resumed run's)."""
        self._run = dict(run)
        self._records: list[bytes] = []  # each round record's JSON, append-only; HTTP threads slice it
        self._plan_rounds: list[int] = []
        self._history: dict[str, DeviceHistory] = {}
        self._last_record: RoundRecord | None = None
        self._clock: _RoundClock | None = None
        self._next_refresh = 0.0
        self._encoded: tuple[int, bytes] = (-1, b"")  # a snapshot's JSON without its rounds
        for record in records:
            self._take(record)
        before = {"round": None, "plan_round": None, "phase": PHASES[0], "online": 0, "needed": None,
                  "round_started": None, "counters": {}}  # until the daemon's first refresh
        self.snapshot = FleetSnapshot(0, time.time(), {**self._run, **before}, (), len(self._records))

    # -- the daemon's side -------------------------------------------------------------------------

    def due(self, now: float | None = None) -> bool:
        """Whether :meth:`refresh` would rebuild the snapshot now (``REFRESH_S`` since the last)."""
        return (time.monotonic() if now is None else now) >= self._next_refresh

    def refresh(self, registry: DeviceRegistry, state: RoundState | None, *, round: int, plan_round: int,
                needed: int) -> FleetSnapshot:
        """Publish a new snapshot of ``registry`` and the round in flight ``state`` (daemon thread)."""
        began, now = time.monotonic(), time.time()
        clock = self._follow(state, now)
        devices = tuple(self._row(info, state, clock, now) for _, info in sorted(registry.devices.items()))
        phase = PHASES[1] if state is not None else PHASES[0]
        last = self._last_record
        run = {**self._run, "round": round, "plan_round": plan_round, "phase": phase,
               "online": sum(1 for d in devices if d["status"] == "online"), "needed": needed,
               "round_started": clock.started if clock is not None else None,
               "counters": dict(last.counters) if last is not None else {}}
        self.snapshot = FleetSnapshot(self.snapshot.number + 1, now, run, devices, len(self._records))
        took = time.monotonic() - began
        self._next_refresh = began + max(REFRESH_S, took / MAX_REFRESH_SHARE)
        return self.snapshot

    def add_round(self, record: RoundRecord) -> None:
        """Take in a finished round's record (daemon thread); the next refresh shows it."""
        self._take(record)
        self._next_refresh = 0.0

    def _take(self, record: RoundRecord) -> None:
        for device_id in record.devices:
            self._history.setdefault(device_id, DeviceHistory()).add(record, device_id)
        self._records.append(_dump(record.to_dict()))
        self._plan_rounds.append(record.plan_round)
        self._last_record = record

    def _follow(self, state: RoundState | None, now: float) -> _RoundClock | None:
        """The clock of the round in flight: started, and when each device was first seen finished."""
        if state is None:
            self._clock = None
            return None
        if self._clock is None or self._clock.plan_round != state.plan_round:
            self._clock = _RoundClock(state.plan_round, now - (time.monotonic() - state.started_at),
                                      float(self._run.get("deadline_s", math.inf)))
        for device_id, member in state.devices.items():
            if member.update is not None and device_id not in self._clock.finished_after_s:
                self._clock.finished_after_s[device_id] = now - self._clock.started
        return self._clock

    def _row(self, info: DeviceInfo, state: RoundState | None, clock: _RoundClock | None,
             now: float) -> dict[str, Any]:
        """One device's line of the table."""
        past = self._history.get(info.device_id) or DeviceHistory()
        member = state.devices.get(info.device_id) if state is not None else None
        allocation = _allocation(member.allocation) if member is not None else past.allocation
        return {
            "id": info.device_id, "profile": info.profile, "backend": info.backend,
            "status": "online" if info.online else "offline", "last_seen": info.last_seen or None,
            "round_state": _round_state(member, clock, now, state.devices if state is not None else {}),
            "bits": allocation.bits_up if allocation else None, "bits_down": allocation.bits_down if allocation else None,
            "tx_power_w": allocation.tx_power_w if allocation else None,
            "bandwidth_hz": allocation.bandwidth_hz if allocation else None,
            "energy_j": past.energy_j, "round_energy_j": past.round_energy_j,
            "failure": member.failure if member is not None and member.failure else past.failure,
            "samples": info.num_samples, "steps": member.steps if member is not None else past.steps,
            "rounds_done": past.rounds_done, "rounds_failed": past.rounds_failed,
            "skipped_samples": info.skipped_samples,
        }

    # -- the HTTP threads' side --------------------------------------------------------------------

    def encoded(self, since: int | None = None) -> bytes:
        """``GET /api/fleet`` of the current snapshot as JSON bytes, with the round records whose plan
        round is above ``since`` (all without it). The snapshot is encoded once, each record once."""
        snap = self.snapshot
        number, head = self._encoded
        if number != snap.number:
            head = _dump({"schema": SCHEMA, "generated": snap.generated, "snapshot": snap.number, "run": snap.run,
                          "devices": snap.devices})[:-1]  # without its closing brace
            self._encoded = (snap.number, head)
        first = 0 if since is None else bisect.bisect_right(self._plan_rounds, since, 0, snap.records)
        return head + b',"rounds":[' + b",".join(self._records[first:snap.records]) + b"]}"


def _allocation(allocation) -> AllocationRecord:
    return AllocationRecord(allocation.bits_up, allocation.bits_down, allocation.tx_power_w, allocation.bandwidth_hz)


def _round_state(member: DeviceRound | None, clock: _RoundClock | None, now: float,
                 devices: Mapping[str, DeviceRound]) -> str:
    """idle, selected, training, done, late or failed (docs/dashboard.md)."""
    if member is None or clock is None:
        return "idle"
    if member.failure is not None:
        return "failed"
    if member.update is not None:
        return "done"
    if _is_late(clock, now, len(devices)):
        return "late"
    return "training" if member.steps > 0 else "selected"


def _is_late(clock: _RoundClock, now: float, selected: int) -> bool:
    """An unfinished device is late past the plan's deadline (the server's grace is running out),
    or once half the round's devices finished and it is past ``LATE_FACTOR`` x their median time."""
    elapsed, finished = now - clock.started, list(clock.finished_after_s.values())
    if elapsed > clock.deadline_s:
        return True
    return bool(finished) and 2 * len(finished) >= selected and elapsed > LATE_FACTOR * statistics.median(finished)


def _dump(value: Any) -> bytes:
    """Compact JSON; NaN and infinities (a diverged loss) become null, which every JSON parser reads."""
    try:
        text = json.dumps(value, separators=(",", ":"), allow_nan=False)
    except ValueError:
        text = json.dumps(_finite(value), separators=(",", ":"), allow_nan=False)
    return text.encode("utf-8")


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value
