"""What a run.toml value may be: one checker per kind of value.

A checker returns the value (ints widened to floats where a number is wanted, bit sets sorted)
or raises :class:`Invalid` with the reason; :mod:`server_runtime.config` pairs a checker with
every key, prefixes the key's path to the reason and collects every reason into one
ConfigError.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from sflam_common.bits import BIT_WIDTHS_TEXT, is_bit_width
from sflam_common.problems import did_you_mean

EVAL_FORMS = "digits | cifar10:<dir> | folder:<dir>"
_BITS = f"one of {BIT_WIDTHS_TEXT}"
_CUDA_DEVICE = re.compile(r"cuda:(0|[1-9][0-9]*)")
_MAX_GAIN = 1e2  # a linear channel gain above this is a typo (a dB value, say), not a channel

Check = Callable[[object], object]


class Invalid(Exception):
    """One value's problem; the caller prefixes it with the key's path."""


def show(value: object) -> str:
    """The value as written, with its type where the repr alone would hide a mismatch."""
    plain = isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))
    return repr(value) if plain else f"{value!r} ({type(value).__name__})"


# ---------------------------------------------------------------- scalars


def integer(ok: Callable[[int], bool], wanted: str) -> Check:
    """An int (not a bool) for which ``ok`` holds; ``wanted`` says which in the message."""

    def check(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not ok(value):
            raise Invalid(f"must be {wanted}, got {show(value)}")
        return value

    return check


def at_least(low: int) -> Check:
    """An int >= ``low``."""
    return integer(lambda v: v >= low, f"an integer >= {low}")


def number(ok: Callable[[float], bool], wanted: str) -> Check:
    """A finite int or float (not a bool) for which ``ok`` holds, returned as a float."""

    def check(value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise Invalid(f"must be {wanted}, got {show(value)}")
        if isinstance(value, float) and not math.isfinite(value) or not ok(float(value)):
            raise Invalid(f"must be {wanted}, got {value!r}")
        return float(value)

    return check


def model_bits(value: object) -> int:
    """16 or 32: the precision of the global device weights a round broadcasts."""
    if isinstance(value, bool) or value not in (16, 32):
        raise Invalid(f"must be 16 or 32, got {show(value)}")
    return int(value)


def choice(options: Sequence[str]) -> Check:
    """Exactly one of ``options``."""

    def check(value: object) -> str:
        if not isinstance(value, str) or value not in options:
            wanted = ", ".join(repr(option) for option in options)
            raise Invalid(f"must be one of {wanted}, got {show(value)}")
        return value

    return check


def text(value: object) -> str:
    """A non-empty string."""
    if not isinstance(value, str) or not value:
        raise Invalid(f"must be a non-empty string, got {show(value)}")
    return value


def optional(check: Check) -> Check:
    """``check``, or None (the key left out: TOML has no null, a dict from ``to_dict`` has one)."""

    def check_optional(value: object) -> object:
        return None if value is None else check(value)

    return check_optional


optional_text = optional(text)  # a non-empty string, or None (the key left out)


def flag(value: object) -> bool:
    """``true`` or ``false``."""
    if not isinstance(value, bool):
        raise Invalid(f"must be true or false, got {show(value)}")
    return value


# ---------------------------------------------------------------- bit widths and channels


def bit_width(value: object) -> int:
    """One of the wire's bit widths."""
    if not is_bit_width(value):
        raise Invalid(f"must be {_BITS}, got {show(value)}")
    return value


def activation_bits(value: object) -> int | str:
    """A bit width, or ``"auto"`` (the allocator picks one per device)."""
    if value != "auto" and not is_bit_width(value):
        raise Invalid(f"must be {_BITS} or 'auto', got {show(value)}")
    return value


def bit_set(value: object) -> tuple[int, ...]:
    """A non-empty list of distinct bit widths, returned sorted."""
    if not isinstance(value, (list, tuple)) or not value:
        raise Invalid(f"must be a non-empty list of bit-widths ({BIT_WIDTHS_TEXT}), got {show(value)}")
    bad = [v for v in value if not is_bit_width(v)]
    if bad:
        raise Invalid(f"every entry must be {_BITS}; not {', '.join(show(v) for v in bad)}")
    if len(set(value)) != len(value):
        raise Invalid(f"has repeated entries: {show(value)}")
    return tuple(sorted(value))


def _is_gain(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return math.isfinite(value) and 0 < value <= _MAX_GAIN


def gain_table(value: object) -> dict[str, float]:
    """A table of device id = linear channel gain in (0, 100]."""
    if not isinstance(value, Mapping):
        raise Invalid(f"must be a table of device id = linear gain, got {show(value)}")
    bad = [f"{k} = {show(v)}" for k, v in value.items() if not _is_gain(v)]
    if bad:
        raise Invalid(f"every gain must be a number in (0, 100]; not {', '.join(bad)}")
    return {str(k): float(v) for k, v in value.items()}


# ---------------------------------------------------------------- names, paths and addresses


def preset(value: object) -> str:
    """A model preset this sflam knows."""
    from server_runtime.presets import preset_names

    known = preset_names()
    if isinstance(value, str) and value in known:
        return value
    raise Invalid(f"unknown preset {show(value)}{did_you_mean(value, known)}; known: {', '.join(known)}")


def checkpoint_file(value: object) -> str | None:
    """An existing file, or None (start from the preset's fresh init)."""
    path = optional_text(value)
    if path is not None and not Path(path).is_file():
        raise Invalid(f"no such file: {path}")
    return path


def eval_spec(value: object) -> str:
    """``digits``, ``cifar10:<dir>`` or ``folder:<dir>``."""
    kind, sep, location = text(value).partition(":")
    if (kind == "digits" and not sep) or (kind in ("cifar10", "folder") and location):
        return value
    raise Invalid(f"must be {EVAL_FORMS}, got {value!r}")


def compute_device(value: object) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""
    fixed = ("auto", "cpu", "cuda")
    if isinstance(value, str) and (value in fixed or _CUDA_DEVICE.fullmatch(value)):
        return value
    raise Invalid(f"must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {show(value)}")


def broker_url(value: object) -> str:
    """An ``mqtt://`` or ``mqtts://`` URL the MQTT layer can connect to."""
    from edge_runtime.mqtt import BrokerAddress

    try:
        BrokerAddress.parse(text(value))
    except ValueError as exc:
        raise Invalid(str(exc)) from None
    return value


def run_id(value: object) -> str:
    """A run id that can stand in an MQTT topic."""
    from edge_runtime.protocol.topics import check_id

    try:
        return check_id(value, "run id")
    except ValueError as exc:
        raise Invalid(str(exc)) from None
