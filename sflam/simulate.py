"""``sflam simulate``: a whole split federated run on one machine, over a real MQTT broker.

What it does, in order:

1. resolves the options (defaults < ``--config FILE`` < command-line flags) and lists every
   problem of a bad set at once (:class:`SimulateError`);
2. loads the data set, splits its training part over the devices (Dirichlet ``alpha``) and writes
   each device's shard as ``shards/<id>.npz``;
3. draws the radio scenario (positions in a cell, path loss, Rayleigh fading, hardware profiles
   round-robin; :func:`allocator.scenario.generate_scenario`), so every device has a profile and
   a channel gain, written to ``scenario.json``;
4. exports one verified device bundle (ONNX) of the model;
5. starts a broker unless one is given (mosquitto on a free loopback port when installed, else
   the embedded amqtt broker), the server daemon (``sflam server``) and one device process per
   device (``sflam device`` with ``--emulate-link``, so each uplink is paced at the rate of its
   allocation over its channel; ``sflam fl-device`` for the FL baseline);
6. shows the rounds as they finish (a progress bar on a terminal, a line per round otherwise);
7. stops every process and the broker on completion, on error and on Ctrl-C / SIGTERM, then writes
   ``summary.json``, the plots and a result table (:mod:`sflam.sim_report`).

Schemes: ``sflam`` (quantized activations, ``--bits auto`` lets the allocator choose bits, power
and bandwidth per device and round), ``sfl`` (float32 activations, fixed allocation), ``sl``
(one device at a time training one model: each round is ``per_round`` turns of one device on the
shared SFL-V2 server model) and ``fl`` (FedAvg of the whole model trained on the devices).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

SCHEMES = ("sflam", "sfl", "sl", "fl")
LOCAL_BROKERS = {"embedded": "auto", "mosquitto": "mosquitto", "amqtt": "amqtt"}
RUN_ID = "sim"
DEVICE_STOP_TIMEOUT_S = 15.0
SERVER_STOP_TIMEOUT_S = 30.0
POLL_S = 0.25
LOG_TAIL_LINES = 25
ROOT = Path(__file__).resolve().parents[1]


class SimulateError(ValueError):
    """A bad option set (every problem listed) or a run that could not complete."""

    def __init__(self, problems: Sequence[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            super().__init__(self.problems[0])
        else:
            super().__init__(f"{len(self.problems)} problems:\n  - " + "\n  - ".join(self.problems))


@dataclass(frozen=True)
class SimOptions:
    """Everything a simulation run needs; the defaults are the quickstart (``make demo``)."""

    devices: int = 10
    per_round: int = 5
    rounds: int = 60
    alpha: float = 0.5
    bits: int | str = "auto"
    scheme: str = "sflam"
    dataset: str = "digits"
    model: str = "vit_quick_patch4_16"
    checkpoint: str | None = None  # timm-layout weights to start from (local file)
    broker: str = "embedded"  # a URL, or a private broker on a free loopback port: embedded (mosquitto
    # when installed, else amqtt), mosquitto or amqtt
    out: str | None = None  # default runs/sim-<scheme>-<time>
    seed: int = 0
    local_epochs: int = 5
    batch_size: int = 32
    lr: float = 0.05
    optimizer: str = "sgd"
    mode: str = "v1"  # SFL-V1 (server copy per device) or V2 (one shared server model)
    gradient_bits: int = 32
    profiles: tuple[str, ...] = ("raspberry-pi-5", "jetson-orin-nano", "android-flagship", "android-midrange")
    radius_m: float = 500.0
    emulate_link: bool = True
    backend: str = "onnx"
    device_threads: int = 1
    server_workers: int = 2
    deadline_s: float = 300.0
    t_max_s: float = 5.0  # the allocator's latency cap per round (bits = auto)
    min_completed: float = 0.5
    eval_every: int = 1
    server: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # run.toml overrides by section

    @property
    def bits_label(self) -> str:
        """What the activations were: ``auto``, ``8``, ``32``."""
        return str(self.bits)


FIELDS = {f.name: f for f in dataclasses.fields(SimOptions)}
CLI_NAMES = ("config", "devices", "per_round", "rounds", "alpha", "bits", "scheme", "dataset", "model", "broker",
             "out", "seed", "local_epochs", "batch_size", "lr", "checkpoint", "mode", "profiles", "radius_m",
             "backend", "emulate_link", "t_max_s")


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
                        + _hint(name, ("simulate", "server")))
    values = dict(data.get("simulate", {}))
    if "server" in data:
        values["server"] = data["server"]
    return values


def _hint(name: str, known: Sequence[str]) -> str:
    match = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def build_options(values: Mapping[str, Any]) -> SimOptions:
    """SimOptions from plain values (a TOML table or flags); SimulateError lists every problem."""
    problems: list[str] = []
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in FIELDS:
            problems.append(f"unknown option {key!r}" + _hint(key, tuple(FIELDS)))
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
    ints = ("devices", "per_round", "rounds", "seed", "local_epochs", "batch_size", "gradient_bits",
            "device_threads", "server_workers", "eval_every")
    floats = ("alpha", "lr", "radius_m", "deadline_s", "min_completed", "t_max_s")
    for name in ints:
        if name in kwargs:
            value = kwargs[name]
            if isinstance(value, bool) or not isinstance(value, int):
                problems.append(f"{name}: expected an integer, got {value!r}")
    for name in floats:
        if name in kwargs:
            value = kwargs[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                problems.append(f"{name}: expected a number, got {value!r}")
            else:
                kwargs[name] = float(value)
    if "bits" in kwargs:
        bits = kwargs["bits"]
        if isinstance(bits, str) and bits.strip().lower() == "auto":
            kwargs["bits"] = "auto"
        else:
            try:
                kwargs["bits"] = int(bits)
            except (TypeError, ValueError):
                problems.append(f"bits: expected 'auto' or 1..8, 16, 32, got {bits!r}")
    if "profiles" in kwargs:
        value = kwargs["profiles"]
        names = value.split(",") if isinstance(value, str) else value
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
            problems.append(f"profiles: expected a comma list of profile names, got {value!r}")
        else:
            kwargs["profiles"] = tuple(n.strip() for n in names if n.strip())
    for name in ("emulate_link",):
        if name in kwargs and not isinstance(kwargs[name], bool):
            problems.append(f"{name}: expected true or false, got {kwargs[name]!r}")
    if "server" in kwargs and not (isinstance(kwargs["server"], Mapping)
                                   and all(isinstance(v, Mapping) for v in kwargs["server"].values())):
        problems.append("server: expected tables of run.toml keys by section, e.g. [server.round]")


def check_options(opts: SimOptions) -> list[str]:
    """Every problem of a set of options (empty when it can run)."""
    problems = []
    for name in ("devices", "per_round", "rounds", "local_epochs", "batch_size", "device_threads",
                 "server_workers", "eval_every"):
        if getattr(opts, name) < 1:
            problems.append(f"{name}: must be >= 1, got {getattr(opts, name)}")
    if opts.per_round > opts.devices:
        problems.append(f"per_round {opts.per_round} exceeds devices {opts.devices}")
    for name in ("alpha", "lr", "radius_m", "deadline_s", "t_max_s"):
        value = getattr(opts, name)
        if not (value > 0 and math.isfinite(value)):
            problems.append(f"{name}: must be a positive number, got {value}")
    if not 0 < opts.min_completed <= 1:
        problems.append(f"min_completed: must be in (0, 1], got {opts.min_completed}")
    if opts.scheme not in SCHEMES:
        problems.append(f"scheme: one of {', '.join(SCHEMES)}, got {opts.scheme!r}" + _hint(opts.scheme, SCHEMES))
    valid_bits = (*range(1, 9), 16, 32)
    if opts.bits != "auto" and opts.bits not in valid_bits:
        problems.append(f"bits: 'auto' or one of 1..8, 16, 32, got {opts.bits!r}")
    if opts.gradient_bits not in valid_bits:
        problems.append(f"gradient_bits: one of 1..8, 16, 32, got {opts.gradient_bits}")
    if opts.scheme in ("sfl", "sl", "fl") and opts.bits not in ("auto", 32):
        problems.append(f"bits: scheme {opts.scheme!r} sends float32 (bits 32); drop --bits {opts.bits}")
    if opts.mode not in ("v1", "v2"):
        problems.append(f"mode: 'v1' or 'v2', got {opts.mode!r}")
    if opts.optimizer not in ("sgd", "adam", "adamw"):
        problems.append(f"optimizer: 'sgd', 'adam' or 'adamw', got {opts.optimizer!r}")
    if opts.backend not in ("onnx", "numpy", "litert", "auto"):
        problems.append(f"backend: onnx, numpy, litert or auto, got {opts.backend!r}")
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


# ---------------------------------------------------------------------------------------------
# preparing the run directory


@dataclass(frozen=True)
class DeviceSpec:
    """One simulated device: its id, shard, profile, channel and seed."""

    device_id: str
    shard: Path
    samples: int
    profile: str
    channel_gain: float
    distance_m: float
    seed: int


@dataclass(frozen=True)
class Prepared:
    """A run directory ready to start: shards, scenario, bundle, the server's run.toml."""

    out: Path
    devices: tuple[DeviceSpec, ...]
    bundle: Path
    config_path: Path
    plan: SchemePlan
    num_classes: int
    dataset_name: str
    test_size: int


