"""Energy meters: RAPL, Jetson INA3221, Android battery, and a profile-based estimator.

Each reading is labelled ``measured`` or ``estimated`` and is never a silent zero (docs/profiles.md). Readers take a sysfs ``root`` so tests can point them at a fixture tree.
"""

from edge_runtime.energy.android import AndroidMeter
from edge_runtime.energy.base import ESTIMATED, MEASURED, Meter, MeterError, Reading, SampledMeter
from edge_runtime.energy.estimate import EstimateMeter
from edge_runtime.energy.jetson import JetsonMeter
from edge_runtime.energy.meters import METER_CHOICES, open_meter
from edge_runtime.energy.rapl import RaplMeter

__all__ = [
    "ESTIMATED",
    "MEASURED",
    "METER_CHOICES",
    "AndroidMeter",
    "EstimateMeter",
    "JetsonMeter",
    "Meter",
    "MeterError",
    "RaplMeter",
    "Reading",
    "SampledMeter",
    "open_meter",
]
