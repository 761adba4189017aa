"""The server daemon's run configuration: ``run.toml`` read into frozen dataclasses.

Validation collects every problem of a file (unknown sections and keys with a suggestion, wrong
types, out-of-range values) into one :class:`ConfigError`, so a user fixes a file in one pass.
Relative paths are kept as written; whoever uses the config resolves them against its working
directory.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

_EVAL_FORMS = "digits | cifar10:<dir> | folder:<dir>"
_BIT_WIDTHS = (1, 2, 3, 4, 5, 6, 7, 8, 16, 32)
_BIT_TEXT = "one of 1..8, 16, 32"
_CUDA_DEVICE = re.compile(r"cuda:(0|[1-9][0-9]*)")


class ConfigError(ValueError):
    """A run configuration that cannot be used; ``problems`` lists every reason found."""

    def __init__(self, source: str, problems: Sequence[str]) -> None:
        self.source = source
        self.problems = list(problems)
        noun = "problem" if len(self.problems) == 1 else "problems"
        lines = "".join(f"\n  - {problem}" for problem in self.problems)
        super().__init__(f"{source}: {len(self.problems)} {noun}:{lines}")

    def __reduce__(self) -> tuple[type, tuple[str, list[str]]]:
        return type(self), (self.source, self.problems)


# ---------------------------------------------------------------- sections


@dataclass(frozen=True)
class ModelSection:
    """Which ViT to train and the weights it starts from."""

    preset: str = "vit_quick_patch4_16"
    checkpoint: str | None = None  # a local file; None starts from the preset's fresh init


@dataclass(frozen=True)
class DataSection:
    """The server's held-out evaluation set and how often it is evaluated."""

    eval: str = "digits"  # digits | cifar10:<dir> | folder:<dir>
    eval_batch_size: int = 256
    eval_every: int = 1  # rounds between evaluations


@dataclass(frozen=True)
class TrainingSection:
    """Rounds, device selection and the optimiser of the split model."""

    rounds: int = 10
    devices_per_round: int = 5
    min_devices: int = 0  # online before a round starts; 0 means devices_per_round
    local_epochs: int = 1
    batch_size: int = 32
    mode: str = "v1"  # v1 | v2 | fl (the FedAvg baseline: devices train the whole model)
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0


@dataclass(frozen=True)
class QuantSection:
    """Bit widths of the activations (up) and gradients (down) on the wire."""

    bits: int | str = 8  # or "auto": the daemon picks per device
    gradient_bits: int = 32
    per_token: bool = False


@dataclass(frozen=True)
class RoundSection:
    """Timing of one round and the bandwidth shared by its devices."""

    deadline_s: float = 120.0
    min_completed: float = 0.5  # fraction of the selected devices that must finish
    wait_for_devices_s: float = 300.0
    total_bandwidth_hz: float = 20e6  # split equally among the selected devices
    offline_grace_s: float = 10.0  # a selected device reported offline fails unless back online within this


@dataclass(frozen=True)
class BrokerSection:
    """Where the MQTT broker is and how to log in to it."""

    url: str = "mqtt://127.0.0.1:1883"
    run_id: str = "default"
    username: str | None = None
    password_file: str | None = None
    ca_file: str | None = None
    max_frame_bytes: int = 262144


@dataclass(frozen=True)
class CheckpointSection:
    """Where round checkpoints go and how many are kept."""

    dir: str = "runs/default"
    keep: int = 2


@dataclass(frozen=True)
class MetricsSection:
    """Where round metrics go: a JSON-lines file, Prometheus, a progress bar."""

    jsonl: str | None = None  # None: <checkpoint.dir>/metrics.jsonl
    prometheus_port: int = 0  # 0: off
    prometheus_addr: str = "127.0.0.1"
    progress: bool = True