def default_out(opts: SimOptions) -> Path:
    """runs/sim-<scheme>-<UTC time>."""
    return Path("runs") / f"sim-{opts.scheme}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"


def prepare(opts: SimOptions, out: Path, broker_url: str) -> Prepared:
    """Shards, scenario, bundle and run.toml under ``out`` (which must be new or empty)."""
    from allocator.scenario import dump_scenario, generate_scenario
    from server_runtime.data import load_dataset, partition

    out.mkdir(parents=True, exist_ok=True)
    data = load_dataset(opts.dataset, seed=opts.seed)
    parts = partition(data.train.labels, opts.devices, "dirichlet", alpha=opts.alpha, seed=opts.seed)
    shard_dir = out / "shards"
    shard_dir.mkdir(exist_ok=True)
    width = len(str(opts.devices - 1))
    ids = [f"dev-{k:0{width}d}" for k in range(opts.devices)]
    scenario = generate_scenario(opts.devices, opts.seed, profiles=opts.profiles, radius_m=opts.radius_m,
                                 model=opts.model, local_epochs=opts.local_epochs)
    samples = np.array([len(p) for p in parts], dtype=np.float64)
    fleet = dataclasses.replace(scenario.fleet, ids=tuple(ids), samples=samples * opts.local_epochs)
    scenario = dataclasses.replace(scenario, fleet=fleet)
    dump_scenario(scenario, out / "scenario.json")
    distances = _distances_m(scenario.fleet.gain)
    devices = []
    for k, (device_id, index) in enumerate(zip(ids, parts)):
        shard = shard_dir / f"{device_id}.npz"
        np.savez(shard, images=data.train.images[index], labels=data.train.labels[index])
        devices.append(DeviceSpec(device_id, shard, len(index), scenario.fleet.profiles[k],
                                  float(scenario.fleet.gain[k]), float(distances[k]), opts.seed * 1000 + k))
    bundle = _export(opts, out, data.train.num_classes)
    plan = scheme_plan(opts)
    config_path = out / "run.toml"
    gains = {d.device_id: d.channel_gain for d in devices}
    config_path.write_text(server_config_text(opts, plan, out, broker_url, gains))
    return Prepared(out, tuple(devices), bundle, config_path, plan, data.train.num_classes, data.name, len(data.test))


