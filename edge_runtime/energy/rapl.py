"""Intel RAPL through the powercap sysfs: cumulative package energy counters in microjoules.

Top-level zones ``intel-rapl:N`` are CPU packages; their subzones ``intel-rapl:N:M`` (core,
uncore, dram) are parts of, or beside, the package and are not added again. Each counter wraps
at ``max_energy_range_uj``; one wrap between start and stop is undone (an interval long enough
to wrap twice, minutes at full load, cannot be told apart and is not supported). On most
kernels since 2020 ``energy_uj`` is readable by root only.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

from edge_runtime.energy.base import MEASURED, Clock, MeterError, Reading, read_number, read_sysfs

log = logging.getLogger(__name__)
POWERCAP = Path("sys/class/powercap")
_PACKAGE = re.compile(r"^intel-rapl:\d+$")
_UJ = 1e-6


def package_zones(root: Path = Path("/")) -> list[Path]:
    """The top-level RAPL zone directories (packages), sorted; empty when there is no RAPL."""
    base = Path(root) / POWERCAP
    if not base.is_dir():
        return []
    return sorted(p for p in base.iterdir() if _PACKAGE.match(p.name))


def counter_delta_uj(start_uj: float, end_uj: float, max_range_uj: float) -> float:
    """end - start of a counter that wraps at ``max_range_uj``."""
    if end_uj >= start_uj:
        return end_uj - start_uj
    return end_uj + max_range_uj - start_uj


class RaplMeter:
    """Sum of every package's RAPL energy counter between start and stop."""

    name = "rapl"
    kind = MEASURED

    def __init__(self, root: Path = Path("/"), *, clock: Clock = time.monotonic) -> None:
        self.zones = package_zones(root)
        if not self.zones:
            raise MeterError(f"rapl: no {Path(root) / POWERCAP}/intel-rapl:N zones (not an Intel/AMD RAPL host)")
        self._clock = clock
        self._labels = [self._label(zone) for zone in self.zones]
        self._ranges = [read_number(zone / "max_energy_range_uj") for zone in self.zones]
        self._start: tuple[float, list[float]] | None = None
        self._counters()  # MeterError now, not at stop(), when the counters are root-only

    @staticmethod
    def _label(zone: Path) -> str:
        try:
            return read_sysfs(zone / "name")
        except OSError:
            return zone.name

    def _counters(self) -> list[float]:
        return [read_number(zone / "energy_uj") for zone in self.zones]

    def start(self) -> None:
        """Record every package counter."""
        self._start = (self._clock(), self._counters())

    def stop(self) -> Reading:
        """Joules since start, every package summed, wraparound undone."""
        if self._start is None:
            raise MeterError("rapl: stop() without start()")
        (t0, before), self._start = self._start, None
        after, seconds = self._counters(), self._clock() - t0
        deltas = [counter_delta_uj(b, a, r) for b, a, r in zip(before, after, self._ranges)]
        wrapped = [label for label, b, a in zip(self._labels, before, after) if a < b]
        if wrapped:
            log.debug("rapl: counter wrapped in %s", ", ".join(wrapped))
        return Reading(sum(deltas) * _UJ, seconds, MEASURED, "rapl: " + " + ".join(self._labels))