@dataclass(frozen=True)
class ComputeSection:
    """Where the server part runs and with which precision."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "auto"  # auto | bf16 | off
    workers: int = 4


@dataclass(frozen=True)
class AllocatorSection:
    """The allocator behind ``quant.bits = "auto"`` (docs/allocator.md): weights and limits."""

    lambda_energy: float = 1.0  # per joule of device energy
    lambda_time: float = 0.0  # per second of round latency
    lambda_quant: float = 1e-3  # per unit of the quantization-variance term Phi
    allowed_bits: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8)
    t_max_s: float = 0.0  # latency cap per round; 0: round.deadline_s
    default_distance_m: float = 100.0  # a device's channel before its telemetry calibrates it
    downlink_rate_bps: float = 100e6  # the server's downlink per device
    # known linear uplink channel gains by device id (channel estimates, or a simulation's scenario);
    # a device not listed starts from the path loss at default_distance_m
    channel_gains: Mapping[str, float] = field(default_factory=dict)


_SECTIONS: dict[str, type] = {
    "model": ModelSection,
    "data": DataSection,
    "training": TrainingSection,
    "quant": QuantSection,
    "round": RoundSection,
    "broker": BrokerSection,
    "checkpoint": CheckpointSection,
    "metrics": MetricsSection,
    "compute": ComputeSection,
    "allocator": AllocatorSection,
}


@dataclass(frozen=True)
class RunConfig:
    """Everything ``sflam server`` needs to run; ``source`` names the file it came from."""

    seed: int = 0
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    quant: QuantSection = field(default_factory=QuantSection)
    round: RoundSection = field(default_factory=RoundSection)
    broker: BrokerSection = field(default_factory=BrokerSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    compute: ComputeSection = field(default_factory=ComputeSection)
    allocator: AllocatorSection = field(default_factory=AllocatorSection)
    source: str = field(default="<defaults>", compare=False)

    @property
    def checkpoint_dir(self) -> Path:
        """The checkpoint folder, as written (relative to the working directory)."""
        return Path(self.checkpoint.dir)

    @property
    def metrics_path(self) -> Path:
        """The metrics JSON-lines file: ``metrics.jsonl`` or ``<checkpoint.dir>/metrics.jsonl``."""
        if self.metrics.jsonl is not None:
            return Path(self.metrics.jsonl)
        return self.checkpoint_dir / "metrics.jsonl"

    def to_dict(self) -> dict[str, object]:
        """A JSON-able dict (``source`` left out) that :meth:`from_dict` reads back."""
        sections = {name: dataclasses.asdict(getattr(self, name)) for name in _SECTIONS}
        return {"seed": self.seed, **sections}

    @classmethod
    def from_dict(cls, data: Mapping[str, object], source: str = "<dict>") -> RunConfig:
        """Validate ``data`` laid out like run.toml; ConfigError lists every problem."""
        return _build(data, source, [])

    def replace(self, **sections: object) -> RunConfig:
        """A copy with some sections (or ``seed``) swapped; not validated again."""
        return dataclasses.replace(self, **sections)


# ---------------------------------------------------------------- loading


def load_config(
    path: str | Path, overrides: Mapping[str, object] | None = None
) -> RunConfig:
    """Read a run.toml; ``overrides`` (``{"broker.url": ...}``) apply before validation."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot read {path}: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(str(path), [f"{path} is not UTF-8 text: {exc.reason}"]) from None
    return parse_config(text, str(path), overrides)


