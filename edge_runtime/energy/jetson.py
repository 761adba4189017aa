"""Jetson INA3221 power monitors: rail voltage and current sampled from sysfs and integrated.

Two layouts are read:

* JetPack 5/6 hwmon: ``sys/bus/i2c/drivers/ina3221*/<bus-addr>/hwmon/hwmonN/`` with
  ``inK_label``, ``inK_input`` (mV) and ``currK_input`` (mA); power = V * I.
* JetPack 4 iio: ``sys/bus/i2c/drivers/ina3221x/<bus-addr>/iio:deviceN/`` with
  ``rail_name_K`` and ``in_powerK_input`` (mW).

When a rail named as the board's total input (``VDD_IN``, ``POM_5V_IN``, ...) exists, only it
counts: it already includes every other rail. Otherwise every rail found is summed, which is
the best available figure but misses whatever the monitors do not cover (and double counts if a
board ever monitors a rail and one of its sub-rails; no supported module does).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from edge_runtime.energy.base import Clock, MeterError, SampledMeter, read_number, read_sysfs

DRIVERS = Path("sys/bus/i2c/drivers")
TOTAL_INPUT_LABELS = ("VDD_IN", "POM_5V_IN", "VIN_SYS_5V0", "VDD_IN_TOTAL")


@dataclass(frozen=True)
class Rail:
    """One monitored rail: a power file (mW), or a voltage (mV) and current (mA) file."""

    label: str
    power_mw: Path | None = None
    voltage_mv: Path | None = None
    current_ma: Path | None = None

    def power_w(self) -> float:
        """The rail's instantaneous power in watts."""
        if self.power_mw is not None:
            return read_number(self.power_mw) * 1e-3
        return read_number(self.voltage_mv) * read_number(self.current_ma) * 1e-6


def _label(path: Path, default: str) -> str:
    try:
        return read_sysfs(path) or default
    except OSError:
        return default


def _hwmon_rails(directory: Path) -> list[Rail]:
    rails = []
    for volts in sorted(directory.glob("in*_input")):
        index = volts.name[2:-len("_input")]
        current = directory / f"curr{index}_input"
        if index.isdigit() and current.exists():
            label = _label(directory / f"in{index}_label", f"{directory.name}/in{index}")
            rails.append(Rail(label, voltage_mv=volts, current_ma=current))
    return rails


def _iio_rails(directory: Path) -> list[Rail]:
    rails = []
    for power in sorted(directory.glob("in_power*_input")):
        index = power.name[len("in_power"):-len("_input")]
        if index.isdigit():
            rails.append(Rail(_label(directory / f"rail_name_{index}", f"{directory.name}/{index}"), power_mw=power))
    return rails


def find_rails(root: Path = Path("/")) -> list[Rail]:
    """Every INA3221 rail under ``root``, hwmon layout first."""
    base = Path(root) / DRIVERS
    rails: list[Rail] = []
    for directory in sorted(base.glob("ina3221*/*/hwmon/hwmon*")):
        rails += _hwmon_rails(directory)
    for directory in sorted(base.glob("ina3221*/*/iio:device*")):
        rails += _iio_rails(directory)
    return rails


def select_rails(rails: list[Rail]) -> list[Rail]:
    """The total-input rail alone when present, else all rails (see the module docstring)."""
    for wanted in TOTAL_INPUT_LABELS:
        total = [rail for rail in rails if rail.label.upper() == wanted]
        if total:
            return total[:1]
    return rails


class JetsonMeter(SampledMeter):
    """Board power from the INA3221 monitors, sampled every ``period_s`` and integrated."""

    name = "jetson"

    def __init__(
        self, root: Path = Path("/"), period_s: float = 0.05, *, clock: Clock = time.monotonic, threaded: bool = True
    ) -> None:
        super().__init__(period_s, clock=clock, threaded=threaded)
        found = find_rails(root)
        if not found:
            raise MeterError(f"jetson: no INA3221 rails under {Path(root) / DRIVERS}/ina3221* (not a Jetson?)")
        self.rails = select_rails(found)
        self.read_power_w()  # MeterError now when the rails are unreadable

    def read_power_w(self) -> float:
        """Sum of the selected rails' power."""
        return sum(rail.power_w() for rail in self.rails)

    def describe(self) -> str:
        """Which rails count."""
        return "jetson-ina3221: " + " + ".join(rail.label for rail in self.rails)
