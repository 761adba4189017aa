"""The device-profile schema: frozen dataclasses, the allowed values, and one checker per field.

A profile is TOML data (see ``profiles/*.toml``); :func:`firmware_profiles.loader.parse_profile`
walks :data:`TOP_LEVEL_FIELDS` and :data:`SECTIONS` with these checkers and collects every
problem before building a :class:`DeviceProfile`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import NamedTuple

from sflam_common.problems import ProblemsError

FORMAT_VERSION = 1
DEVICE_KINDS = ("phone", "jetson", "sbc", "mcu")
ACCELERATORS = ("none", "gpu", "npu", "dsp")
RADIO_KINDS = ("wifi", "lte", "5g", "ethernet", "ble")
FORMATS = ("onnx", "tflite", "tflite-int8", "tflite-micro")
ENERGY_METERS = ("rapl", "jetson-ina3221", "android-power-supply", "estimate")
CALIBRATION_TABLES = ("cycles_per_sample", "energy_j_per_sample")
_NAME_PATTERN = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")


class ProfileError(ProblemsError):
    """A profile that cannot be used; ``problems`` holds every reason, one string each."""


class InvalidValue(ValueError):
    """One field's value is wrong; the loader prefixes the field path and collects it."""


# ---------------------------------------------------------------- field checkers


def positive_number(value: object) -> float:
    """A finite int or float > 0 (bool is not a number here)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidValue(f"must be a positive number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise InvalidValue(f"must be a positive number, got {value!r}")
    return float(value)


def positive_int(value: object) -> int:
    """A whole number >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidValue(f"must be a positive integer, got {value!r}")
    return value


def non_negative_int(value: object) -> int:
    """A whole number >= 0."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidValue(f"must be an integer >= 0, got {value!r}")
    return value


def text(value: object) -> str:
    """A non-empty string."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidValue(f"must be a non-empty string, got {value!r}")
    return value


def boolean(value: object) -> bool:
    """``true`` or ``false``."""
    if not isinstance(value, bool):
        raise InvalidValue(f"must be true or false, got {value!r}")
    return value


def profile_name(value: object) -> str:
    """A lowercase slug such as ``jetson-orin-nano`` (used as a file and CLI name)."""
    if not isinstance(value, str) or not _NAME_PATTERN.match(value):
        raise InvalidValue(
            f"must be lowercase letters and digits joined by single hyphens, got {value!r}"
        )
    return value


def format_version(value: object) -> int:
    """The schema version this loader reads."""
    if isinstance(value, bool) or not isinstance(value, int) or value != FORMAT_VERSION:
        raise InvalidValue(f"unsupported version {value!r}; this sflam reads {FORMAT_VERSION}")
    return FORMAT_VERSION


def one_of(choices: Sequence[str]) -> Callable[[object], str]:
    """A checker accepting exactly one of ``choices``."""

    def check(value: object) -> str:
        if value not in choices:
            raise InvalidValue(f"must be one of {', '.join(choices)}; got {value!r}")
        return str(value)

    return check


def format_list(value: object) -> tuple[str, ...]:
    """A non-empty list of distinct artifact formats, most preferred first."""
    if not isinstance(value, list) or not value:
        raise InvalidValue(f"must be a non-empty list of formats ({', '.join(FORMATS)})")
    bad = [f"[{i}] {item!r}" for i, item in enumerate(value) if item not in FORMATS]
    if bad:
        raise InvalidValue(f"unknown format {', '.join(bad)}; allowed: {', '.join(FORMATS)}")
    if len(set(value)) != len(value):
        raise InvalidValue(f"lists a format twice: {value!r}")
    return tuple(value)


class FieldRule(NamedTuple):
    """How one TOML key is checked, and its value when an optional key is absent."""

    check: Callable[[object], object]
    required: bool = True
    default: object = None


TOP_LEVEL_FIELDS: dict[str, FieldRule] = {
    "format_version": FieldRule(format_version),
    "name": FieldRule(profile_name),
    "display_name": FieldRule(text),
    "kind": FieldRule(one_of(DEVICE_KINDS)),
    "source": FieldRule(text),
}

SECTIONS: dict[str, dict[str, FieldRule]] = {
    "compute": {
        "cpu_freq_hz": FieldRule(positive_number),
        "cpu_cores": FieldRule(positive_int),
        "effective_capacitance": FieldRule(positive_number),
        "cycles_per_mac": FieldRule(positive_number),
        "training_cores": FieldRule(positive_int),
        "accelerator": FieldRule(one_of(ACCELERATORS), required=False, default="none"),
    },
    "memory": {
        "ram_bytes": FieldRule(positive_int),
        "flash_bytes": FieldRule(positive_int),
        "psram_bytes": FieldRule(non_negative_int, required=False, default=0),
    },
    "radio": {
        "kind": FieldRule(one_of(RADIO_KINDS)),
        "max_tx_power_w": FieldRule(positive_number),
        "bandwidth_hz": FieldRule(positive_number),
        "module": FieldRule(text, required=False, default=None),
    },
    "runtime": {
        "formats": FieldRule(format_list),
        "energy_meter": FieldRule(one_of(ENERGY_METERS)),
        "supports_training": FieldRule(boolean),
    },
}

