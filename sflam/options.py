"""The options of ``sflam simulate`` and what they make: the daemon's :class:`RunConfig`.

Options resolve as defaults < ``--config FILE`` (its ``[simulate]`` table, and ``[server.*]``
overrides of run.toml keys) < command-line flags; :class:`SimulateError` lists every problem of
a bad set at once. :func:`server_config` turns a valid set into the server's RunConfig directly
(the run directory's run.toml is written from it, for the record and for ``--resume``).

Schemes: ``sflam`` (quantized activations, ``--bits auto`` lets the allocator choose bits, power
and bandwidth per device and round), ``sfl`` (float32 activations, fixed allocation), ``sl``
(one device at a time training one model: each round is ``per_round`` turns of one device on the
shared SFL-V2 server model) and ``fl`` (FedAvg of the whole model trained on the devices).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server_runtime.presets import GLOBAL_POOLS
from sflam_common.bits import BIT_WIDTHS, BIT_WIDTHS_TEXT
from sflam_common.problems import ProblemsError, did_you_mean

SCHEMES = ("sflam", "sfl", "sl", "fl")
LOCAL_BROKERS = {"embedded": "auto", "mosquitto": "mosquitto", "amqtt": "amqtt"}
BACKENDS = ("onnx", "numpy", "litert", "auto")
RUN_ID = "sim"
HOSTS_AUTO = 50  # up to this many devices each gets a process of its own by default
ENGINES = ("local", "ray")


class SimulateError(ProblemsError):
    """A bad option set (every problem listed) or a run that could not complete."""

    def __init__(self, problems: Sequence[str] | str, source: str | None = None) -> None:
        super().__init__(source, problems)

    def __reduce__(self) -> tuple[type, tuple[list[str], str | None]]:
        return type(self), (self.problems, self.source)


@dataclass(frozen=True)
class SimOptions:
    """Everything a simulation run needs; the defaults are the quickstart (``make demo``)."""

    devices: int = 10
    per_round: int = 5
    rounds: int = 60
    alpha: float = 0.5
    resample: tuple[int, int] | None = None  # (lo, hi): shards of U{lo..hi} images drawn with replacement
    bits: int | str = "auto"
    scheme: str = "sflam"
    dataset: str = "digits"
    model: str = "vit_quick_patch4_16"
    checkpoint: str | None = None  # timm-layout weights to start from (local file)
    global_pool: str | None = None  # token | avg; None: the checkpoint's, else token (docs/checkpoints.md)
    broker: str = "embedded"  # a URL, or a private broker on a free loopback port: embedded (mosquitto
    # when installed, else amqtt), mosquitto or amqtt
    out: str | None = None  # default runs/sim-<scheme>-<time>
    seed: int = 0
    local_epochs: int = 5
    batch_size: int = 32
    # the demo recipe (docs/results.md): Adam at 2e-3 under a cosine schedule converges on every seed
    # where SGD at a fixed 0.05 oscillated 2-4 points from round to round
    lr: float = 0.002
    lr_schedule: str = "cosine"  # from lr towards 0 over the run (training.lr_schedule); or "constant"
    optimizer: str = "adam"
    mode: str = "v1"  # SFL-V1 (server copy per device) or V2 (one shared server model)
    # downlink gradient bits; None: "auto" (the allocator's) when bits are "auto", else 32
    gradient_bits: int | str | None = None
    model_bits: int | None = None  # the broadcast global device weights: 16 (float16) or 32; None: 16 for sflam
    profiles: tuple[str, ...] = ("raspberry-pi-5", "jetson-orin-nano", "android-flagship", "android-midrange")
    radius_m: float = 500.0
    emulate_link: bool = True
    # how the radios are emulated: "bucket" (a token bucket in each device process) or "netem"
    # (kernel links: network namespaces, tc and packet queues; sflam.netem, docs/simulate.md)
    network: str = "bucket"
    link_delay_ms: float | None = None  # netem: one-way delay; None: the radio kind's default
    link_jitter_ms: float | None = None  # netem: +- uniform jitter; None: the radio's (0 when a delay is given)
    link_loss: float | None = None  # netem: packet loss probability each way; None: the radio's (0)
    link_flap: str | None = None  # netem: "ROUND:DOWN_S[:DEVICE]": that device's link down mid-round
    keepalive_s: int = 30  # the devices' MQTT keep-alive
    sign: bool = False  # sign every message with keys made for the run (docs/security.md); else unsigned
    backend: str = "onnx"
    hosts: int | None = None  # device host processes; 0: a process per device; None: auto (HOSTS_AUTO)
    engine: str = "local"  # where device hosts run: local processes, or Ray actors
    ray_address: str | None = None  # --engine ray: the cluster's HOST:PORT; None: a local Ray
    device_threads: int = 1
    server_workers: int = 2
    trainers: int = 1  # trainer ranks of the server (torch.distributed; docs/server.md)
    deadline_s: float = 300.0
    t_max_s: float = 5.0  # the allocator's latency cap per round (bits = auto)
    min_completed: float = 0.5
    eval_every: int = 1
    validation_fraction: float = 0.1  # of the training set, held out for the server's validation accuracy
    dashboard: str | None = None  # "[ADDR:]PORT": the server's live fleet page (docs/dashboard.md)
    server: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # run.toml overrides by section

    @property
    def bits_label(self) -> str:
        """What the activations were: ``auto``, ``8``, ``32``."""
        return str(self.bits)

    def __post_init__(self) -> None:
        if self.gradient_bits is None:  # both directions quantized by the allocator unless bits are fixed
            auto = self.scheme == "sflam" and self.bits == "auto"
            object.__setattr__(self, "gradient_bits", "auto" if auto else 32)
        if self.model_bits is None:  # the float32 baselines (sfl, sl, fl) stay float32 throughout
            object.__setattr__(self, "model_bits", 16 if self.scheme == "sflam" else 32)


RUN_KEYS = "keys"  # --sign: the run's keys, laid out as a fleet's keys/ (server.key, server.pub, devices/, fleet.json)
FIELDS = {f.name: f for f in dataclasses.fields(SimOptions)}
CLI_NAMES = ("config", "devices", "per_round", "rounds", "alpha", "resample", "bits", "gradient_bits", "model_bits",
             "scheme", "dataset", "model", "broker", "out", "seed", "local_epochs", "batch_size", "lr", "lr_schedule",
             "optimizer", "checkpoint", "global_pool", "mode", "profiles", "validation_fraction", "radius_m", "backend", "hosts",
             "engine", "ray_address", "emulate_link", "t_max_s", "trainers", "network", "link_delay_ms",
             "link_jitter_ms", "link_loss", "link_flap", "keepalive_s", "sign", "dashboard")


# ---------------------------------------------------------------------------------------------
# options


def resolve_options(args: argparse.Namespace) -> SimOptions:
    """Defaults, then the ``--config`` file's ``[simulate]`` table, then the flags; validated."""
    values: dict[str, Any] = {}
    problems: list[str] = []
    if getattr(args, "config", None):
        values.update(_read_config_file(Path(args.config), problems))
    for name in CLI_NAMES:
        if name == "config":
            continue
        value = getattr(args, name, None)
        if value is not None:
            values[name] = value
    if problems:
        raise SimulateError(problems)
    return build_options(values)


