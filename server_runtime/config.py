"""The server daemon's run configuration: ``run.toml`` read into frozen dataclasses.

Validation collects every problem of a file (unknown sections and keys with a suggestion, wrong
types, out-of-range values) into one :class:`ConfigError`, so a user fixes a file in one pass.
What each key accepts is checked by :mod:`server_runtime.config_rules`. Relative paths are kept
as written; whoever uses the config resolves them against its working directory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from edge_runtime.protocol import MAX_CROP_PADDING, OPTIMIZER_CODES
from server_runtime import config_rules as rule
from server_runtime.config_cross import check_cross_fields
from server_runtime.presets import GLOBAL_POOLS, LAYOUT_FIELDS
from sflam_common.problems import ProblemsError, did_you_mean

SIGNING = ("auto", "ed25519", "off")
MODES = ("v1", "v2", "fl")  # SFL-V1 (a server copy per device), V2 (one shared model), FL (FedAvg baseline)
OPTIMIZERS = tuple(OPTIMIZER_CODES)  # server and device optimizers: the names RoundPlan carries
LR_SCHEDULES = ("constant", "cosine")


class ConfigError(ProblemsError):
    """A run configuration that cannot be used; ``problems`` lists every reason found."""


# ---------------------------------------------------------------- sections


@dataclass(frozen=True)
class ModelSection:
    """Which ViT to train and the weights it starts from."""

    preset: str = "vit_quick_patch4_16"
    checkpoint: str | None = None  # a local file; None starts from the preset's fresh init
    # the pooling layout (docs/checkpoints.md); a key left out follows the checkpoint, then timm
    global_pool: str | None = None  # "token" (the class token) or "avg" (the patch tokens' mean)
    class_token: bool | None = None
    fc_norm: bool | None = None  # LayerNorm on the pooled features instead of on every token

    @property
    def layout(self) -> dict[str, object]:
        """The layout fields set here (for ``create_model(layout=...)``)."""
        return {name: getattr(self, name) for name in LAYOUT_FIELDS}


@dataclass(frozen=True)
class DataSection:
    """The server's held-out evaluation set, its validation set, and how often they are evaluated."""

    eval: str = "digits"  # digits | cifar10:<dir> | folder:<dir>
    eval_batch_size: int = 256
    eval_every: int = 1  # rounds between evaluations
    validation_fraction: float = 0.0  # of the training set, held out for validation accuracy (0: none)
    augment_crop_padding: int = 0  # devices crop their training images at random, padded by this many pixels
    augment_hflip: bool = False  # devices flip their training images left-right with probability 0.5


@dataclass(frozen=True)
class TrainingSection:
    """Rounds, device selection and the optimiser of the split model."""

    rounds: int = 10
    devices_per_round: int = 5
    min_devices: int = 0  # online before the first round (0: devices_per_round); later: at most devices_per_round
    local_epochs: int = 1
    batch_size: int = 32
    mode: str = "v1"  # v1 | v2 | fl (the FedAvg baseline: devices train the whole model)
    optimizer: str = "sgd"  # server and devices alike: the plan carries it (edge_runtime.optimizer)
    lr: float = 0.05
    lr_schedule: str = "constant"  # constant | cosine (from lr in round 1 towards lr_min after the last)
    lr_min: float = 0.0
    momentum: float = 0.9
    weight_decay: float = 0.0

    def lr_at(self, round_: int) -> float:
        """The learning rate of training round ``round_`` (1-based), as the plan announces it: the
        cosine schedule reaches ``lr_min`` one round after the last, so the last round still learns."""
        if self.lr_schedule == "constant":
            return self.lr
        progress = min(max(round_ - 1, 0), self.rounds) / self.rounds
        return self.lr_min + (self.lr - self.lr_min) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class QuantSection:
    """Bit widths of the activations (up) and gradients (down) on the wire."""

    bits: int | str = 8  # or "auto": the daemon picks per device
    gradient_bits: int | str = 32  # or "auto" (with bits = "auto"): the allocator picks per device too
    model_bits: int = 32  # the global device weights each round broadcasts: 32 (float32) or 16 (float16)
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
    insecure_plaintext: bool = False  # allow username/password/CA file with mqtt:// to a host that is not loopback


@dataclass(frozen=True)
class SecuritySection:
    """Message signatures (docs/security.md): every frame signed with Ed25519 and verified, or not."""

    signing: str = "auto"  # ed25519 | off | auto (off with no broker credentials: a loopback run)
    signing_key: str | None = None  # the server's Ed25519 private key (PEM, mode 0600)
    device_keys: str | None = None  # the fleet.json listing the devices' public keys (reloaded when it changes)

    @property
    def signed(self) -> bool:
        return self.signing == "ed25519"


@dataclass(frozen=True)
class CheckpointSection:
    """Where round checkpoints go and how many are kept."""

    dir: str = "runs/default"
    keep: int = 2


