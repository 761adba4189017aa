"""Who is online, who trains this round with which allocation, and how a round ends.

The coordinator is plain bookkeeping (no MQTT, no torch): the daemon feeds it the devices'
``Hello`` and ``Status`` messages and the round's events, and asks it which devices to select,
what to allocate and whether the round counts. Devices that miss the deadline, go offline or
send something unusable become *failures*, recorded as data with a reason.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from edge_runtime import protocol as p
from server_runtime.round_record import AllocationRecord, DeviceRoundRecord

log = logging.getLogger(__name__)
FALLBACK_TX_POWER_W = 0.1  # a device whose profile is unknown: a typical phone's 20 dBm


@dataclass
class DeviceInfo:
    """What the server knows about one device."""

    device_id: str
    online: bool = False
    profile: str = "unknown"
    backend: str = "unknown"
    num_samples: int = 0
    last_seen: float = 0.0
    last_telemetry: p.Telemetry | None = None
    announced: bool = False  # a Hello came: profile and sample count are the device's own
    skipped_samples: int = 0  # local images the device could not read (its Hello says)


class DeviceRegistry:
    """Devices seen on the run's topics, kept current by Hello, Status and RoundUpdate."""

    def __init__(self) -> None:
        self.devices: dict[str, DeviceInfo] = {}

    def _get(self, device_id: str) -> DeviceInfo:
        return self.devices.setdefault(device_id, DeviceInfo(device_id))

    def on_hello(self, hello: p.Hello) -> DeviceInfo:
        """A device (re)announced itself: online, with its profile and sample count."""
        info = self._get(hello.envelope.device_id)
        info.online, info.last_seen = True, time.time()
        info.profile, info.backend, info.num_samples = hello.profile, hello.backend, hello.num_samples
        info.announced = True
        if hello.skipped_samples != info.skipped_samples:
            log.warning("device %s skips %d unreadable image(s) of its data", info.device_id, hello.skipped_samples)
            info.skipped_samples = hello.skipped_samples
        if hello.last_telemetry is not None:
            info.last_telemetry = hello.last_telemetry
        return info

    def on_status(self, status: p.Status) -> DeviceInfo:
        """Retained presence (or the last will): online or offline."""
        info = self._get(status.envelope.device_id)
        info.online, info.last_seen = status.online, time.time()
        return info

    def on_update(self, update: p.RoundUpdate) -> None:
        """A round result: the device is alive and its telemetry is the freshest."""
        info = self._get(update.envelope.device_id)
        info.online, info.last_seen, info.last_telemetry = True, time.time(), update.telemetry

    def seen(self, device_id: str) -> None:
        """A known device sent something the server accepted (a step): it is alive now."""
        info = self.devices.get(device_id)
        if info is not None:
            info.last_seen = time.time()

    def announced_count(self) -> int:
        """Devices that announced themselves with a Hello during this run."""
        return sum(1 for info in self.devices.values() if info.announced)

    def online(self) -> list[str]:
        """Ids of the devices online now and announced by a Hello, sorted (selection is seeded over
        this order). One known only by its retained Status (a server that started after the device's
        Hello) waits for the device's next heartbeat Hello, which brings its profile and samples."""
        return sorted(d for d, info in self.devices.items() if info.online and info.announced)


def select_devices(online: list[str], k: int, seed: int, plan_round: int) -> tuple[str, ...]:
    """``min(k, len(online))`` devices drawn without replacement, seeded by (seed, plan round)."""
    if k < 1:
        raise ValueError(f"devices per round must be >= 1, got {k}")
    rng = np.random.default_rng((seed, plan_round))
    chosen = rng.choice(len(online), size=min(k, len(online)), replace=False)
    return tuple(sorted(online[i] for i in chosen))


def profile_tx_power_w(profile: str) -> float:
    """The profile's maximum transmit power, or FALLBACK_TX_POWER_W when it is unknown."""
    try:
        from firmware_profiles import load_profile

        return float(load_profile(profile).radio.max_tx_power_w)
    except (ImportError, ValueError, OSError) as exc:
        log.info("no profile %r for the transmit power (%s): using %.2f W", profile, exc, FALLBACK_TX_POWER_W)
        return FALLBACK_TX_POWER_W


@dataclass(frozen=True)
class FixedAllocation:
    """The allocation before the allocator exists: fixed bits, max power, equal bandwidth."""

    bits_up: int
    bits_down: int
    per_token: bool
    total_bandwidth_hz: float

    def allocate(self, selected: tuple[str, ...], registry: DeviceRegistry) -> tuple[p.Allocation, ...]:
        """One Allocation per selected device."""
        share = self.total_bandwidth_hz / max(1, len(selected))
        return tuple(
            p.Allocation(d, self.bits_up, self.bits_down, profile_tx_power_w(registry._get(d).profile), share, self.per_token)
            for d in selected
        )


