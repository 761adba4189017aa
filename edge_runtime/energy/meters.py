"""Choose an energy meter: a named one, or the first that works on this host.

``auto`` tries RAPL, then the Jetson INA3221 rails, then the Android battery, and falls back to
the profile-based estimator, logging why each measured meter was passed over; the meter it
returns carries that explanation in ``fallback_reason``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from edge_runtime.energy.android import AndroidMeter
from edge_runtime.energy.base import Meter, MeterError
from edge_runtime.energy.estimate import EstimateMeter
from edge_runtime.energy.jetson import JetsonMeter
from edge_runtime.energy.rapl import RaplMeter
from firmware_profiles import DeviceProfile

log = logging.getLogger(__name__)

MEASURED_METERS: dict[str, Callable[[Path], Meter]] = {
    "rapl": RaplMeter,
    "jetson": JetsonMeter,
    "android": AndroidMeter,
}
# Names the profiles' ``runtime.energy_meter`` uses, mapped onto ours.
ALIASES = {"jetson-ina3221": "jetson", "android-power-supply": "android"}
METER_CHOICES = ("auto", *MEASURED_METERS, "estimate")


def open_meter(kind: str = "auto", root: Path = Path("/"), profile: DeviceProfile | None = None) -> Meter:
    """The meter ``kind`` (auto | rapl | jetson | android | estimate) reading sysfs under ``root``.

    A named measured meter that cannot read raises MeterError; ``auto`` falls back to the
    estimator (which needs ``profile``) and says so.
    """
    kind = ALIASES.get(kind, kind)
    if kind == "estimate":
        return EstimateMeter(profile)
    if kind in MEASURED_METERS:
        return MEASURED_METERS[kind](Path(root))
    if kind != "auto":
        raise ValueError(f"unknown meter {kind!r}; choose one of {', '.join(METER_CHOICES)}")
    reasons = []
    for make in MEASURED_METERS.values():
        try:
            meter = make(Path(root))
        except MeterError as exc:
            reasons.append(str(exc))
            continue
        log.info("energy meter: %s (measured)", meter.name)
        return meter
    if profile is None:
        raise MeterError("no measured meter here and no profile for the estimator: " + "; ".join(reasons))
    meter = EstimateMeter(profile)
    meter.fallback_reason = "no measured meter readable (" + "; ".join(reasons) + ")"
    log.warning("energy meter: falling back to the estimator: %s", meter.fallback_reason)
    return meter