def _read_config_file(path: Path, problems: list[str]) -> dict[str, Any]:
    """The ``[simulate]`` table (and ``[server]`` overrides) of a TOML file."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        problems.append(f"--config {path}: no such file")
        return {}
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        problems.append(f"--config {path}: {exc}")
        return {}
    unknown = sorted(set(data) - {"simulate", "server"})
    for name in unknown:
        problems.append(f"{path}: unknown table [{name}]; expected [simulate] and optionally [server]"
                        + did_you_mean(name, ("simulate", "server")))
    values = dict(data.get("simulate", {}))
    if "server" in data:
        values["server"] = data["server"]
    return values


def build_options(values: Mapping[str, Any]) -> SimOptions:
    """SimOptions from plain values (a TOML table or flags); SimulateError lists every problem."""
    problems: list[str] = []
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in FIELDS:
            problems.append(f"unknown option {key!r}" + did_you_mean(key, FIELDS))
            continue
        kwargs[key] = value
    _coerce(kwargs, problems)
    if problems:
        raise SimulateError(problems)
    opts = SimOptions(**kwargs)
    problems = check_options(opts)
    if problems:
        raise SimulateError(problems)
    return opts


def _coerce(kwargs: dict[str, Any], problems: list[str]) -> None:
    """Types: ints, floats, bits (``auto`` or an int), profiles (list or comma string)."""
    ints = ("devices", "per_round", "rounds", "seed", "local_epochs", "batch_size", "device_threads", "model_bits",
            "server_workers", "eval_every", "hosts", "trainers", "keepalive_s")
    floats = ("alpha", "lr", "radius_m", "deadline_s", "min_completed", "t_max_s", "validation_fraction",
              "link_delay_ms", "link_jitter_ms", "link_loss")
    for name in ints:
        if name in kwargs:
            value = kwargs[name]
            if isinstance(value, bool) or not isinstance(value, int):
                problems.append(f"{name}: expected an integer, got {value!r}")
    for name in floats:
        if name in kwargs and kwargs[name] is not None:
            value = kwargs[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                problems.append(f"{name}: expected a number, got {value!r}")
            else:
                kwargs[name] = float(value)
    for name in ("bits", "gradient_bits"):
        if name not in kwargs:
            continue
        bits = kwargs[name]
        if isinstance(bits, str) and bits.strip().lower() == "auto":
            kwargs[name] = "auto"
        elif isinstance(bits, bool) or not isinstance(bits, (int, str)):
            problems.append(f"{name}: expected 'auto' or {BIT_WIDTHS_TEXT}, got {bits!r}")
        else:
            try:
                kwargs[name] = int(bits)
            except ValueError:
                problems.append(f"{name}: expected 'auto' or {BIT_WIDTHS_TEXT}, got {bits!r}")
    if "profiles" in kwargs:
        value = kwargs["profiles"]
        names = value.split(",") if isinstance(value, str) else value
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
            problems.append(f"profiles: expected a comma list of profile names, got {value!r}")
        else:
            kwargs["profiles"] = tuple(n.strip() for n in names if n.strip())
    for name in ("emulate_link", "sign"):
        if name in kwargs and not isinstance(kwargs[name], bool):
            problems.append(f"{name}: expected true or false, got {kwargs[name]!r}")
    if "resample" in kwargs:
        _coerce_resample(kwargs, problems)
    if "server" in kwargs and not (isinstance(kwargs["server"], Mapping)
                                   and all(isinstance(v, Mapping) for v in kwargs["server"].values())):
        problems.append("server: expected tables of run.toml keys by section, e.g. [server.round]")


def _coerce_resample(kwargs: dict[str, Any], problems: list[str]) -> None:
    """``"LO-HI"`` (a flag or TOML string, read as ``sflam data partition --resample`` reads it) or [LO, HI]."""
    from server_runtime.data import PartitionError
    from server_runtime.data.cli import parse_size_range

    value = kwargs["resample"]
    if value is None:
        return
    if isinstance(value, str):
        try:
            kwargs["resample"] = parse_size_range(value)
        except PartitionError as exc:
            problems.append(f"resample: {exc}")
    elif (isinstance(value, (list, tuple)) and len(value) == 2
          and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        kwargs["resample"] = (value[0], value[1])
    else:
        problems.append(f"resample: expected \"LO-HI\" or [LO, HI], two whole numbers such as 20-40, got {value!r}")


def too_few_images(devices: int, dataset: str, train_images: int) -> str | None:
    """The problem of a Dirichlet split without ``resample`` that cannot give every device its minimum."""
    from server_runtime.data import MIN_SAMPLES

    needed = devices * MIN_SAMPLES
    if needed <= train_images:
        return None
    return (f"devices: {devices} devices x {MIN_SAMPLES} samples needs {needed} training images; {dataset} has "
            f"{train_images} for the devices: pass --resample LO-HI (e.g. --resample 20-40) to draw each device's shard with "
            f"replacement, or use at most {train_images // MIN_SAMPLES} devices")


@functools.lru_cache(maxsize=4)
def _cheap_train_size(dataset: str, validation_fraction: float) -> int | None:
    """Training images (after the validation hold-out) of a data set whose size is cheap to know
    (digits); None for the others."""
    if dataset != "digits":
        return None
    from server_runtime.data import load_dataset

    # stratified splits: the same sizes for every seed
    return len(load_dataset(dataset, validation_fraction=validation_fraction).train)


def check_options(opts: SimOptions) -> list[str]:
    """Every problem of a set of options (empty when it can run)."""
    from server_runtime.config import LR_SCHEDULES, OPTIMIZERS

    problems = []
    for name in ("devices", "per_round", "rounds", "local_epochs", "batch_size", "device_threads",
                 "server_workers", "eval_every", "trainers"):
        if getattr(opts, name) < 1:
            problems.append(f"{name}: must be >= 1, got {getattr(opts, name)}")
    if opts.per_round > opts.devices:
        problems.append(f"per_round {opts.per_round} exceeds devices {opts.devices}")
    problems += _fleet_problems(opts)
    for name in ("alpha", "lr", "radius_m", "deadline_s", "t_max_s"):
        value = getattr(opts, name)
        if not (value > 0 and math.isfinite(value)):
            problems.append(f"{name}: must be a positive number, got {value}")
    if not 0 <= opts.validation_fraction < 0.5:
        problems.append(f"validation_fraction: must be in [0, 0.5), got {opts.validation_fraction}")
    if not 0 < opts.min_completed <= 1:
        problems.append(f"min_completed: must be in (0, 1], got {opts.min_completed}")
    if opts.scheme not in SCHEMES:
        problems.append(f"scheme: one of {', '.join(SCHEMES)}, got {opts.scheme!r}" + did_you_mean(opts.scheme, SCHEMES))
    if opts.bits != "auto" and opts.bits not in BIT_WIDTHS:
        problems.append(f"bits: 'auto' or one of {BIT_WIDTHS_TEXT}, got {opts.bits!r}")
    if opts.gradient_bits != "auto" and opts.gradient_bits not in BIT_WIDTHS:
        problems.append(f"gradient_bits: 'auto' or one of {BIT_WIDTHS_TEXT}, got {opts.gradient_bits!r}")
    if opts.model_bits not in (16, 32):
        problems.append(f"model_bits: 16 or 32, got {opts.model_bits!r}")
    if opts.gradient_bits == "auto" and (opts.scheme != "sflam" or opts.bits != "auto"):
        problems.append("gradient_bits: 'auto' is the allocator's choice, which needs scheme sflam with bits 'auto'")
    if opts.scheme in ("sfl", "sl", "fl") and opts.bits not in ("auto", 32):
        problems.append(f"bits: scheme {opts.scheme!r} sends float32 (bits 32); drop --bits {opts.bits}")
    if opts.mode not in ("v1", "v2"):
        problems.append(f"mode: 'v1' or 'v2', got {opts.mode!r}")
    if opts.trainers > 1 and opts.scheme == "fl":
        problems.append("trainers: scheme 'fl' trains nothing on the server (devices train the whole model); "
                        "drop --trainers")
    if opts.lr_schedule not in LR_SCHEDULES:
        problems.append(f"lr_schedule: one of {', '.join(LR_SCHEDULES)}, got {opts.lr_schedule!r}"
                        + did_you_mean(opts.lr_schedule, LR_SCHEDULES))
    if opts.optimizer not in OPTIMIZERS:
        problems.append(f"optimizer: one of {', '.join(OPTIMIZERS)}, got {opts.optimizer!r}"
                        + did_you_mean(opts.optimizer, OPTIMIZERS))
    if opts.backend not in BACKENDS:
        problems.append(f"backend: one of {', '.join(BACKENDS)}, got {opts.backend!r}")
    if opts.global_pool not in (None, *GLOBAL_POOLS):
        problems.append(f"global_pool: one of {', '.join(GLOBAL_POOLS)}, got {opts.global_pool!r}")
    problems += _file_problems(opts)
    problems += _network_problems(opts)
    problems += _dashboard_problems(opts)
    return problems


def _dashboard_problems(opts: SimOptions) -> list[str]:
    """A dashboard address that is not [ADDR:]PORT, or off loopback without a token."""
    if opts.dashboard is None:
        return []
    from server_runtime.dashboard import DashboardError, check_exposure, parse_bind, resolve_token

    try:
        addr, _ = parse_bind(str(opts.dashboard), "dashboard")
        check_exposure(addr, resolve_token(None, None))  # $SFLAM_DASHBOARD_TOKEN (--dashboard-token sets it)
    except DashboardError as exc:
        return [str(exc)]
    return []


NETWORKS = ("bucket", "netem")


def _network_problems(opts: SimOptions) -> list[str]:
    """--network and the link options: what netem needs (root, ip, tc, iptables) and what it cannot do."""
    problems = []
    if opts.network not in NETWORKS:
        return [f"network: one of {', '.join(NETWORKS)}, got {opts.network!r}" + did_you_mean(opts.network, NETWORKS)]
    if not 1 <= opts.keepalive_s <= 3600:
        problems.append(f"keepalive_s: must be in 1..3600 seconds, got {opts.keepalive_s}")
    link = {"link_delay_ms": opts.link_delay_ms, "link_jitter_ms": opts.link_jitter_ms, "link_loss": opts.link_loss,
            "link_flap": opts.link_flap}
    if opts.network != "netem":
        return problems + [f"{name}: kernel links only: add --network netem" for name, v in link.items() if v is not None]
    from firmware_profiles import ProfileError, load_profile
    from sflam.netem import MAX_DEVICES, Flap, impairment_for, preflight

    kinds = set()
    for name in opts.profiles:
        try:
            kinds.add(load_profile(name).radio.kind)
        except (ProfileError, OSError):
            pass  # _file_problems names it
    for kind in sorted(kinds) or ["wifi"]:  # the overrides on each radio's defaults
        try:
            impairment_for(kind, opts.link_delay_ms, opts.link_jitter_ms, opts.link_loss)
        except ValueError as exc:
            problems.append(f"link ({kind} radios): {exc}")
            break
    if opts.link_flap is not None:
        try:
            flap = Flap.parse(opts.link_flap)
            if flap.device >= opts.devices or flap.round > opts.rounds:
                problems.append(f"link_flap: device {flap.device} of round {flap.round}: the run has "
                                f"{opts.devices} devices and {opts.rounds} rounds")
        except ValueError as exc:
            problems.append(str(exc))
    if not opts.emulate_link:
        problems.append("network netem: the kernel shapes each uplink; --no-emulate-link takes the radios away")
    if opts.scheme == "fl":
        problems.append("network netem: the split schemes (sflam, sfl, sl) only; fl devices do not re-rate their links")
    if host_count(opts) or opts.engine == "ray":
        problems.append("network netem: a namespace per device process; pass --hosts 0 (device hosts share one link)")
    if opts.broker not in LOCAL_BROKERS:
        problems.append("network netem: a private broker of the run (devices reach it over the run's bridge); "
                        "drop --broker URL")
    if opts.devices > MAX_DEVICES:
        problems.append(f"network netem: at most {MAX_DEVICES} devices")
    return problems + preflight()


# ---------------------------------------------------------------------------------------------
# what each scheme runs


@dataclass(frozen=True)
class SchemePlan:
    """How a scheme maps onto the daemon: its rounds, per-round devices, mode and bits."""

    scheme: str
    server_rounds: int  # plan rounds the daemon counts (sl: rounds x per_round turns)
    turns_per_round: int  # sl: devices one after another per reported round; else 1
    devices_per_round: int
    mode: str  # v1 | v2 | fl
    bits: int | str
    device_command: str  # "device" | "fl-device"


def scheme_plan(opts: SimOptions) -> SchemePlan:
    """The daemon settings that realise ``opts.scheme``."""
    if opts.scheme == "sflam":
        return SchemePlan("sflam", opts.rounds, 1, opts.per_round, opts.mode, opts.bits, "device")
    if opts.scheme == "sfl":
        return SchemePlan("sfl", opts.rounds, 1, opts.per_round, opts.mode, 32, "device")
    if opts.scheme == "sl":
        return SchemePlan("sl", opts.rounds * opts.per_round, opts.per_round, 1, "v2", 32, "device")
    return SchemePlan("fl", opts.rounds, 1, opts.per_round, "fl", 32, "fl-device")


def _fleet_problems(opts: SimOptions) -> list[str]:
    """Device hosts, and whether the data set can give every device a shard."""
    problems = []
    if opts.hosts is not None and opts.hosts < 0:
        problems.append(f"hosts: must be >= 0 (0: a process per device), got {opts.hosts}")
    if opts.engine not in ENGINES:
        problems.append(f"engine: one of {', '.join(ENGINES)}, got {opts.engine!r}" + did_you_mean(opts.engine, ENGINES))
    if opts.engine == "ray" and opts.hosts == 0:
        problems.append("hosts: --engine ray places device hosts; --hosts 0 (a process per device) is local only")
    if opts.ray_address is not None and opts.engine != "ray":
        problems.append("ray_address: only with --engine ray")
    if host_count(opts) and (opts.backend == "litert" or opts.scheme == "fl"):
        problems.append(f"hosts: device hosts run the onnx and numpy backends of split schemes; for "
                        f"--backend {opts.backend} --scheme {opts.scheme} pass --hosts 0 (a process per device)")
    if opts.resample is not None:
        lo, hi = opts.resample
        if lo < 1:
            problems.append(f"resample: LO must be >= 1, got {lo}")
        if lo > hi:
            problems.append(f"resample: needs LO <= HI, got [{lo}, {hi}]")
    elif (opts.devices >= 1 and 0 <= opts.validation_fraction < 0.5
          and (train_images := _cheap_train_size(opts.dataset, opts.validation_fraction)) is not None):
        problem = too_few_images(opts.devices, opts.dataset, train_images)
        if problem:
            problems.append(problem)
    return problems


def _file_problems(opts: SimOptions) -> list[str]:
    """Profiles, the model, the checkpoint, the data set's folder and the broker."""
    problems = []
    if not opts.profiles:
        problems.append("profiles: at least one hardware profile")
    else:
        from firmware_profiles import ProfileError, load_profile

        for name in opts.profiles:
            try:
                load_profile(name)
            except (ProfileError, OSError) as exc:
                problems.append(f"profiles: {name!r}: {exc}")
    try:
        from server_runtime.presets import get_preset

        get_preset(opts.model)
    except (KeyError, ValueError) as exc:
        problems.append(f"model: {exc}")
    if opts.checkpoint is not None and not Path(opts.checkpoint).expanduser().is_file():
        problems.append(f"checkpoint: no such file {opts.checkpoint} (weights are never downloaded: "
                        "put a timm-layout .safetensors, .pth or .npz there)")
    kind, sep, location = opts.dataset.partition(":")
    if sep and kind in ("cifar10", "folder") and not Path(location).expanduser().is_dir():
        problems.append(f"dataset: no directory {location} for {opts.dataset!r} (data sets are never downloaded)")
    if opts.broker not in LOCAL_BROKERS and not opts.broker.startswith(("mqtt://", "mqtts://")):
        problems.append(f"broker: embedded, mosquitto, amqtt or an mqtt:// / mqtts:// URL, got {opts.broker!r}")
    return problems