OPTIONAL_SECTIONS = ("estimates", "calibration")


# ---------------------------------------------------------------- dataclasses


@dataclass(frozen=True)
class ComputeSpec:
    """The CPU as the system model sees it: T = cycles / f, E = kappa * training_cores * cycles * f^2.

    ``cycles_per_mac`` counts wall-clock cycles: with ``training_cores`` cores working at once,
    each of those cycles is ``training_cores`` core cycles, and kappa is per core cycle. So a
    profile whose figure is "effective, on all four cores" has ``training_cores = 4``, and its
    energy per MAC is 4x that of one core doing the same cycles (docs/profiles.md).
    """

    cpu_freq_hz: float
    cpu_cores: int
    effective_capacitance: float  # kappa, J / (core cycle * Hz^2)
    cycles_per_mac: float  # wall-clock cycles of cpu_freq_hz per MAC, with training_cores busy
    training_cores: int  # cores that run training at once (1 <= training_cores <= cpu_cores)
    accelerator: str = "none"

    @property
    def wall_kappa(self) -> float:
        """Joules per (wall-clock cycle * Hz^2): kappa times the cores switching in each cycle."""
        return self.effective_capacitance * self.training_cores


@dataclass(frozen=True)
class MemorySpec:
    """On-chip/main RAM, external PSRAM (microcontrollers) and non-volatile storage."""

    ram_bytes: int
    flash_bytes: int
    psram_bytes: int = 0

    @property
    def total_ram_bytes(self) -> int:
        """RAM a model may use, PSRAM included."""
        return self.ram_bytes + self.psram_bytes


@dataclass(frozen=True)
class RadioSpec:
    """The uplink: the widest channel the radio can use and its transmit-power ceiling."""

    kind: str
    max_tx_power_w: float
    bandwidth_hz: float
    module: str | None = None  # what provides the link when it is not on the SoC


@dataclass(frozen=True)
class RuntimeSpec:
    """What the device can run: artifact formats (most preferred first), meter, training."""

    formats: tuple[str, ...]
    energy_meter: str
    supports_training: bool


def _frozen_map(values: Mapping[str, float] | None = None) -> Mapping[str, float]:
    return MappingProxyType(dict(values or {}))


@dataclass(frozen=True)
class Calibration:
    """Measured per-sample costs keyed by model preset (written by ``sflam profile-energy``)."""

    cycles_per_sample: Mapping[str, float] = field(default_factory=_frozen_map)
    energy_j_per_sample: Mapping[str, float] = field(default_factory=_frozen_map)

    def __post_init__(self) -> None:
        object.__setattr__(self, "cycles_per_sample", _frozen_map(self.cycles_per_sample))
        object.__setattr__(self, "energy_j_per_sample", _frozen_map(self.energy_j_per_sample))

    def __hash__(self) -> int:
        return hash(
            (
                tuple(sorted(self.cycles_per_sample.items())),
                tuple(sorted(self.energy_j_per_sample.items())),
            )
        )


@dataclass(frozen=True)
class DeviceProfile:
    """One device's hardware profile, validated; the allocator's and exporter's input."""

    name: str
    display_name: str
    kind: str
    source: str
    compute: ComputeSpec
    memory: MemorySpec
    radio: RadioSpec
    runtime: RuntimeSpec
    estimated_fields: frozenset[str] = frozenset()
    calibration: Calibration = field(default_factory=Calibration)

    def supports_format(self, fmt: str) -> bool:
        """Whether the device can run artifacts of format ``fmt``."""
        return fmt in self.runtime.formats

    def is_estimate(self, field_path: str) -> bool:
        """Whether ``field_path`` (e.g. ``compute.cycles_per_mac``) is an estimate."""
        return field_path in self.estimated_fields

    def cycles_per_sample(self, preset: str, macs_per_sample: float) -> float:
        """CPU cycles per sample: the calibrated value if measured, else cycles_per_mac * MACs."""
        measured = self.calibration.cycles_per_sample.get(preset)
        if measured is not None:
            return measured
        return self.compute.cycles_per_mac * positive_macs(macs_per_sample)

    def compute_time_s_per_sample(self, preset: str, macs_per_sample: float) -> float:
        """Seconds of device compute per sample: cycles / f."""
        return self.cycles_per_sample(preset, macs_per_sample) / self.compute.cpu_freq_hz

    def energy_j_per_sample(self, preset: str, macs_per_sample: float) -> float:
        """Joules per sample: calibrated if measured, else kappa * training_cores * cycles * f^2."""
        measured = self.calibration.energy_j_per_sample.get(preset)
        if measured is not None:
            return measured
        cycles = self.cycles_per_sample(preset, macs_per_sample)
        return self.compute.wall_kappa * cycles * self.compute.cpu_freq_hz**2


def positive_macs(macs_per_sample: float) -> float:
    """Reject a non-positive or non-finite MAC count with a ValueError naming it."""
    try:
        return positive_number(macs_per_sample)
    except InvalidValue as exc:
        raise ValueError(f"macs_per_sample {exc}") from None
