"""The uplink of the system model (docs/allocator.md) and a token bucket that emulates it.

``uplink_rate_bps`` is r = B log2(1 + p h / (N0 B)); ``channel_gain_from_distance`` is the
3GPP-style path loss 128.1 + 37.6 log10(d / km) dB as a linear gain; N0 defaults to -174 dBm/Hz.
``TokenBucket`` paces bytes at a fixed rate so a device on loopback sends as if over that radio
(``sflam device --emulate-link``). ``ShapedUplink`` is the kernel's version of the same link
(``sflam device --shaped-link IFACE``, which ``sflam simulate --network netem`` passes): the
device's own interface, in its own network namespace, has a tc token bucket filter that this
class re-rates to each allocation, and the interface's byte counter says what the link carried.
Standard library only (``tc`` from iproute2 for the shaped link).
"""

from __future__ import annotations

import math
import subprocess
import time
from collections.abc import Callable

NOISE_PSD_DBM_PER_HZ = -174.0


def dbm_per_hz_to_w_per_hz(dbm_per_hz: float) -> float:
    """dBm/Hz -> W/Hz: 10^((dBm - 30) / 10)."""
    return 10.0 ** ((dbm_per_hz - 30.0) / 10.0)


NOISE_PSD_W_PER_HZ = dbm_per_hz_to_w_per_hz(NOISE_PSD_DBM_PER_HZ)  # ~3.98e-21 W/Hz


def _positive(name: str, value: float) -> float:
    value = float(value)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return value


def path_loss_db(distance_m: float) -> float:
    """128.1 + 37.6 log10(d / 1 km) dB."""
    return 128.1 + 37.6 * math.log10(_positive("distance_m", distance_m) / 1000.0)


def channel_gain_from_distance(distance_m: float) -> float:
    """Linear channel power gain 10^(-PL/10) at ``distance_m`` metres."""
    return 10.0 ** (-path_loss_db(distance_m) / 10.0)


def uplink_rate_bps(bandwidth_hz: float, tx_power_w: float, channel_gain: float,
                    noise_psd_w_per_hz: float = NOISE_PSD_W_PER_HZ) -> float:
    """Shannon rate B log2(1 + p h / (N0 B)) in bit/s; ValueError for non-positive inputs."""
    b = _positive("bandwidth_hz", bandwidth_hz)
    p = _positive("tx_power_w", tx_power_w)
    h = _positive("channel_gain", channel_gain)
    n0 = _positive("noise_psd_w_per_hz", noise_psd_w_per_hz)
    return b * math.log2(1.0 + p * h / (n0 * b))


class TokenBucket:
    """Tokens (bits) accrue at ``rate_bps`` up to ``burst_bits``; ``pace`` waits for enough of them.

    ``pace(n)`` returns once n bytes have "gone out": it sleeps for whatever part of 8 n the bucket
    does not hold, so the long-run rate never exceeds ``rate_bps`` and n bytes sent from a full
    bucket take max(0, 8 n - burst) / rate seconds. A sleep that returns early leaves the bucket in
    debt, paid by the next call. ``clock`` and ``sleep`` are injectable so tests use simulated time.
    """

    def __init__(self, rate_bps: float, burst_bits: float, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.rate_bps = _positive("rate_bps", rate_bps)
        self.burst_bits = _positive("burst_bits", burst_bits)
        self._clock, self._sleep = clock, sleep
        self._tokens = self.burst_bits
        self._last = clock()
        self.last_delay_s = 0.0  # how long the last pace() asked to sleep
        self.total_airtime_s = 0.0

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.burst_bits, self._tokens + max(0.0, now - self._last) * self.rate_bps)
        self._last = now

    def pace(self, nbytes: int) -> float:
        """Block until ``nbytes`` may go; returns their airtime nbytes * 8 / rate (seconds)."""
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        bits = 8.0 * nbytes
        self._refill()
        delay = max(0.0, bits - self._tokens) / self.rate_bps
        if delay > 0:
            self._sleep(delay)
            now = self._clock()  # no cap while we waited: those tokens pay for these bits
            self._tokens += max(0.0, now - self._last) * self.rate_bps
            self._last = now
        self.last_delay_s = delay
        self._tokens = min(self.burst_bits, self._tokens - bits)
        airtime = bits / self.rate_bps
        self.total_airtime_s += airtime
        return airtime


class ShapedUplinkError(RuntimeError):
    """tc refused to shape the interface, or its byte counter cannot be read."""