def host_count(opts: SimOptions) -> int:
    """Device host processes the run starts: ``hosts``, or by default a process per device up to
    HOSTS_AUTO devices (always with kernel links) and one host per core beyond (never more hosts
    than devices)."""
    if opts.hosts is not None:
        return min(opts.hosts, opts.devices)
    if (opts.devices <= HOSTS_AUTO or opts.network == "netem") and opts.engine != "ray":  # netem: a namespace each
        return 0
    return min(opts.devices, max(1, os.cpu_count() or 1))


# ---------------------------------------------------------------------------------------------
# the server's configuration


def server_config(opts: SimOptions, plan: SchemePlan, out: Path, broker_url: str,
                  gains: Mapping[str, float] | None = None) -> Any:
    """The daemon's RunConfig for this simulation (``[server]`` overrides applied last).

    ``gains``: the scenario's channel gain of each device, given to the allocator as known channel
    estimates (a base station measures them; without them its first allocation would be for a
    channel the emulated link does not have). Paths in it are absolute."""
    from server_runtime.config import RunConfig

    out = Path(out).resolve()
    sections: dict[str, dict[str, Any]] = {
        "model": {"preset": opts.model},
        "data": {"eval": opts.dataset, "eval_every": opts.eval_every * plan.turns_per_round,
                 "validation_fraction": opts.validation_fraction},
        "training": {"rounds": plan.server_rounds, "devices_per_round": plan.devices_per_round,
                     "min_devices": opts.devices, "local_epochs": opts.local_epochs,
                     "batch_size": opts.batch_size, "mode": plan.mode, "optimizer": opts.optimizer, "lr": opts.lr,
                     "lr_schedule": opts.lr_schedule},
        "quant": {"bits": plan.bits, "gradient_bits": opts.gradient_bits, "model_bits": opts.model_bits},
        "round": {"deadline_s": opts.deadline_s, "min_completed": opts.min_completed, "wait_for_devices_s": 300.0},
        "broker": {"url": broker_url, "run_id": RUN_ID},
        # a private loopback broker: unsigned and said so, or signed with the run's keys (--sign)
        "security": ({"signing": "ed25519", "signing_key": str(out / RUN_KEYS / "server.key"),
                      "device_keys": str(out / RUN_KEYS / "fleet.json")} if opts.sign else {"signing": "off"}),
        "checkpoint": {"dir": str(out / "server"), "keep": 1},
        "metrics": {"jsonl": str(out / "metrics.jsonl"), "progress": True},
        "compute": {"device": "auto", "amp": "auto", "workers": opts.server_workers, "trainers": opts.trainers},
        "allocator": {"t_max_s": opts.t_max_s},
    }
    if opts.dashboard is not None:
        from server_runtime.dashboard import parse_bind

        addr, port = parse_bind(str(opts.dashboard), "dashboard")
        sections["metrics"].update(dashboard_addr=addr, dashboard_port=port)
    if gains and opts.emulate_link:  # bucket or netem: the radios are emulated
        sections["allocator"]["channel_gains"] = dict(gains)
    if opts.checkpoint:
        sections["model"]["checkpoint"] = str(Path(opts.checkpoint).expanduser().resolve())
    if opts.global_pool:
        sections["model"]["global_pool"] = opts.global_pool
    for section, values in opts.server.items():
        sections.setdefault(section, {}).update(values)
    return RunConfig.from_dict({"seed": opts.seed, **sections}, source="the simulation's server settings")


def options_json(opts: SimOptions) -> dict[str, Any]:
    """The options as JSON-able values (options.json of a run)."""
    data = dataclasses.asdict(opts)
    data["profiles"] = list(opts.profiles)
    data["resample"] = list(opts.resample) if opts.resample is not None else None
    data["server"] = {k: dict(v) for k, v in opts.server.items()}
    return data
