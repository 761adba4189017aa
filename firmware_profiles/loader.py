"""Load device profiles: bundled ones by name, others from a ``.toml`` path.

Validation collects every problem of a file into one :class:`ProfileError`, each naming the
field path (``compute.cpu_freq_hz: must be a positive number, got -1``), so a user fixes a
profile in one pass.
"""

from __future__ import annotations

import logging
import os
import tomllib
from collections.abc import Collection, Mapping
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from firmware_profiles.schema import (
    CALIBRATION_TABLES,
    OPTIONAL_SECTIONS,
    SECTIONS,
    TOP_LEVEL_FIELDS,
    Calibration,
    ComputeSpec,
    DeviceProfile,
    FieldRule,
    InvalidValue,
    MemorySpec,
    ProfileError,
    RadioSpec,
    RuntimeSpec,
    positive_number,
)
from sflam_common.problems import did_you_mean

_LOG = logging.getLogger(__name__)
_SUFFIX = ".toml"


def list_profiles() -> list[str]:
    """Names of the bundled profiles, sorted."""
    entries = _bundled_dir().iterdir()
    return sorted(e.name[: -len(_SUFFIX)] for e in entries if e.name.endswith(_SUFFIX))


def load_all() -> list[DeviceProfile]:
    """Every bundled profile, in name order."""
    return [load_profile(name) for name in list_profiles()]


def load_profile(name_or_path: str | os.PathLike[str]) -> DeviceProfile:
    """A bundled profile by name (``jetson-nano``) or any profile by path (``my.toml``)."""
    if isinstance(name_or_path, os.PathLike) or _looks_like_path(name_or_path):
        return _load_file(Path(name_or_path))
    return _load_bundled(name_or_path)


def parse_profile(
    data: Mapping[str, object], source: str, expected_name: str | None = None
) -> DeviceProfile:
    """Validate parsed TOML ``data``; raise one ProfileError listing every problem found.

    ``source`` names the data in messages; ``expected_name`` (the file stem of a bundled
    profile) must then equal the profile's ``name``.
    """
    problems: list[str] = []
    _report_unknown(data, [*TOP_LEVEL_FIELDS, *SECTIONS, *OPTIONAL_SECTIONS], "", problems)
    top = _read_fields(data, TOP_LEVEL_FIELDS, "", problems)
    sections = {name: _read_section(data, name, problems) for name in SECTIONS}
    estimated = _read_estimates(data, problems)
    calibration = _read_calibration(data.get("calibration"), problems)
    _check_cores(sections["compute"], problems)
    name = top.get("name")
    if expected_name is not None and name is not None and name != expected_name:
        problems.append(f"name: {name!r} must equal the file name ({expected_name}{_SUFFIX})")
    if problems:
        raise ProfileError(source, problems)
    return DeviceProfile(
        name=top["name"],
        display_name=top["display_name"],
        kind=top["kind"],
        source=top["source"],
        compute=ComputeSpec(**sections["compute"]),
        memory=MemorySpec(**sections["memory"]),
        radio=RadioSpec(**sections["radio"]),
        runtime=RuntimeSpec(**sections["runtime"]),
        estimated_fields=estimated,
        calibration=calibration,
    )


# ---------------------------------------------------------------- files


def _bundled_dir() -> Traversable:
    return resources.files("firmware_profiles").joinpath("profiles")


def _looks_like_path(value: str) -> bool:
    return value.endswith(_SUFFIX) or "/" in value or os.sep in value


def _load_bundled(name: str) -> DeviceProfile:
    available = list_profiles()
    if name not in available:
        hint = did_you_mean(name, available)
        message = f"no bundled profile by that name{hint}; available: {', '.join(available)}"
        raise ProfileError(f"profile {name!r}", [message])
    entry = _bundled_dir().joinpath(name + _SUFFIX)
    return _parse_text(entry.read_text(encoding="utf-8"), str(entry), expected_name=name)


def _load_file(path: Path) -> DeviceProfile:
    try:
        content = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ProfileError(str(path), [f"cannot read: {exc.strerror or exc}"]) from exc
    except UnicodeDecodeError as exc:
        raise ProfileError(str(path), [f"not UTF-8 text: {exc.reason}"]) from exc
    expected = path.stem if _is_bundled_file(path) else None
    return _parse_text(content, str(path), expected)


def _is_bundled_file(path: Path) -> bool:
    bundled = _bundled_dir()
    return isinstance(bundled, Path) and path.resolve().parent == bundled.resolve()


def _parse_text(content: str, source: str, expected_name: str | None) -> DeviceProfile:
    try:
        data = tomllib.loads(content)
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(source, [f"invalid TOML: {exc}"]) from None
    profile = parse_profile(data, source, expected_name)
    _LOG.debug("loaded profile %s from %s", profile.name, source)
    return profile


