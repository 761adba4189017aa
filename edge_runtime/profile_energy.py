"""``sflam profile-energy``: time and meter a bundle's device graphs here, write a calibrated profile.

Runs ``forward`` then ``train_step`` (``forward`` alone for a frozen bundle) over N random
samples in batches of the bundle's batch size, one warm-up batch first and unmetered. The
written profile is a copy of the base profile with, for the bundle's preset:

* ``calibration.cycles_per_sample`` = wall seconds per sample * the profile's ``cpu_freq_hz``,
  so the allocator's T_cmp = D c / f reproduces the latency measured here;
* ``calibration.energy_j_per_sample`` = the meter's joules / samples (whole package or board for
  measured meters, CPU only for the estimator).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_runtime.backends.base import BackendError
from edge_runtime.bundle import BundleError, load_weights, open_backend, read_manifest
from edge_runtime.energy import Meter, MeterError, Reading, open_meter
from firmware_profiles import DeviceProfile, load_profile

log = logging.getLogger(__name__)
Progress = Callable[[int, int], None]  # (batches done, batches in all)


@dataclass(frozen=True)
class Measurement:
    """Per-sample cost of a bundle's device graphs on this host."""

    preset: str
    samples: int
    backend: str
    graphs: tuple[str, ...]
    reading: Reading
    meter: str

    @property
    def seconds_per_sample(self) -> float:
        """Wall seconds per sample."""
        return self.reading.seconds / self.samples

    @property
    def energy_j_per_sample(self) -> float:
        """Joules per sample."""
        return self.reading.energy_j / self.samples


def _device_config(bundle: Path) -> dict:
    try:
        return json.loads((bundle / "device.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"{bundle}/device.json: unreadable ({exc})") from None


def _inputs(device: Mapping, rng: np.random.Generator) -> dict[str, np.ndarray]:
    batch, chans, size = device["batch_size"], device["in_chans"], device["image_size"]
    tokens = (batch, device["num_patches"], device["embed_dim"])
    return {
        "images": rng.standard_normal((batch, chans, size, size), dtype=np.float32),
        "noise": rng.random(tokens, dtype=np.float32),
        "grad_tokens": rng.standard_normal(tokens, dtype=np.float32) * np.float32(1e-3),
    }


def measure_bundle(
    bundle: Path, meter: Meter, samples: int, backend_name: str = "auto", progress: Progress | None = None
) -> Measurement:
    """Meter ``samples`` samples (rounded up to whole batches) of the bundle's graphs."""
    bundle = Path(bundle)
    manifest, device = read_manifest(bundle), _device_config(bundle)
    backend = open_backend(bundle, backend_name)
    weights = load_weights(bundle)
    weight, bias = weights["patch_embed.proj.weight"], weights["patch_embed.proj.bias"]
    momentum = (np.zeros_like(weight), np.zeros_like(bias))
    train = bool(device.get("trainable", True)) and getattr(backend, "trainable", True)
    levels = float(2 ** device.get("default_bits", 8) - 1)
    data = _inputs(device, np.random.default_rng(0))

    def step() -> None:
        backend.forward(data["images"], weight, bias, data["noise"], levels, False)
        if train:
            backend.train_step(weight, bias, *momentum, data["images"], data["grad_tokens"],
                               device.get("lr", 0.01), device.get("momentum", 0.9))

    step()  # warm-up: first-run allocations and kernel selection are not what a round costs
    batches = math.ceil(samples / device["batch_size"])
    meter.start()
    for done in range(1, batches + 1):
        step()
        if progress is not None:
            progress(done, batches)
    reading = meter.stop()
    graphs = ("forward", "train_step") if train else ("forward",)
    return Measurement(manifest["preset"], batches * device["batch_size"], backend.name, graphs, reading, meter.name)


# ---------------------------------------------------------------- TOML writing


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"cannot write {value!r} to a profile")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _toml_key(key: str) -> str:
    bare = key.replace("-", "").replace("_", "").isalnum() and key.isascii()
    return key if bare else json.dumps(key)


def _toml_table(header: str, items: Iterable[tuple[str, object]]) -> list[str]:
    lines = [f"[{header}]"] if header else []
    lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in items if v is not None]
    return lines


