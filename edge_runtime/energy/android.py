"""Android battery power from ``/sys/class/power_supply/battery``, sampled and integrated.

The kernel ABI says ``voltage_now`` in microvolts and ``current_now`` in microamps, but vendors
differ, in units and in sign. Normalization, in this order:

1. Voltage unit by magnitude: |v| >= 100,000 is microvolts, 100 <= |v| < 100,000 millivolts,
   smaller values volts. A Li-ion cell reads 2.5-5 V, so the three ranges cannot overlap.
2. Current unit follows the voltage unit (microvolts -> microamps, millivolts -> milliamps,
   volts -> amps): vendors scale both the same way, and the current alone is ambiguous (an
   idle phone's 15,000 uA would read as 15 A in mA).
3. Sign is ignored; ``status`` decides: only ``Discharging`` counts (power = |V * I|);
   ``Charging``, ``Full`` and ``Not charging`` count 0 W, since the charger supplies the power.
   Without a readable status every sample counts, with a warning.

Implausible values after normalization (|I| > 20 A, V outside 2.5-5 V) raise MeterError.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from edge_runtime.energy.base import Clock, MeterError, SampledMeter, read_number, read_sysfs

log = logging.getLogger(__name__)
BATTERY = Path("sys/class/power_supply/battery")
MAX_CURRENT_A = 20.0
VOLTAGE_RANGE_V = (2.5, 5.0)


def voltage_scale(raw: float) -> float:
    """Volts per raw unit, from the magnitude of a battery voltage reading."""
    magnitude = abs(raw)
    if magnitude >= 100_000:
        return 1e-6
    if magnitude >= 100:
        return 1e-3
    return 1.0


def battery_power_w(raw_voltage: float, raw_current: float, source: str = "battery") -> float:
    """|V * I| in watts after unit normalization; MeterError when implausible."""
    scale = voltage_scale(raw_voltage)
    volts, amps = abs(raw_voltage) * scale, abs(raw_current) * scale
    low, high = VOLTAGE_RANGE_V
    if not low <= volts <= high:
        raise MeterError(f"{source}: voltage_now {raw_voltage:g} reads as {volts:.3g} V, outside {low}-{high} V")
    if amps > MAX_CURRENT_A:
        raise MeterError(f"{source}: current_now {raw_current:g} reads as {amps:.3g} A, above {MAX_CURRENT_A:g} A")
    return volts * amps


class AndroidMeter(SampledMeter):
    """Battery discharge power, sampled every ``period_s`` and integrated."""

    name = "android"

    def __init__(
        self, root: Path = Path("/"), period_s: float = 0.05, *, clock: Clock = time.monotonic, threaded: bool = True
    ) -> None:
        super().__init__(period_s, clock=clock, threaded=threaded)
        self.directory = Path(root) / BATTERY
        if not (self.directory / "current_now").exists() or not (self.directory / "voltage_now").exists():
            raise MeterError(f"android: no current_now/voltage_now in {self.directory} (not an Android device?)")
        self._warned = False
        self.read_power_w()  # MeterError now when unreadable or implausible

    def _discharging(self) -> bool:
        try:
            status = read_sysfs(self.directory / "status")
        except OSError:
            if not self._warned:
                log.warning("android: %s/status unreadable; counting every sample as discharge", self.directory)
                self._warned = True
            return True
        return status.lower() == "discharging"

    def read_power_w(self) -> float:
        """Discharge power in watts; 0 while on the charger."""
        voltage = read_number(self.directory / "voltage_now")
        current = read_number(self.directory / "current_now")
        power = battery_power_w(voltage, current, str(self.directory))
        return power if self._discharging() else 0.0

    def describe(self) -> str:
        """Where the readings come from."""
        return f"android-power-supply: {self.directory}"

    def no_energy_hint(self) -> str:
        """The usual reason: the phone was on its charger."""
        return "the battery was not discharging (on the charger?); unplug the device to measure"
