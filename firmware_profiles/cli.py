"""Handlers of ``sflam profiles list|show|validate``: results printed for people."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import fields

from firmware_profiles.loader import load_all, load_profile
from firmware_profiles.schema import SECTIONS, DeviceProfile, ProfileError

_LIST_HEADER = ("NAME", "KIND", "CPU", "RAM", "FLASH", "RADIO", "TX_W", "FORMATS", "TRAIN")
_UNIT_OVERRIDES = {
    "effective_capacitance": "J/(cycle*Hz^2)",
    "cycles_per_mac": "cycles/MAC",
    "cycles_per_sample": "cycles",
    "energy_j_per_sample": "J",
}
_UNIT_SUFFIXES = (("_hz", "Hz"), ("_bytes", "B"), ("_w", "W"))
_BINARY_UNITS = (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))
_FREQ_UNITS = (("GHz", 1e9), ("MHz", 1e6), ("kHz", 1e3))


def cmd_list(args: argparse.Namespace) -> int:
    """Print one line per bundled profile."""
    rows = [_LIST_HEADER, *(_list_row(profile) for profile in load_all())]
    print(_table(rows))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    """Print every field of one profile (bundled name or .toml path) with units."""
    print(_describe(load_profile(args.name)))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    """Validate each file, printing OK or every problem; 0 if all are valid, else 1."""
    failures = 0
    for path in args.paths:
        try:
            profile = load_profile(_as_path(path))
        except ProfileError as exc:
            failures += 1
            print(f"{path}: INVALID ({len(exc.problems)} problem(s))")
            print("\n".join(f"  {problem}" for problem in exc.problems))
        else:
            print(f"{path}: OK ({profile.name})")
    return 1 if failures else 0


def _as_path(text: str) -> str:
    """Treat a validate argument as a path even without a directory or .toml suffix."""
    return text if "/" in text or text.endswith(".toml") else f"./{text}"


# ---------------------------------------------------------------- formatting


def human_bytes(count: int) -> str:
    """``12884901888`` -> ``12 GiB``."""
    for unit, size in _BINARY_UNITS:
        if count >= size:
            return f"{count / size:.4g} {unit}"
    return f"{count} B"


def human_hz(freq_hz: float) -> str:
    """``1.5e9`` -> ``1.5 GHz``."""
    for unit, size in _FREQ_UNITS:
        if freq_hz >= size:
            return f"{freq_hz / size:.4g} {unit}"
    return f"{freq_hz:g} Hz"


def _list_row(profile: DeviceProfile) -> tuple[str, ...]:
    compute, memory, radio = profile.compute, profile.memory, profile.radio
    ram = human_bytes(memory.ram_bytes)
    if memory.psram_bytes:
        ram += f" +{human_bytes(memory.psram_bytes)} PSRAM"
    return (
        profile.name,
        profile.kind,
        f"{human_hz(compute.cpu_freq_hz)} x{compute.cpu_cores}",
        ram,
        human_bytes(memory.flash_bytes),
        f"{radio.kind} {human_hz(radio.bandwidth_hz)}",
        f"{radio.max_tx_power_w:g}",
        ",".join(profile.runtime.formats),
        "yes" if profile.runtime.supports_training else "no",
    )


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows)
    return "\n".join(line.rstrip() for line in lines)


def _unit(key: str) -> str:
    if key in _UNIT_OVERRIDES:
        return _UNIT_OVERRIDES[key]
    return next((unit for suffix, unit in _UNIT_SUFFIXES if key.endswith(suffix)), "")


def _value_text(key: str, value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if value is None:
        return "-"
    if isinstance(value, tuple):
        return ", ".join(value)
    unit = _unit(key)
    text = f"{value:g}" if isinstance(value, float) else str(value)
    if unit == "Hz":
        return f"{text} Hz ({human_hz(value)})"
    if unit == "B" and value >= 1024:
        return f"{text} B ({human_bytes(value)})"
    return f"{text} {unit}".rstrip()


def _field_line(key: str, value: object, estimate: bool) -> str:
    marker = "  [estimate]" if estimate else ""
    return f"  {key:<24} {_value_text(key, value)}{marker}"


def _section_lines(profile: DeviceProfile, section: str) -> list[str]:
    spec = getattr(profile, section)
    lines = [f"[{section}]"]
    for spec_field in fields(spec):
        value = getattr(spec, spec_field.name)
        estimate = profile.is_estimate(f"{section}.{spec_field.name}")
        lines.append(_field_line(spec_field.name, value, estimate))
    return lines


def _calibration_lines(profile: DeviceProfile) -> list[str]:
    lines = ["[calibration]  (measured by `sflam profile-energy`)"]
    for table_field in fields(profile.calibration):
        measured: Mapping[str, float] = getattr(profile.calibration, table_field.name)
        unit = _unit(table_field.name)
        lines.append(f"  {table_field.name}:")
        lines.extend(f"    {preset:<22} {value:g} {unit}" for preset, value in measured.items())
        if not measured:
            lines.append("    (none measured; estimated from cycles_per_mac and kappa)")
    return lines


def _describe(profile: DeviceProfile) -> str:
    lines = [
        f"{profile.name}: {profile.display_name}",
        f"  {'kind':<24} {profile.kind}",
        f"  {'source':<24} {profile.source}",
    ]
    for section in SECTIONS:
        lines.extend(_section_lines(profile, section))
    lines.extend(_calibration_lines(profile))
    estimates = ", ".join(sorted(profile.estimated_fields)) or "none"
    lines.append(f"estimates (not spec-sheet values): {estimates}")
    return "\n".join(lines)
