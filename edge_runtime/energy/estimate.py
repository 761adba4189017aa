"""The fallback when no power monitor is readable: energy from CPU time and the device profile.

E = kappa * cycles * f^2 (docs/allocator.md) with cycles = CPU seconds * f, where CPU seconds
is this process's user + system time over the interval (``time.process_time``, every thread and
so every core included) and f, kappa are the profile's ``compute.cpu_freq_hz`` and
``compute.effective_capacitance``. It counts the CPU only, at the profile's clock, so it is an
estimate and every reading says so.
"""

from __future__ import annotations

import time

from edge_runtime.energy.base import ESTIMATED, Clock, MeterError, Reading
from firmware_profiles import DeviceProfile


class EstimateMeter:
    """kappa * (CPU seconds * f) * f^2 of this process, labelled ``estimated``."""

    name = "estimate"
    kind = ESTIMATED
    fallback_reason: str | None = None  # set by open_meter("auto") when no measured meter worked

    def __init__(
        self, profile: DeviceProfile, *, cpu_clock: Clock = time.process_time, wall_clock: Clock = time.monotonic
    ) -> None:
        if profile is None:
            raise MeterError("estimate: the estimator needs a device profile (kappa and cpu_freq_hz)")
        self.profile = profile
        self._cpu_clock, self._wall_clock = cpu_clock, wall_clock
        self._start: tuple[float, float] | None = None
        self.cpu_seconds = 0.0  # of the last interval

    def start(self) -> None:
        """Record CPU and wall time."""
        self._start = (self._cpu_clock(), self._wall_clock())

    def stop(self) -> Reading:
        """The estimate for the CPU time used since start."""
        if self._start is None:
            raise MeterError("estimate: stop() without start()")
        (cpu0, wall0), self._start = self._start, None
        self.cpu_seconds = self._cpu_clock() - cpu0
        if not self.cpu_seconds > 0:
            raise MeterError("estimate: the process used no measurable CPU time over the interval")
        compute = self.profile.compute
        cycles = self.cpu_seconds * compute.cpu_freq_hz
        energy_j = compute.effective_capacitance * cycles * compute.cpu_freq_hz**2
        source = (f"estimate: kappa*c*f^2 from {self.cpu_seconds:.3f} CPU s at "
                  f"{compute.cpu_freq_hz:.3g} Hz ({self.profile.name} profile)")
        return Reading(energy_j, self._wall_clock() - wall0, ESTIMATED, source)