def parse_config(
    text: str, source: str = "<string>", overrides: Mapping[str, object] | None = None
) -> RunConfig:
    """Parse run.toml text; ``source`` names it in messages."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, [f"invalid TOML in {source}: {exc}"]) from None
    problems: list[str] = []
    merged = _apply_overrides(data, overrides or {}, problems)
    return _build(merged, source, problems)


def _apply_overrides(
    data: Mapping[str, object], overrides: Mapping[str, object], problems: list[str]
) -> dict[str, object]:
    """A copy of ``data`` with dotted ``section.key`` (or top-level ``key``) values set."""
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for key, value in overrides.items():
        parts = key.split(".")
        if len(parts) == 1 and parts[0]:
            merged[key] = value
        elif len(parts) == 2 and all(parts):
            table = merged.setdefault(parts[0], {})
            if isinstance(table, dict):
                table[parts[1]] = value
        else:
            problems.append(f"override {key!r}: must be 'key' or 'section.key'")
    return merged


# ---------------------------------------------------------------- validation


def _build(data: Mapping[str, object], source: str, problems: list[str]) -> RunConfig:
    """Check every key of ``data``; raise one ConfigError or return the config."""
    _report_unknown_top(data, problems)
    seed = _read_value(data, "seed", _SEED, 0, "", problems)
    sections = {name: _read_section(data, name, problems) for name in _SECTIONS}
    _check_cross_fields(data, problems)
    if problems:
        raise ConfigError(source, problems)
    return RunConfig(seed=seed, **sections, source=source)


def _read_section(data: Mapping[str, object], name: str, problems: list[str]) -> object:
    cls = _SECTIONS[name]
    table = data.get(name, {})
    if not isinstance(table, dict):
        problems.append(f"{name}: must be a table [{name}], got {_show(table)}")
        return cls()
    rules = _RULES[name]
    for key in table:
        if key not in rules:
            problems.append(f"{name}.{key}: unknown key{_suggest(key, rules, name)}")
    values = {
        f.name: _read_value(table, f.name, rules[f.name], _default(f), f"{name}.", problems)
        for f in dataclasses.fields(cls)
    }
    return cls(**values)


def _default(f: dataclasses.Field) -> object:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _read_value(
    table: Mapping[str, object],
    key: str,
    check: Check,
    default: object,
    prefix: str,
    problems: list[str],
) -> object:
    if key not in table:
        return default
    try:
        return check(table[key])
    except _Invalid as exc:
        problems.append(f"{prefix}{key}: {exc}")
        return default


def _report_unknown_top(data: Mapping[str, object], problems: list[str]) -> None:
    for key, value in data.items():
        if key == "seed" or key in _SECTIONS:
            continue
        if isinstance(value, dict):
            close = difflib.get_close_matches(key, list(_SECTIONS), n=1)
            hint = f" (did you mean [{close[0]}]?)" if close else f" (sections: {_names()})"
            problems.append(f"[{key}]: unknown section{hint}")
        else:
            problems.append(f"{key}: unknown top-level key{_suggest(key, ['seed'], None)}")


def _suggest(key: str, known: Sequence[str] | Mapping[str, object], section: str | None) -> str:
    """' (did you mean X?)': a close key here, else the same key in another section."""
    close = difflib.get_close_matches(key, list(known), n=1)
    if close:
        return f" (did you mean {close[0]!r}?)"
    homes = [name for name, rules in _RULES.items() if key in rules and name != section]
    return f" (did you mean {homes[0]}.{key}?)" if homes else ""


def _names() -> str:
    return ", ".join(f"[{name}]" for name in _SECTIONS)


def _check_cross_fields(data: Mapping[str, object], problems: list[str]) -> None:
    broker = data.get("broker")
    if isinstance(broker, dict):
        if broker.get("password_file") is not None and broker.get("username") is None:
            problems.append("broker.password_file: is set but broker.username is not")
    training, quant = data.get("training"), data.get("quant")
    if isinstance(training, dict) and isinstance(quant, dict):
        if training.get("mode") == "fl" and quant.get("bits") == "auto":
            problems.append("quant.bits: 'auto' allocates for split activations, which training.mode = 'fl' does "
                            "not send (devices upload the whole model); set a fixed bit-width")


# ---------------------------------------------------------------- value checks


class _Invalid(Exception):
    """One value's problem; the caller prefixes it with the key's path."""


Check = Callable[[object], object]


def _show(value: object) -> str:
    """The value as written, with its type where the repr alone would hide a mismatch."""
    plain = isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))
    return repr(value) if plain else f"{value!r} ({type(value).__name__})"


def _integer(ok: Callable[[int], bool], wanted: str) -> Check:
    def check(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not ok(value):
            raise _Invalid(f"must be {wanted}, got {_show(value)}")
        return value

    return check


def _number(ok: Callable[[float], bool], wanted: str) -> Check:
    def check(value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Invalid(f"must be {wanted}, got {_show(value)}")
        if isinstance(value, float) and not math.isfinite(value) or not ok(float(value)):
            raise _Invalid(f"must be {wanted}, got {value!r}")
        return float(value)

    return check


def _choice(*options: str) -> Check:
    def check(value: object) -> str:
        if not isinstance(value, str) or value not in options:
            wanted = ", ".join(repr(option) for option in options)
            raise _Invalid(f"must be one of {wanted}, got {_show(value)}")
        return value

    return check


def _text(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise _Invalid(f"must be a non-empty string, got {_show(value)}")
    return value


def _optional_text(value: object) -> str | None:
    return None if value is None else _text(value)


def _flag(value: object) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(f"must be true or false, got {_show(value)}")
    return value


def _is_bit_width(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value in _BIT_WIDTHS


def _bit_width(value: object) -> int:
    if not _is_bit_width(value):
        raise _Invalid(f"must be {_BIT_TEXT}, got {_show(value)}")
    return value


def _activation_bits(value: object) -> int | str:
    if value != "auto" and not _is_bit_width(value):
        raise _Invalid(f"must be {_BIT_TEXT} or 'auto', got {_show(value)}")
    return value


def _bit_set(value: object) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not value:
        raise _Invalid(f"must be a non-empty list of bit-widths ({_BIT_TEXT}), got {_show(value)}")
    bad = [v for v in value if not _is_bit_width(v)]
    if bad:
        raise _Invalid(f"every entry must be {_BIT_TEXT}; not {', '.join(_show(v) for v in bad)}")
    if len(set(value)) != len(value):
        raise _Invalid(f"has repeated entries: {_show(value)}")
    return tuple(sorted(value))


def _gain_table(value: object) -> dict[str, float]:
    if not isinstance(value, Mapping):
        raise _Invalid(f"must be a table of device id = linear gain, got {_show(value)}")
    bad = [f"{k} = {_show(v)}" for k, v in value.items()
           if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and 0 < v <= 1e2)]
    if bad:
        raise _Invalid(f"every gain must be a number in (0, 100]; not {', '.join(bad)}")
    return {str(k): float(v) for k, v in value.items()}


def _preset(value: object) -> str:
    from server_runtime.presets import preset_names

    known = preset_names()
    if isinstance(value, str) and value in known:
        return value
    close = difflib.get_close_matches(value, known, n=1) if isinstance(value, str) else []
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise _Invalid(f"unknown preset {_show(value)}; {hint}known: {', '.join(known)}")


def _checkpoint_file(value: object) -> str | None:
    path = _optional_text(value)
    if path is not None and not Path(path).is_file():
        raise _Invalid(f"no such file: {path}")
    return path


def _eval_spec(value: object) -> str:
    kind, sep, location = _text(value).partition(":")
    if (kind == "digits" and not sep) or (kind in ("cifar10", "folder") and location):
        return value
    raise _Invalid(f"must be {_EVAL_FORMS}, got {value!r}")


def _compute_device(value: object) -> str:
    fixed = ("auto", "cpu", "cuda")
    if isinstance(value, str) and (value in fixed or _CUDA_DEVICE.fullmatch(value)):
        return value
    raise _Invalid(f"must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {_show(value)}")


def _broker_url(value: object) -> str:
    from edge_runtime.mqtt import BrokerAddress

    try:
        BrokerAddress.parse(_text(value))
    except ValueError as exc:
        raise _Invalid(str(exc)) from None
    return value


def _run_id(value: object) -> str:
    from edge_runtime.protocol.topics import check_id

    try:
        return check_id(value, "run id")
    except ValueError as exc:
        raise _Invalid(str(exc)) from None


def _at_least(low: int) -> Check:
    return _integer(lambda v: v >= low, f"an integer >= {low}")


_SEED = _at_least(0)
_RULES: dict[str, dict[str, Check]] = {
    "model": {"preset": _preset, "checkpoint": _checkpoint_file},
    "data": {"eval": _eval_spec, "eval_batch_size": _at_least(1), "eval_every": _at_least(1)},
    "training": {
        "rounds": _at_least(1),
        "devices_per_round": _at_least(1),
        "min_devices": _at_least(0),
        "local_epochs": _at_least(1),
        "batch_size": _at_least(1),
        "mode": _choice("v1", "v2", "fl"),
        "optimizer": _choice("sgd", "adam", "adamw"),
        "lr": _number(lambda v: v > 0, "a finite number > 0"),
        "momentum": _number(lambda v: 0 <= v < 1, "a number in [0, 1)"),
        "weight_decay": _number(lambda v: v >= 0, "a finite number >= 0"),
    },
    "quant": {"bits": _activation_bits, "gradient_bits": _bit_width, "per_token": _flag},
    "round": {
        "deadline_s": _number(lambda v: v > 0, "a finite number of seconds > 0"),
        "min_completed": _number(lambda v: 0 < v <= 1, "a fraction in (0, 1]"),
        "wait_for_devices_s": _number(lambda v: v > 0, "a finite number of seconds > 0"),
        "total_bandwidth_hz": _number(lambda v: v > 0, "a finite number of Hz > 0"),
        "offline_grace_s": _number(lambda v: v >= 0, "a finite number of seconds >= 0 (0: fail at once)"),
    },
    "broker": {
        "url": _broker_url,
        "run_id": _run_id,
        "username": _optional_text,
        "password_file": _optional_text,
        "ca_file": _optional_text,
        "max_frame_bytes": _at_least(1024),
    },
    "checkpoint": {"dir": _text, "keep": _at_least(1)},
    "metrics": {
        "jsonl": _optional_text,
        "prometheus_port": _integer(lambda v: 0 <= v <= 65535, "0 (off) or a port 1..65535"),
        "prometheus_addr": _text,
        "progress": _flag,
    },
    "compute": {
        "device": _compute_device,
        "amp": _choice("auto", "bf16", "off"),
        "workers": _at_least(1),
    },
    "allocator": {
        "lambda_energy": _number(lambda v: v >= 0, "a finite number >= 0"),
        "lambda_time": _number(lambda v: v >= 0, "a finite number >= 0"),
        "lambda_quant": _number(lambda v: v >= 0, "a finite number >= 0"),
        "allowed_bits": _bit_set,
        "t_max_s": _number(lambda v: v >= 0, "a finite number of seconds >= 0 (0: round.deadline_s)"),
        "default_distance_m": _number(lambda v: v > 0, "a finite number of metres > 0"),
        "downlink_rate_bps": _number(lambda v: v > 0, "a finite number of bit/s > 0"),
        "channel_gains": _gain_table,
    },
}


def config_toml(sections: Mapping[str, Mapping[str, object]], seed: int) -> str:
    """A run.toml with ``seed`` and ``sections`` (name -> keys), for programs that write one."""
    lines = [f"seed = {seed}"]
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


def _toml_value(value: object) -> str:
    """A TOML literal: JSON's for scalars and lists, an inline table for a mapping."""
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, float):
        return repr(value)
    return json.dumps(value)
