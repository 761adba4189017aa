"""What a device's hardware profile gives the device loop (edge_runtime.device): its power
model for the energy estimate, receive buffers sized to its RAM, and its energy meter. The
profile is optional on a device: without one (or without firmware_profiles) the fallbacks are
used and said so.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

from edge_runtime.memory import DeviceBuffers, check_fits, device_buffer_limits

log = logging.getLogger(__name__)
FALLBACK_CPU_POWER_W = 2.0  # used only when the bundle's profile cannot be loaded; labelled estimated
FALLBACK_TX_POWER_W = 0.1
WEIGHTS_FILE = "weights.safetensors"
# What a ModelWeights message adds to the raw tensor bytes: envelope, names, tensor headers and
# the chunk frames' own headers (about 100 bytes per 256 KiB chunk).
MESSAGE_ALLOWANCE_BYTES = 64 * 1024


@dataclass
class PowerModel:
    """Estimated power draw: CPU (kappa f^3 from the profile) and radio transmit power."""

    cpu_power_w: float
    tx_power_w: float

    @classmethod
    def for_profile(cls, name: str | None) -> "PowerModel":
        profile = load_device_profile(name)
        if profile is None:
            log.warning("no profile %r for the energy estimate: assuming %.1f W", name, FALLBACK_CPU_POWER_W)
            return cls(FALLBACK_CPU_POWER_W, FALLBACK_TX_POWER_W)
        c = profile.compute
        return cls(c.effective_capacitance * c.cpu_freq_hz**3, profile.radio.max_tx_power_w)


@functools.lru_cache(maxsize=64)
def load_device_profile(name: str | None):
    """The firmware profile ``name``, or None when it (or firmware_profiles) is unavailable.

    Cached (profiles are frozen): a device host builds thousands of devices from a few profiles,
    and each device reads its profile twice (power model and energy meter)."""
    try:
        from firmware_profiles import load_profile  # stdlib + TOML only; optional on a device

        return load_profile(name)
    except (ImportError, ValueError, OSError, TypeError) as exc:
        log.info("no device profile %r: %s", name, exc)
        return None


def weights_message_bytes(bundle: Path, manifest: dict) -> int:
    """An upper bound of the ModelWeights message's size: the bundle's weights file (the raw
    tensors plus a JSON header) and MESSAGE_ALLOWANCE_BYTES."""
    size = manifest.get("files", {}).get(WEIGHTS_FILE, {}).get("bytes")  # checked against the file by verify
    if size is None:
        size = (Path(bundle) / WEIGHTS_FILE).stat().st_size
    return int(size) + MESSAGE_ALLOWANCE_BYTES


@functools.lru_cache(maxsize=64)
def buffers_for(profile: str | None, model_bytes: int) -> DeviceBuffers:
    """The receive buffers of a device with this profile's RAM (edge_runtime.memory), checked to
    hold a ``model_bytes`` weights message. Cached, and so logged once per profile: a device host
    builds thousands of devices from a few profiles."""
    spec = load_device_profile(profile)
    buffers = device_buffer_limits(spec.memory.total_ram_bytes if spec is not None else None)
    check_fits(buffers, model_bytes, f"profile {profile!r}: the model weights message")
    log.info("receive buffers for profile %r: %s", profile, buffers.describe())
    return buffers


def open_compute_meter(kind: str, profile: object) -> object | None:
    """``edge_runtime.energy.open_meter(kind)``, or None (logged) when it cannot be had."""
    try:
        from edge_runtime.energy import MeterError, open_meter
    except ImportError as exc:  # edge_runtime.energy needs firmware_profiles
        log.warning("energy meters unavailable (%s): using the estimate", exc)
        return None
    try:
        meter = open_meter(kind, profile=profile)
    except MeterError as exc:
        log.warning("energy meter %r unavailable (%s): using the estimate", kind, exc)
        return None
    log.info("energy meter: %s (%s)", meter.name, meter.kind)
    return meter