# ---------------------------------------------------------------- validation steps


def _report_unknown(
    table: Mapping[str, object],
    known: Collection[str],
    prefix: str,
    problems: list[str],
    hint: str = "",
) -> None:
    for key in table:
        if key in known:
            continue
        problems.append(f"{prefix}{key}: unknown key{did_you_mean(key, known) or hint}")


def _read_fields(
    table: Mapping[str, object], rules: Mapping[str, FieldRule], prefix: str, problems: list[str]
) -> dict[str, object]:
    values: dict[str, object] = {}
    for key, rule in rules.items():
        if key not in table:
            if rule.required:
                problems.append(f"{prefix}{key}: missing required field")
            else:
                values[key] = rule.default
            continue
        try:
            values[key] = rule.check(table[key])
        except InvalidValue as exc:
            problems.append(f"{prefix}{key}: {exc}")
    return values


def _table(
    data: Mapping[str, object], name: str, problems: list[str]
) -> dict[str, object] | None:
    table = data.get(name)
    if table is not None and not isinstance(table, dict):
        problems.append(f"{name}: must be a table [{name}], got {table!r}")
        return None
    return table


def _read_section(
    data: Mapping[str, object], name: str, problems: list[str]
) -> dict[str, object] | None:
    if name not in data:
        problems.append(f"{name}: missing required table [{name}]")
        return None
    table = _table(data, name, problems)
    if table is None:
        return None
    rules = SECTIONS[name]
    _report_unknown(table, rules, f"{name}.", problems)
    return _read_fields(table, rules, f"{name}.", problems)


def _check_cores(compute: Mapping[str, object] | None, problems: list[str]) -> None:
    """compute.training_cores cannot exceed compute.cpu_cores (both read without problems)."""
    cores, training = (compute or {}).get("cpu_cores"), (compute or {}).get("training_cores")
    if isinstance(cores, int) and isinstance(training, int) and training > cores:
        problems.append(f"compute.training_cores: {training} exceeds compute.cpu_cores ({cores}); it counts the "
                        "cores that cycles_per_mac has busy at once")


def _field_paths() -> list[str]:
    return [f"{section}.{key}" for section, rules in SECTIONS.items() for key in rules]


def _read_estimates(data: Mapping[str, object], problems: list[str]) -> frozenset[str]:
    table = _table(data, "estimates", problems)
    if table is None:
        return frozenset()
    _report_unknown(table, ("fields",), "estimates.", problems)
    entries = table.get("fields", [])
    if not isinstance(entries, list):
        problems.append(f"estimates.fields: must be a list of field paths, got {entries!r}")
        return frozenset()
    for index, entry in enumerate(entries):
        problem = _estimate_problem(entry, data)
        if problem:
            problems.append(f"estimates.fields[{index}]: {problem}")
    return frozenset(entry for entry in entries if isinstance(entry, str))


def _estimate_problem(entry: object, data: Mapping[str, object]) -> str | None:
    known = _field_paths()
    if not isinstance(entry, str):
        return f"must be a field path such as 'compute.cycles_per_mac', got {entry!r}"
    if entry not in known:
        return f"{entry!r} is not a profile field{_field_path_hint(entry, known)}"
    section, key = entry.split(".")
    table = data.get(section)
    if isinstance(table, dict) and key not in table:
        return f"{entry!r} is not set in this profile"
    return None


def _field_path_hint(entry: str, known: list[str]) -> str:
    """The field a mistyped path most likely meant: same section first, so keys are compared."""
    section, _, key = entry.partition(".")
    if section in SECTIONS:
        return did_you_mean(key, SECTIONS[section], show=f"'{section}.{{}}'")
    return did_you_mean(entry, known)


def _read_calibration(table: object, problems: list[str]) -> Calibration:
    if table is None:
        return Calibration()
    if not isinstance(table, dict):
        problems.append(f"calibration: must be a table [calibration], got {table!r}")
        return Calibration()
    hint = f" (measurements go in tables [calibration.<{'|'.join(CALIBRATION_TABLES)}>])"
    _report_unknown(table, CALIBRATION_TABLES, "calibration.", problems, hint)
    measured = {
        key: _read_measurements(table.get(key, {}), f"calibration.{key}", problems)
        for key in CALIBRATION_TABLES
    }
    return Calibration(**measured)


def _read_measurements(entries: object, path: str, problems: list[str]) -> dict[str, float]:
    if not isinstance(entries, dict):
        problems.append(f"{path}: must be a table of preset = number, got {entries!r}")
        return {}
    values: dict[str, float] = {}
    for preset, value in entries.items():
        try:
            values[preset] = positive_number(value)
        except InvalidValue as exc:
            problems.append(f"{path}.{preset}: {exc}")
    return values