def _distances_m(gain: np.ndarray) -> np.ndarray:
    """The path-loss distance that gives each gain without fading (for the record only)."""
    loss_db = -10.0 * np.log10(gain)
    return 1000.0 * 10.0 ** ((loss_db - 128.1) / 37.6)


def _export(opts: SimOptions, out: Path, num_classes: int) -> Path:
    """One verified ONNX bundle of the model's device part (every device runs it)."""
    from export.bundle import export_bundle

    bundle = out / "bundle"
    if bundle.exists():
        shutil.rmtree(bundle)
    checkpoint = Path(opts.checkpoint).expanduser() if opts.checkpoint else None
    formats = ("onnx",) if opts.backend in ("onnx", "numpy", "auto") else ("onnx", "tflite")
    return export_bundle(opts.model, opts.profiles[0], bundle, checkpoint=checkpoint, num_classes=num_classes,
                         batch=opts.batch_size, formats=formats)


def server_config_text(opts: SimOptions, plan: SchemePlan, out: Path, broker_url: str,
                       gains: Mapping[str, float] | None = None) -> str:
    """The daemon's run.toml for this simulation (``[server]`` overrides applied last).

    ``gains``: the scenario's channel gain of each device, given to the allocator as known channel
    estimates (a base station measures them; without them its first allocation would be for a
    channel the emulated link does not have)."""
    sections: dict[str, dict[str, Any]] = {
        "model": {"preset": opts.model},
        "data": {"eval": opts.dataset, "eval_every": opts.eval_every * plan.turns_per_round},
        "training": {"rounds": plan.server_rounds, "devices_per_round": plan.devices_per_round,
                     "min_devices": opts.devices, "local_epochs": opts.local_epochs,
                     "batch_size": opts.batch_size, "mode": plan.mode, "optimizer": opts.optimizer, "lr": opts.lr},
        "quant": {"bits": plan.bits, "gradient_bits": opts.gradient_bits},
        "round": {"deadline_s": opts.deadline_s, "min_completed": opts.min_completed, "wait_for_devices_s": 300.0},
        "broker": {"url": broker_url, "run_id": RUN_ID},
        "checkpoint": {"dir": str((out / "server").resolve()), "keep": 1},
        "metrics": {"jsonl": str((out / "metrics.jsonl").resolve()), "progress": True},
        "compute": {"device": "auto", "amp": "auto", "workers": opts.server_workers},
        "allocator": {"t_max_s": opts.t_max_s},
    }
    if gains and opts.emulate_link:
        sections["allocator"]["channel_gains"] = dict(gains)
    if opts.checkpoint:
        sections["model"]["checkpoint"] = str(Path(opts.checkpoint).expanduser().resolve())
    for section, values in opts.server.items():
        sections.setdefault(section, {}).update(values)
    from server_runtime.config import config_toml

    return config_toml(sections, opts.seed)


