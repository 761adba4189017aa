"""The meter interface shared by every energy reader, and sampled power integration.

A meter measures one interval: ``start()`` then ``stop() -> Reading``. Every reading is
labelled ``measured`` (a hardware counter or power monitor) or ``estimated`` (the profile's
kappa * cycles * f^2 model). A meter that cannot produce a number raises :class:`MeterError`
saying why; it never returns a silent zero.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

MEASURED = "measured"
ESTIMATED = "estimated"
KINDS = (MEASURED, ESTIMATED)

Clock = Callable[[], float]


class MeterError(RuntimeError):
    """A meter that is absent, unreadable, misused or produced an implausible value."""


@dataclass(frozen=True)
class Reading:
    """Energy over one start/stop interval: joules, wall seconds, and where they came from."""

    energy_j: float
    seconds: float
    kind: str  # "measured" | "estimated"
    source: str  # e.g. "rapl: package-0 + package-1"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Reading.kind must be one of {KINDS}, got {self.kind!r}")
        if not self.energy_j > 0:
            raise MeterError(f"{self.source}: no energy counted ({self.energy_j} J over {self.seconds:.3f} s)")

    @property
    def power_w(self) -> float:
        """Mean power over the interval."""
        return self.energy_j / self.seconds if self.seconds > 0 else float("nan")


class Meter(Protocol):
    """What every energy reader offers."""

    name: str
    kind: str  # "measured" | "estimated"

    def start(self) -> None:
        """Begin an interval."""
        ...

    def stop(self) -> Reading:
        """End the interval started last; MeterError when no energy could be counted."""
        ...


def read_sysfs(path: Path) -> str:
    """A sysfs attribute's text, stripped; PermissionError / OSError pass through."""
    return path.read_text().strip()


def read_number(path: Path) -> float:
    """A numeric sysfs attribute; MeterError naming the file when unreadable or not a number."""
    try:
        raw = read_sysfs(path)
    except PermissionError:
        raise MeterError(f"{path}: permission denied (root-only on this system; run as root or "
                         f"grant read access, e.g. `sudo chmod o+r {path}`)") from None
    except OSError as exc:
        raise MeterError(f"{path}: unreadable ({exc.strerror or exc})") from None
    try:
        return float(raw)
    except ValueError:
        raise MeterError(f"{path}: expected a number, got {raw!r}") from None


def trapezoid_j(samples: list[tuple[float, float]]) -> float:
    """Integrate (time_s, power_w) samples with the trapezoid rule."""
    return sum((t1 - t0) * (p0 + p1) / 2 for (t0, p0), (t1, p1) in zip(samples, samples[1:]))


class SampledMeter:
    """A measured meter that samples instantaneous power and integrates it (trapezoid rule).

    Subclasses implement :meth:`read_power_w`. With ``threaded=True`` a daemon thread samples
    every ``period_s`` between start and stop; tests pass ``threaded=False`` and a fake
    ``clock`` and call :meth:`sample` themselves, so integration is deterministic.
    """

    name = "sampled"
    kind = MEASURED

    def __init__(self, period_s: float = 0.05, *, clock: Clock = time.monotonic, threaded: bool = True) -> None:
        if not period_s > 0:
            raise ValueError(f"period_s must be > 0, got {period_s}")
        self.period_s = period_s
        self._clock = clock
        self._threaded = threaded
        self._samples: list[tuple[float, float]] = []
        self._lock = threading.Lock()
        self._stop_event = threading.Event()
        self._thread: threading.Thread | None = None
        self._errors: list[MeterError] = []

    def read_power_w(self) -> float:
        """Instantaneous power in watts that counts (0 when it does not, e.g. charging)."""
        raise NotImplementedError

    def describe(self) -> str:
        """What the readings come from, for Reading.source."""
        return self.name

    def no_energy_hint(self) -> str:
        """Why an interval may have counted no energy, for the MeterError."""
        return "every sample read 0 W"

    def sample(self) -> None:
        """Take one (time, power) sample now."""
        power = self.read_power_w()
        with self._lock:
            self._samples.append((self._clock(), power))

    def start(self) -> None:
        """Take the first sample and, when threaded, start sampling every period_s."""
        if self._thread is not None:
            raise MeterError(f"{self.name}: start() called twice without stop()")
        self._samples, self._errors = [], []
        self.sample()  # fails here, in the caller, when the rails are unreadable
        if self._threaded:
            self._stop_event.clear()
            self._thread = threading.Thread(target=self._loop, name=f"{self.name}-sampler", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while not self._stop_event.wait(self.period_s):
            try:
                self.sample()
            except MeterError as exc:
                self._errors.append(exc)
                return

    def stop(self) -> Reading:
        """Take the last sample, stop the thread and integrate."""
        if self._thread is not None:
            self._stop_event.set()
            self._thread.join()
            self._thread = None
        if not self._samples:
            raise MeterError(f"{self.name}: stop() without start()")
        if self._errors:
            raise MeterError(f"{self.name}: sampling failed during the interval: {self._errors[0]}")
        self.sample()
        with self._lock:
            samples = sorted(self._samples)
        seconds = samples[-1][0] - samples[0][0]
        energy_j = trapezoid_j(samples)
        if not energy_j > 0:
            raise MeterError(f"{self.describe()}: no energy counted over {seconds:.3f} s ({self.no_energy_hint()})")
        log.debug("%s: %d samples over %.3f s, %.4f J", self.name, len(samples), seconds, energy_j)
        return Reading(energy_j, seconds, MEASURED, f"{self.describe()} ({len(samples)} samples)")