def profile_toml(profile: DeviceProfile, comments: Iterable[str] = ()) -> str:
    """A DeviceProfile as TOML text that :func:`firmware_profiles.load_profile` reads back."""
    lines = [f"# {line}" for line in comments]
    lines += ["format_version = 1"]
    lines += _toml_table("", [(k, getattr(profile, k)) for k in ("name", "display_name", "kind", "source")])
    for section in ("compute", "memory", "radio", "runtime"):
        spec = getattr(profile, section)
        lines += [""] + _toml_table(section, [(f.name, getattr(spec, f.name)) for f in dataclasses.fields(spec)])
    if profile.estimated_fields:
        lines += ["", "[estimates]", f"fields = {_toml_value(sorted(profile.estimated_fields))}"]
    for table in ("cycles_per_sample", "energy_j_per_sample"):
        entries = getattr(profile.calibration, table)
        if entries:
            lines += [""] + _toml_table(f"calibration.{table}", sorted(entries.items()))
    return "\n".join(lines) + "\n"


def calibrated(profile: DeviceProfile, measurement: Measurement) -> DeviceProfile:
    """``profile`` with the measurement's per-sample cycles and joules for its preset."""
    cycles = measurement.seconds_per_sample * profile.compute.cpu_freq_hz
    calibration = dataclasses.replace(
        profile.calibration,
        cycles_per_sample={**profile.calibration.cycles_per_sample, measurement.preset: cycles},
        energy_j_per_sample={**profile.calibration.energy_j_per_sample, measurement.preset: measurement.energy_j_per_sample},
    )
    return dataclasses.replace(profile, calibration=calibration)


def measurement_comments(base: str, m: Measurement) -> list[str]:
    """The header of a written profile: what was measured, how, and with which meter."""
    return [
        f"Calibrated by `sflam profile-energy` from the {base!r} profile on {time.strftime('%Y-%m-%d %H:%M:%S')}.",
        f"preset {m.preset}: energy {m.reading.kind} with the {m.meter} meter ({m.reading.source});",
        f"{m.samples} samples of {' + '.join(m.graphs)} on the {m.backend} backend: "
        f"{m.seconds_per_sample:.6g} s and {m.energy_j_per_sample:.6g} J per sample.",
        "cycles_per_sample = measured wall seconds per sample * compute.cpu_freq_hz.",
    ]


# ---------------------------------------------------------------- command


def _progress_line(done: int, total: int) -> None:
    width = 30
    filled = width * done // total
    end = "\n" if done == total else ""
    print(f"\rprofile-energy [{'#' * filled}{'.' * (width - filled)}] {done}/{total} batches",
          end=end, file=sys.stderr, flush=True)


def _measure(args: argparse.Namespace, bundle: Path, profile: DeviceProfile) -> Measurement:
    meter = open_meter(args.meter, Path(getattr(args, "sysfs_root", None) or "/"), profile)  # logs a fallback
    return measure_bundle(bundle, meter, args.samples, args.backend, _progress_line)


def cmd_profile_energy(args: argparse.Namespace) -> int:
    """Measure the bundle here and write the calibrated profile to ``args.out``."""
    bundle = Path(args.bundle)
    base = args.base or read_manifest(bundle)["profile"]
    profile = load_profile(base)
    try:
        measurement = _measure(args, bundle, profile)
    except (MeterError, BackendError) as exc:
        print(f"sflam profile-energy: error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(profile_toml(calibrated(profile, measurement), measurement_comments(base, measurement)))
    load_profile(out)  # what we wrote must load; a ProfileError here is a bug worth seeing
    print(f"{measurement.preset} on {profile.name} ({measurement.backend}): "
          f"{measurement.seconds_per_sample * 1e3:.4g} ms and {measurement.energy_j_per_sample:.4g} J per sample "
          f"({measurement.reading.kind}, {measurement.meter}); wrote {out}")
    return 0