# ---------------------------------------------------------------------------------------------
# processes


def _env() -> dict[str, str]:
    """Children see this checkout first and use one thread per numeric library unless told."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def device_command(prepared: Prepared, spec: DeviceSpec, opts: SimOptions, broker_url: str) -> list[str]:
    """``sflam device`` (or ``fl-device``) for one simulated device."""
    cmd = [sys.executable, "-m", "sflam", prepared.plan.device_command, "--bundle", str(prepared.bundle),
           "--broker", broker_url, "--device-id", spec.device_id, "--data", f"npz:{spec.shard}",
           "--run-id", RUN_ID, "--seed", str(spec.seed), "--meter", "estimate", "--profile", spec.profile]
    if prepared.plan.device_command == "device":
        cmd += ["--backend", opts.backend, "--threads", str(opts.device_threads)]
    if opts.emulate_link:
        cmd += ["--emulate-link", "--channel-gain", repr(spec.channel_gain)]
    return cmd


class Fleet:
    """The child processes of one simulation; everything here is stopped by PID."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.logs.mkdir(parents=True, exist_ok=True)
        self.server: subprocess.Popen | None = None
        self.devices: dict[str, subprocess.Popen] = {}
        self._files: list[Any] = []

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
        handle = open(self.logs / f"{name}.log", "wb")
        self._files.append(handle)
        # a session of its own: a Ctrl-C reaches us, and we stop the children in order
        # SIGINT is how children are stopped: a shell that started us in the background (`cmd &`)
        # left it ignored, and an ignored signal is inherited, so restore its default first
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=handle,
                                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_default_sigint)

    def start_server(self, config: Path) -> None:
        env = _env()
        self.server = self._spawn("server", [sys.executable, "-m", "sflam", "server", "--config", str(config)], env)

    def wait_server_ready(self, timeout_s: float = 120.0) -> None:
        """Until the server waits for devices (connected and subscribed), so no Hello is missed."""
        deadline = time.monotonic() + timeout_s
        path = self.logs / "server.log"
        while time.monotonic() < deadline:
            if self.server is not None and self.server.poll() is not None:
                raise SimulateError(f"the server exited with status {self.server.returncode} before it was ready; "
                                    f"its log ends:\n{log_tail(path)}")
            try:
                if b"waiting for devices" in path.read_bytes():
                    return
            except FileNotFoundError:
                pass
            time.sleep(POLL_S)
        raise SimulateError(f"the server was not ready within {timeout_s:g} s; its log ends:\n{log_tail(path)}")

    def start_device(self, name: str, cmd: list[str], threads: int) -> None:
        env = _env()
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(threads)
        self.devices[name] = self._spawn(name, cmd, env)

    def dead_devices(self) -> list[str]:
        return [name for name, proc in self.devices.items() if proc.poll() is not None]

    def stop(self) -> None:
        """SIGINT the server and the devices, wait, SIGKILL what lingers; close the logs."""
        procs = ([self.server] if self.server is not None else []) + list(self.devices.values())
        _interrupt(procs)
        deadline = time.monotonic() + max(DEVICE_STOP_TIMEOUT_S, SERVER_STOP_TIMEOUT_S)
        for proc in procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("pid %d ignored SIGINT; killing it", proc.pid)
                proc.kill()
                proc.wait(10)
        for handle in self._files:
            handle.close()
        self._files.clear()

    def stop_devices(self) -> None:
        """SIGINT the devices (they announce themselves offline) and wait for them."""
        procs = list(self.devices.values())
        _interrupt(procs)
        deadline = time.monotonic() + DEVICE_STOP_TIMEOUT_S
        for proc in procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt(procs: Sequence[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            try:
                os.kill(proc.pid, signal.SIGINT)
            except ProcessLookupError:
                pass


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last lines of a child's log, for error messages."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        return f"(no log: {exc})"
    return "\n".join(text.strip().splitlines()[-lines:]) or "(empty)"


# ---------------------------------------------------------------------------------------------
# progress


class Progress:
    """A bar rewritten in place on a terminal; one line per round otherwise."""

    def __init__(self, total: int, turns: int, stream: Any = None) -> None:
        self.total, self.turns = total, turns
        self.stream = stream or sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = time.monotonic()
        self.shown = 0

    def update(self, records: Sequence[Mapping[str, Any]]) -> None:
        counted = [r for r in records if r.get("counted")]
        done = len(counted) // self.turns
        if done == self.shown:
            return
        self.shown = done
        accuracy = next((r["accuracy"] for r in reversed(counted) if r.get("accuracy") is not None), None)
        elapsed = time.monotonic() - self.start
        eta = elapsed / done * (self.total - done) if done else float("nan")
        width = 30
        filled = int(width * done / self.total)
        acc = f"acc {accuracy:6.2%}" if accuracy is not None else "acc   -   "
        text = (f"round {done:>3}/{self.total} [{'#' * filled}{'.' * (width - filled)}] {acc}  "
                f"{elapsed:6.1f} s  eta {eta:5.0f} s")
        if self.tty:
            self.stream.write("\r" + text)
            if done >= self.total:
                self.stream.write("\n")
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty and 0 < self.shown < self.total:
            self.stream.write("\n")
            self.stream.flush()


def read_new_records(path: Path, offset: int) -> tuple[list[dict], int]:
    """Complete JSON lines appended to ``path`` since ``offset``; (records, new offset)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            data = handle.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n")
    if end < 0:
        return [], offset
    records = []
    for line in data[:end].splitlines():
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and record.get("event", "round") == "round":
                records.append(record)
    return records, offset + end + 1


# ---------------------------------------------------------------------------------------------
# the run


class Interrupted(Exception):
    """Ctrl-C or SIGTERM during the run."""


class RunInterrupted(SimulateError):
    """The run was stopped by Ctrl-C or SIGTERM; partial results are in the output directory."""


def _raise_interrupted(signum: int, _frame: object) -> None:
    raise Interrupted(signal.Signals(signum).name)


def run_simulation(opts: SimOptions, out: Path, *, quiet: bool = False) -> dict[str, Any]:
    """Run the whole simulation; returns the summary (also written to ``out/summary.json``)."""
    from sflam import sim_report

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise SimulateError(f"--out {out}: exists and is not empty; choose a new directory")
    out.mkdir(parents=True, exist_ok=True)
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    (out / "options.json").write_text(json.dumps(_jsonable(opts), indent=1) + "\n")
    previous = {sig: signal.signal(sig, _raise_interrupted) for sig in (signal.SIGTERM,)}
    broker = None
    fleet = Fleet(out / "logs")
    started = time.monotonic()
    status = "error"
    try:
        broker, broker_url = _start_broker(opts, out)
        say(f"broker: {broker_url} ({type(broker).__name__ if broker else 'external'})")
        t0 = time.monotonic()
        prepared = prepare(opts, out, broker_url)
        sizes = [d.samples for d in prepared.devices]
        say(f"{prepared.dataset_name}: {sum(sizes)} training images over {opts.devices} devices "
            f"(Dirichlet alpha={opts.alpha}, {min(sizes)}-{max(sizes)} each), {prepared.test_size} test; "
            f"bundle exported in {time.monotonic() - t0:.1f} s")
        say(f"scheme {opts.scheme}: {opts.rounds} rounds of {opts.per_round} devices"
            + (f" one at a time" if prepared.plan.turns_per_round > 1 else "")
            + f", bits {prepared.plan.bits}, model {opts.model}, {opts.local_epochs} local epochs, batch {opts.batch_size}")
        fleet.start_server(prepared.config_path)
        fleet.wait_server_ready()
        for spec in prepared.devices:
            fleet.start_device(spec.device_id, device_command(prepared, spec, opts, broker_url), opts.device_threads)
        records = _monitor(prepared, fleet, opts, quiet)
        status = "completed"
    except KeyboardInterrupt:
        status = "interrupted"
        say("\ninterrupted: stopping the server, the devices and the broker")
    except Interrupted as exc:
        status = "interrupted"
        say(f"\n{exc}: stopping the server, the devices and the broker")
    except BaseException:
        status = "failed"
        raise
    finally:
        fleet.stop()
        if broker is not None:
            broker.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    wall_s = time.monotonic() - started
    records = sim_report.read_records(out / "metrics.jsonl")
    if status != "completed":
        summary = sim_report.summarize(opts, records, out, wall_s=wall_s, status=status)
        sim_report.write_summary(summary, out)
        if status == "interrupted":
            raise RunInterrupted(f"interrupted after {summary['rounds']} rounds; partial results in {out}")
    summary = sim_report.summarize(opts, records, out, wall_s=wall_s, status=status)
    sim_report.write_summary(summary, out)
    sim_report.plot_run(summary, records, out)
    say("")
    say(sim_report.render_table(summary))
    say(f"\nresults in {out}: summary.json, metrics.jsonl, plots/*.png, logs/")
    return summary


def _jsonable(opts: SimOptions) -> dict[str, Any]:
    data = dataclasses.asdict(opts)
    data["profiles"] = list(opts.profiles)
    data["server"] = {k: dict(v) for k, v in opts.server.items()}
    return data


def _start_broker(opts: SimOptions, out: Path) -> tuple[Any, str]:
    """(broker object or None, its URL): a private loopback broker unless a URL was given."""
    if opts.broker not in LOCAL_BROKERS:
        return None, opts.broker
    from sflam.broker import start_local_broker

    b = start_local_broker(out / "broker", LOCAL_BROKERS[opts.broker])
    return b, b.url


def _monitor(prepared: Prepared, fleet: Fleet, opts: SimOptions, quiet: bool) -> list[dict]:
    """Follow metrics.jsonl until the server exits; SimulateError when it fails."""
    progress = Progress(opts.rounds, prepared.plan.turns_per_round, stream=open(os.devnull, "w") if quiet else None)
    metrics = prepared.out / "metrics.jsonl"
    records: list[dict] = []
    offset = 0
    reported_dead: set[str] = set()
    server = fleet.server
    assert server is not None
    while True:
        new, offset = read_new_records(metrics, offset)
        records += new
        progress.update(records)
        code = server.poll()
        if code is not None:
            new, offset = read_new_records(metrics, offset)
            records += new
            progress.update(records)
            progress.close()
            if code != 0:
                raise SimulateError(f"the server exited with status {code}; its log ends:\n"
                                    + log_tail(fleet.logs / "server.log"))
            return records
        for name in fleet.dead_devices():
            if name not in reported_dead:
                reported_dead.add(name)
                log.warning("device %s exited early (status %s); its log ends:\n%s", name,
                            fleet.devices[name].returncode, log_tail(fleet.logs / f"{name}.log", 8))
        if len(reported_dead) == len(fleet.devices):
            raise SimulateError("every device process exited; the last one's log ends:\n"
                                + log_tail(fleet.logs / f"{sorted(reported_dead)[-1]}.log"))
        time.sleep(POLL_S)


def cmd_simulate(args: argparse.Namespace) -> int:
    """Handler of ``sflam simulate``."""
    opts = resolve_options(args)
    out = Path(opts.out) if opts.out else default_out(opts)
    try:
        run_simulation(opts, out)
    except RunInterrupted as exc:
        print(f"sflam simulate: {exc}", file=sys.stderr)
        return 130
    return 0