@dataclass
class DeviceRound:
    """One selected device's progress and costs within a round."""

    allocation: p.Allocation
    steps: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    server_time_s: float = 0.0
    downlink_time_s: float = 0.0
    update: p.RoundUpdate | None = None
    failure: str | None = None
    offline: tuple[float, str] | None = None  # (since, reason) while reported offline
    outages: int = 0  # times reported offline during the round
    offline_s: float = 0.0  # time offline during the round (of outages that ended)
    repeated: int = 0  # messages received again (re-sent steps), answered but not trained twice

    @property
    def finished(self) -> bool:
        return self.update is not None or self.failure is not None

    def record(self, rank: int) -> DeviceRoundRecord:
        """This device's figures for the round's metrics; its telemetry's are None when no update came."""
        tel, a = (self.update.telemetry if self.update is not None else None), self.allocation
        return DeviceRoundRecord(
            bytes_up=self.bytes_up, bytes_down=self.bytes_down, steps=self.steps,
            server_time_s=self.server_time_s, downlink_time_s=self.downlink_time_s,
            compute_time_s=tel.compute_time_s if tel else None, uplink_time_s=tel.uplink_time_s if tel else None,
            device_steps=tel.steps if tel else None, energy_j=tel.energy_j if tel else None,
            energy_source=tel.energy_source if tel else None,
            allocation=AllocationRecord(a.bits_up, a.bits_down, a.tx_power_w, a.bandwidth_hz), trainer_rank=rank,
            outages=self.outages, offline_s=round(self.offline_s, 3), repeated=self.repeated,
        )


@dataclass
class RoundState:
    """The round in flight: plan round, selected devices and their progress, the deadline."""

    round: int  # training round this attempt would complete
    plan_round: int  # wire round (unique per attempt)
    devices: dict[str, DeviceRound]
    deadline: float  # time.monotonic() after which unfinished devices fail
    lr: float  # this round's learning rate (training.lr_at), on both sides of the split
    started_at: float = field(default_factory=time.monotonic)

    @property
    def done(self) -> bool:
        return all(d.finished for d in self.devices.values())

    def completed(self) -> list[str]:
        return sorted(d for d, state in self.devices.items() if state.update is not None)

    def uploads(self) -> dict[str, tuple[dict[str, np.ndarray], int]]:
        """The completed devices' uploaded weights with their sample counts."""
        return {d: (p.weights_to_numpy(self.devices[d].update.weights), self.devices[d].update.num_samples)
                for d in self.completed()}

    def failures(self) -> dict[str, str]:
        return {d: state.failure for d, state in sorted(self.devices.items()) if state.failure is not None}

    def fail(self, device_id: str, reason: str) -> None:
        """Mark a selected device failed unless it already finished."""
        state = self.devices.get(device_id)
        if state is not None and not state.finished:
            state.failure = reason
            log.warning("round %d: device %s failed (%s)", self.round, device_id, reason)

    def revoke(self, device_id: str, reason: str) -> None:
        """Fail a selected device even if it already uploaded: the server half of its training is
        gone (its trainer rank was lost), so its update cannot be aggregated."""
        state = self.devices.get(device_id)
        if state is not None and state.failure is None:
            state.update, state.failure = None, reason
            log.warning("round %d: device %s failed (%s)", self.round, device_id, reason)

    def went_offline(self, device_id: str, reason: str, now: float) -> None:
        """A selected device's Status said offline (its last will, or a clean shutdown)."""
        state = self.devices.get(device_id)
        if state is not None and not state.finished and state.offline is None:
            state.offline = (now, reason)
            state.outages += 1
            log.info("round %d: device %s offline (%s); waiting for it to come back", self.round, device_id, reason)

    def came_online(self, device_id: str) -> None:
        """The device reconnected (online Status or Hello): it goes on with the round."""
        state = self.devices.get(device_id)
        if state is not None and state.offline is not None:
            away = time.monotonic() - state.offline[0]
            log.info("round %d: device %s back online after %.1f s", self.round, device_id, away)
            state.offline_s += away
            state.offline = None

    def expire(self, now: float, offline_grace_s: float = 0.0) -> None:
        """Past the deadline every unfinished device fails with reason ``deadline``; a device
        offline for longer than ``offline_grace_s`` fails with the reason it went offline."""
        for device_id, state in self.devices.items():
            if state.offline is not None and now - state.offline[0] >= offline_grace_s:
                self.fail(device_id, f"offline ({state.offline[1]})")
        if now >= self.deadline:
            for device_id in self.devices:
                self.fail(device_id, "deadline")

    def counts(self, min_completed: float) -> bool:
        """The minimum-completion policy: at least ceil(fraction x selected), and at least one."""
        need = max(1, int(np.ceil(min_completed * len(self.devices) - 1e-9)))
        return len(self.completed()) >= need