@dataclass(frozen=True)
class MetricsSection:
    """Where round metrics go: a JSON-lines file, Prometheus, a progress bar, the fleet page."""

    jsonl: str | None = None  # None: <checkpoint.dir>/metrics.jsonl
    prometheus_port: int = 0  # 0: off
    prometheus_addr: str = "127.0.0.1"
    dashboard_port: int = 0  # the live fleet page (docs/dashboard.md); 0: off
    dashboard_addr: str = "127.0.0.1"  # another address needs a token
    dashboard_token_file: str | None = None  # the page's token (else --dashboard-token or $SFLAM_DASHBOARD_TOKEN)
    dashboard_tls_cert: str | None = None  # HTTPS with this PEM certificate and key (a fleet's broker/server.crt,
    dashboard_tls_key: str | None = None  # broker/server.key); else plain HTTP
    progress: bool = True


@dataclass(frozen=True)
class ComputeSection:
    """Where the server part runs and with which precision."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "auto"  # auto | bf16 | off
    workers: int = 4
    # trainer ranks (torch.distributed; docs/server.md "Trainer ranks"): rank 0 coordinates, all train
    trainers: int = 1
    batch_steps: str = "auto"  # auto (on with CUDA) | on | off: pending V1 steps as one computation
    rank_timeout_s: float = 10.0  # a rank silent this long is lost: its devices fail, later rounds skip it


@dataclass(frozen=True)
class AllocatorSection:
    """The allocator behind ``quant.bits = "auto"`` (docs/allocator.md): weights and limits."""

    lambda_energy: float = 1.0  # per joule of device energy
    lambda_time: float = 0.0  # per second of round latency
    lambda_quant: float = 1e-3  # per unit of the quantization-variance term Phi
    allowed_bits: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8)
    allowed_bits_down: tuple[int, ...] = (4, 5, 6, 7, 8)  # the gradient bits quant.gradient_bits = "auto" picks from
    downlink_quant_weight: float = 1.0  # a gradient's quantization term relative to an activation's (docs/allocator.md)
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
    "security": SecuritySection,
    "checkpoint": CheckpointSection,
    "metrics": MetricsSection,
    "compute": ComputeSection,
    "allocator": AllocatorSection,
}

_NON_NEGATIVE = "a finite number >= 0"
_SEED = rule.at_least(0)
# the checker of every key, section by section; a section's keys are its dataclass's fields
_RULES: dict[str, dict[str, rule.Check]] = {
    "model": {"preset": rule.preset, "checkpoint": rule.checkpoint_file,
              "global_pool": rule.optional(rule.choice(GLOBAL_POOLS)), "class_token": rule.optional(rule.flag),
              "fc_norm": rule.optional(rule.flag)},
    "data": {"eval": rule.eval_spec, "eval_batch_size": rule.at_least(1), "eval_every": rule.at_least(1),
             "validation_fraction": rule.number(lambda v: 0 <= v < 0.5, "a fraction in [0, 0.5)"),
             "augment_crop_padding": rule.integer(lambda v: 0 <= v <= MAX_CROP_PADDING,
                                                   f"a whole number of pixels in 0..{MAX_CROP_PADDING}"),
             "augment_hflip": rule.flag},
    "training": {
        "rounds": rule.at_least(1),
        "devices_per_round": rule.at_least(1),
        "min_devices": rule.at_least(0),
        "local_epochs": rule.at_least(1),
        "batch_size": rule.at_least(1),
        "mode": rule.choice(MODES),
        "optimizer": rule.choice(OPTIMIZERS),
        "lr": rule.number(lambda v: v > 0, "a finite number > 0"),
        "lr_schedule": rule.choice(LR_SCHEDULES),
        "lr_min": rule.number(lambda v: v >= 0, _NON_NEGATIVE),
        "momentum": rule.number(lambda v: 0 <= v < 1, "a number in [0, 1)"),
        "weight_decay": rule.number(lambda v: v >= 0, _NON_NEGATIVE),
    },
    "quant": {"bits": rule.activation_bits, "gradient_bits": rule.activation_bits, "model_bits": rule.model_bits,
              "per_token": rule.flag},
    "round": {
        "deadline_s": rule.number(lambda v: v > 0, "a finite number of seconds > 0"),
        "min_completed": rule.number(lambda v: 0 < v <= 1, "a fraction in (0, 1]"),
        "wait_for_devices_s": rule.number(lambda v: v > 0, "a finite number of seconds > 0"),
        "total_bandwidth_hz": rule.number(lambda v: v > 0, "a finite number of Hz > 0"),
        "offline_grace_s": rule.number(lambda v: v >= 0, "a finite number of seconds >= 0 (0: fail at once)"),
    },
    "broker": {
        "url": rule.broker_url,
        "run_id": rule.run_id,
        "username": rule.optional_text,
        "password_file": rule.optional_text,
        "ca_file": rule.optional_text,
        "max_frame_bytes": rule.at_least(1024),
        "insecure_plaintext": rule.flag,
    },
    "security": {"signing": rule.choice(SIGNING), "signing_key": rule.optional_text,
                 "device_keys": rule.optional_text},
    "checkpoint": {"dir": rule.text, "keep": rule.at_least(1)},
    "metrics": {
        "jsonl": rule.optional_text,
        "prometheus_port": rule.integer(lambda v: 0 <= v <= 65535, "0 (off) or a port 1..65535"),
        "prometheus_addr": rule.text,
        "dashboard_port": rule.integer(lambda v: 0 <= v <= 65535, "0 (off) or a port 1..65535"),
        "dashboard_addr": rule.text,
        "dashboard_token_file": rule.optional_text,
        "dashboard_tls_cert": rule.optional_text,
        "dashboard_tls_key": rule.optional_text,
        "progress": rule.flag,
    },
    "compute": {
        "device": rule.compute_device,
        "amp": rule.choice(("auto", "bf16", "off")),
        "workers": rule.at_least(1),
        "trainers": rule.at_least(1),
        "batch_steps": rule.choice(("auto", "on", "off")),
        "rank_timeout_s": rule.number(lambda v: v > 0, "a finite number of seconds > 0"),
    },
    "allocator": {
        "lambda_energy": rule.number(lambda v: v >= 0, _NON_NEGATIVE),
        "lambda_time": rule.number(lambda v: v >= 0, _NON_NEGATIVE),
        "lambda_quant": rule.number(lambda v: v >= 0, _NON_NEGATIVE),
        "allowed_bits": rule.bit_set,
        "allowed_bits_down": rule.bit_set,
        "downlink_quant_weight": rule.number(lambda v: v >= 0, _NON_NEGATIVE),
        "t_max_s": rule.number(lambda v: v >= 0, "a finite number of seconds >= 0 (0: round.deadline_s)"),
        "default_distance_m": rule.number(lambda v: v > 0, "a finite number of metres > 0"),
        "downlink_rate_bps": rule.number(lambda v: v > 0, "a finite number of bit/s > 0"),
        "channel_gains": rule.gain_table,
    },
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
    security: SecuritySection = field(default_factory=SecuritySection)
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
        return {"seed": self.seed, **self._section_dicts()}

    def to_toml(self) -> str:
        """The run.toml text of this config (None values left out), which :func:`parse_config`
        reads back equal."""
        return config_toml(self._section_dicts(), self.seed)

    def _section_dicts(self) -> dict[str, dict[str, object]]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in _SECTIONS}

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
    check_cross_fields(data, problems)
    if problems:
        raise ConfigError(source, problems)
    return RunConfig(seed=seed, **sections, source=source)


def _read_section(data: Mapping[str, object], name: str, problems: list[str]) -> object:
    cls = _SECTIONS[name]
    table = data.get(name, {})
    if not isinstance(table, dict):
        problems.append(f"{name}: must be a table [{name}], got {rule.show(table)}")
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
    check: rule.Check,
    default: object,
    prefix: str,
    problems: list[str],
) -> object:
    if key not in table:
        return default
    try:
        return check(table[key])
    except rule.Invalid as exc:
        problems.append(f"{prefix}{key}: {exc}")
        return default


def _report_unknown_top(data: Mapping[str, object], problems: list[str]) -> None:
    for key, value in data.items():
        if key == "seed" or key in _SECTIONS:
            continue
        if isinstance(value, dict):
            hint = did_you_mean(key, _SECTIONS, show="[{}]") or f" (sections: {_names()})"
            problems.append(f"[{key}]: unknown section{hint}")
        else:
            problems.append(f"{key}: unknown top-level key{_suggest(key, ['seed'], None)}")


def _suggest(key: str, known: Iterable[str], section: str | None) -> str:
    """' (did you mean X?)': a close key here, else the same key in another section."""
    close = did_you_mean(key, known)
    if close:
        return close
    homes = [f"{name}.{key}" for name, rules in _RULES.items() if key in rules and name != section]
    # an exact suggestion (the key's home), worded like every other hint
    return f" (did you mean {homes[0]}?)" if homes else ""


def _names() -> str:
    return ", ".join(f"[{name}]" for name in _SECTIONS)


# ---------------------------------------------------------------- writing


def config_toml(sections: Mapping[str, Mapping[str, object]], seed: int) -> str:
    """A run.toml with ``seed`` and ``sections`` (name -> keys), for programs that write one.

    None values are left out: TOML has no null, and an optional key left out reads as None.
    """
    lines = [f"seed = {seed}"]
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in values.items() if value is not None]
    return "\n".join(lines) + "\n"


def _toml_value(value: object) -> str:
    """A TOML literal: an array for a list or tuple, an inline table for a mapping."""
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_toml_string(str(k))} = {_toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, float):
        return repr(float(value))  # the shortest text that reads back as the same float (inf, nan too)
    if isinstance(value, int):
        return json.dumps(value)  # true / false for a bool
    raise TypeError(f"no TOML literal for {value!r} ({type(value).__name__})")


def _toml_string(text: str) -> str:
    """A TOML basic string: JSON's escapes, but non-ASCII written as is (JSON would escape an
    emoji as a surrogate pair, which TOML refuses) and DEL escaped (TOML refuses it raw)."""
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")