class ShapedUplink:
    """The uplink as the kernel carries it: ``iface``'s egress shaped by a tc token bucket filter.

    ``set_rate(r)`` replaces the root qdisc with ``tbf rate r`` (a burst of BURST_S of the rate,
    at least BURST_MIN_BYTES; a queue of QUEUE_S of the rate, at least QUEUE_MIN_BYTES, so TCP
    is never the one dropping); ``tx_bytes()`` reads the interface's transmit byte counter,
    which counts every frame the link carried (headers, TCP acknowledgements and retransmissions
    included). ``airtime_s(n)`` is 8 n / rate: the time the shaped link is busy with n bytes.
    ``run`` is injectable for tests.
    """

    BURST_S, BURST_MIN_BYTES = 0.002, 3028  # two full frames: tbf needs at least one
    QUEUE_S, QUEUE_MIN_BYTES = 4.0, 256 * 1024

    def __init__(self, iface: str, run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> None:
        self.iface, self._run = iface, run
        self.rate_bps: float | None = None

    def tbf_args(self, rate_bps: float) -> list[str]:
        rate = max(8, int(round(_positive("rate_bps", rate_bps))))
        burst = max(self.BURST_MIN_BYTES, int(rate / 8 * self.BURST_S))
        limit = min(2**31 - 1, max(self.QUEUE_MIN_BYTES, int(rate / 8 * self.QUEUE_S)))  # tc's u32
        return ["tc", "qdisc", "replace", "dev", self.iface, "root", "tbf", "rate", f"{rate}bit",
                "burst", str(burst), "limit", str(limit)]

    def set_rate(self, rate_bps: float) -> None:
        """Shape ``iface`` at ``rate_bps`` (no-op when already there); ShapedUplinkError if tc fails."""
        if self.rate_bps == rate_bps:
            return
        cmd = self.tbf_args(rate_bps)
        try:
            done = self._run(cmd, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ShapedUplinkError(f"{' '.join(cmd)}: {exc}") from None
        if done.returncode != 0:
            raise ShapedUplinkError(f"{' '.join(cmd)}: {(done.stderr or '').strip() or 'exit ' + str(done.returncode)}")
        self.rate_bps = float(rate_bps)

    def tx_bytes(self) -> int:
        path = f"/sys/class/net/{self.iface}/statistics/tx_bytes"
        try:
            with open(path, encoding="ascii") as f:
                return int(f.read())
        except (OSError, ValueError) as exc:
            raise ShapedUplinkError(f"reading {path}: {exc}") from None

    def airtime_s(self, nbytes: int) -> float:
        if self.rate_bps is None:
            raise ShapedUplinkError(f"{self.iface}: no rate set yet")
        return 8.0 * nbytes / self.rate_bps


class RoundUplink:
    """A device's uplink for one round: paced by a TokenBucket (``--emulate-link``), shaped by
    the kernel (``--shaped-link``, a :class:`ShapedUplink`), or neither (the real link). The
    rate is r = B log2(1 + p h / (N0 B)) of the round's allocation.

    ``airtime_s`` of what a shaped interface carried since the round started: 8 x the change of
    its transmit byte counter (frames, headers, TCP acknowledgements, retransmissions) / r.
    """

    def __init__(self, bucket: TokenBucket | None = None, shaper: ShapedUplink | None = None) -> None:
        self.bucket, self.shaper = bucket, shaper
        self._tx0 = shaper.tx_bytes() if shaper is not None else 0

    @classmethod
    def start(cls, bandwidth_hz: float, tx_power_w: float, channel_gain: float | None, *, emulate: bool,
              shaper: ShapedUplink | None, burst_bits: float) -> "RoundUplink":
        """This round's uplink; ValueError for an allocation without a rate, ShapedUplinkError when
        tc refuses or the counter cannot be read."""
        if not emulate and shaper is None:
            return cls()
        rate = uplink_rate_bps(bandwidth_hz, tx_power_w, float(channel_gain))
        if shaper is not None:
            shaper.set_rate(rate)
            return cls(shaper=shaper)
        return cls(bucket=TokenBucket(rate, burst_bits))

    @property
    def rate_bps(self) -> float | None:
        """The emulated or shaped rate; None for the real link."""
        if self.bucket is not None:
            return self.bucket.rate_bps
        return self.shaper.rate_bps if self.shaper is not None else None

    def airtime_s(self) -> float:
        """A shaped link's airtime since the round started (0 for the others; ShapedUplinkError)."""
        return self.shaper.airtime_s(self.shaper.tx_bytes() - self._tx0) if self.shaper is not None else 0.0
