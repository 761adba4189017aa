"""``sflam simulate``: a whole split federated run on one machine, over a real MQTT broker.

What it does, in order:

1. resolves the options (:mod:`sflam.options`: defaults < ``--config FILE`` < flags; every
   problem of a bad set listed at once);
2. loads the data set, splits its training part over the devices (Dirichlet ``alpha``) and writes
   each device's shard as ``shards/<id>.npz``;
3. draws the radio scenario (positions in a cell, path loss, Rayleigh fading, hardware profiles
   round-robin; :func:`allocator.scenario.generate_scenario`), so every device has a profile and
   a channel gain, written to ``scenario.json``;
4. exports one verified device bundle (ONNX) of the model;
5. starts a broker unless one is given (mosquitto on a free loopback port when installed, else
   the embedded amqtt broker), the server daemon (``sflam server`` with the run.toml written from
   :func:`sflam.options.server_config`) and one device process per device (``sflam device`` with
   ``--emulate-link``, so each uplink is paced at the rate of its allocation over its channel;
   ``sflam fl-device`` for the FL baseline), all under one :class:`sflam.processes.ProcessGroup`;
   with ``--network netem`` each device process runs in a network namespace of its own behind a
   kernel-shaped link instead (:mod:`sflam.netem`; the broker also listens on the run's bridge);
6. shows the rounds as they finish (:mod:`sflam.progress`);
7. stops every process and the broker on completion, on error and on Ctrl-C / SIGTERM, removes
   the kernel links, then writes ``summary.json``, the plots and a result table (:mod:`sflam.sim_report`).

Every path given to a child is absolute, and children start in the user's working directory, so
a run works from any directory and from an installed package.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from server_runtime.presets import LAYOUT_FIELDS
from server_runtime.round_record import RoundRecord
from sflam.options import (
    LOCAL_BROKERS,
    RUN_ID,
    RUN_KEYS,
    SchemePlan,
    SimOptions,
    SimulateError,
    host_count,
    options_json,
    resolve_options,
    scheme_plan,
    server_config,
)
from sflam.netem import Flap, NetemError, RunLinks
from sflam.processes import ProcessError, ProcessGroup, child_env, sflam_command
from sflam_common.limits import raise_open_file_limit
from sflam.progress import Progress, read_new_records

log = logging.getLogger(__name__)

SERVER_READY_TIMEOUT_S = 120.0
SERVER_READY_LINE = "waiting for devices"  # the daemon is connected and subscribed: no Hello is missed
POLL_S = 0.25
MAX_HELLOS_PER_S = 100.0  # heartbeats a device-host fleet sends the server


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


def prepare(opts: SimOptions, out: Path, broker_url: str) -> Prepared:
    """Shards, scenario, bundle and run.toml under ``out`` (absolute; new or empty)."""
    from allocator.scenario import dump_scenario, generate_scenario
    from server_runtime.data import load_dataset

    out.mkdir(parents=True, exist_ok=True)
    data = load_dataset(opts.dataset, seed=opts.seed, validation_fraction=opts.validation_fraction)  # as the server
    parts = split_training_set(opts, data.train.labels, data.name)
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
    if opts.sign:
        from sflam.fleet_keys import write_key_folder

        write_key_folder(out / RUN_KEYS, ids)
    plan = scheme_plan(opts)
    config = server_config(opts, plan, out, broker_url, {d.device_id: d.channel_gain for d in devices})
    config_path = out / "run.toml"
    config_path.write_text(config.to_toml())
    return Prepared(out, tuple(devices), bundle, config_path, plan, data.train.num_classes, data.name, len(data.test))


def split_training_set(opts: SimOptions, labels: np.ndarray, dataset_name: str) -> list[np.ndarray]:
    """Each device's training indices: a Dirichlet(``alpha``) partition, or with ``resample`` shards
    drawn with replacement (Dir(``alpha``) label mix, U{lo..hi} images) for a fleet larger than the data."""
    from server_runtime.data import PartitionError, dirichlet_resample, partition
    from sflam.options import too_few_images

    if opts.resample is not None:
        return dirichlet_resample(labels, opts.devices, opts.alpha, opts.resample, seed=opts.seed)
    problem = too_few_images(opts.devices, dataset_name, len(labels))
    if problem:
        raise SimulateError(problem)
    try:
        return partition(labels, opts.devices, "dirichlet", alpha=opts.alpha, seed=opts.seed)
    except PartitionError as exc:
        raise SimulateError(f"splitting {dataset_name} over {opts.devices} devices: {exc}; or pass --resample "
                            "LO-HI (e.g. --resample 20-40) to draw each device's shard with replacement") from None


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
    model = {"global_pool": opts.global_pool, **opts.server.get("model", {})}  # the server's layout, in the manifest
    return export_bundle(opts.model, opts.profiles[0], bundle, checkpoint=checkpoint, num_classes=num_classes,
                         layout={k: model.get(k) for k in LAYOUT_FIELDS}, batch=opts.batch_size, formats=formats)


# ---------------------------------------------------------------------------------------------
# processes


def device_command(prepared: Prepared, spec: DeviceSpec, opts: SimOptions, broker_url: str,
                   links: RunLinks | None = None) -> list[str]:
    """``sflam device`` (or ``fl-device``) for one simulated device; with ``links``, in its namespace."""
    cmd = sflam_command(prepared.plan.device_command, "--bundle", str(prepared.bundle), "--broker", broker_url,
                        "--device-id", spec.device_id, "--data", f"npz:{spec.shard}", "--run-id", RUN_ID,
                        "--seed", str(spec.seed), "--meter", "estimate", "--profile", spec.profile)
    if prepared.plan.device_command == "device":
        cmd += ["--backend", opts.backend, "--threads", str(opts.device_threads), "--keepalive-s", str(opts.keepalive_s)]
    if opts.sign:
        keys = prepared.out / RUN_KEYS
        cmd += ["--signing-key", str(keys / "devices" / f"{spec.device_id}.key"), "--server-key", str(keys / "server.pub")]
    if links is not None:
        return links.device_command(prepared.devices.index(spec), cmd, spec.channel_gain)
    if opts.emulate_link:
        cmd += ["--emulate-link", "--channel-gain", repr(spec.channel_gain)]
    return cmd


def start_run(group: ProcessGroup, prepared: Prepared, opts: SimOptions, broker_url: str,
              links: RunLinks | None = None) -> Workers:
    """The server, once it waits for devices, then the devices: a process each (with ``links``: each
    in its network namespace, reaching the broker at ``broker_url`` on the run's bridge), device-host
    processes, or device-host Ray actors; returns what runs the devices."""
    group.start("server", sflam_command("server", "--config", str(prepared.config_path)))
    try:
        group.wait_for_log("server", SERVER_READY_LINE, SERVER_READY_TIMEOUT_S)
    except ProcessError as exc:
        raise SimulateError(f"the server was not ready: {exc}") from None
    hosts = host_count(opts)
    if opts.engine == "ray":
        from sflam.ray_engine import RayHosts, connect

        specs = _host_specs(prepared, opts, broker_url, hosts)
        return RayHosts(connect(opts.ray_address), specs, namespace=f"sflam-{prepared.out.name}")
    if hosts:
        for k, spec in enumerate(_host_specs(prepared, opts, broker_url, hosts)):
            group.start(f"host-{k}", _host_command(spec, opts), env=child_env(threads=opts.device_threads))
    else:
        for spec in prepared.devices:
            group.start(spec.device_id, device_command(prepared, spec, opts, broker_url, links),
                        env=child_env(threads=opts.device_threads))
    return Workers(group)


class Workers:
    """The local processes that run the devices, as ``_monitor`` watches them."""

    def __init__(self, group: ProcessGroup) -> None:
        self.group = group
        self.names = [name for name in group.procs if name not in ("server", RunLinks.DELAYLINE)]

    def exited(self, names: list[str] | None = None) -> dict[str, int]:
        return self.group.exited(names or self.names)

    def tail(self, name: str, lines: int = 8) -> str:
        return self.group.tail(name, lines)

    def stop(self) -> list[dict[str, Any]]:
        return []  # the group stops them with the server


def heartbeat_s(devices: int) -> float:
    """An idle device's Hello interval: 10 s, stretched so that the fleet sends the server at most
    MAX_HELLOS_PER_S (10,000 devices: one Hello each every 100 s)."""
    return max(10.0, devices / MAX_HELLOS_PER_S)


def _host_specs(prepared: Prepared, opts: SimOptions, broker_url: str, hosts: int) -> list[dict[str, Any]]:
    """What each of ``hosts`` device hosts runs, the devices dealt round-robin (also written to
    hosts/host-K.json); each may train as many devices at once as a round selects, and spreads its
    connects over a second per 500 devices."""
    folder = prepared.out / "hosts"
    folder.mkdir(exist_ok=True)
    specs = []
    for k in range(hosts):
        mine = prepared.devices[k::hosts]
        devices = [{"device_id": d.device_id, "data": f"npz:{d.shard}", "seed": d.seed, "profile": d.profile,
                    "channel_gain": d.channel_gain if opts.emulate_link else None} for d in mine]
        path = folder / f"host-{k}.json"
        path.write_text(json.dumps({"devices": devices}, indent=0))
        options = {"run_id": RUN_ID, "backend": opts.backend,
                   "concurrency": max(1, min(len(mine), prepared.plan.devices_per_round)),
                   "stagger_s": max(0.5, len(mine) / 500), "threads": opts.device_threads, "meter": "estimate",
                   "emulate_link": opts.emulate_link, "heartbeat_s": heartbeat_s(opts.devices),
                   "keys": str(prepared.out / RUN_KEYS) if opts.sign else None}
        specs.append({"bundle": str(prepared.bundle), "broker": broker_url, "devices": devices, "file": str(path),
                      "options": options})
    return specs


def _host_command(spec: dict[str, Any], opts: SimOptions) -> list[str]:
    o = spec["options"]
    cmd = sflam_command("device-host", "--bundle", spec["bundle"], "--broker", spec["broker"], "--devices", spec["file"],
                        "--run-id", o["run_id"], "--backend", o["backend"], "--concurrency", str(o["concurrency"]),
                        "--stagger-s", f"{o['stagger_s']:g}", "--threads", str(o["threads"]),
                        "--heartbeat-s", f"{o['heartbeat_s']:g}")
    return cmd + (["--emulate-link"] if o["emulate_link"] else []) + (["--keys", o["keys"]] if o["keys"] else [])


# ---------------------------------------------------------------------------------------------
# the run


class Interrupted(Exception):
    """Ctrl-C or SIGTERM during the run."""


class RunInterrupted(SimulateError):
    """The run was stopped by Ctrl-C or SIGTERM; partial results are in the output directory."""


def _raise_interrupted(signum: int, _frame: object) -> None:
    raise Interrupted(signal.Signals(signum).name)


def default_out(opts: SimOptions) -> Path:
    """runs/sim-<scheme>-<UTC time> under the working directory."""
    return Path("runs") / f"sim-{opts.scheme}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"


def run_simulation(opts: SimOptions, out: Path, *, quiet: bool = False) -> dict[str, Any]:
    """Run the whole simulation; returns the summary (also written to ``out/summary.json``)."""
    out = Path(out).expanduser().resolve()
    if out.exists() and any(out.iterdir()):
        raise SimulateError(f"--out {out}: exists and is not empty; choose a new directory")
    if opts.engine == "ray":
        from sflam.ray_engine import preflight

        preflight(opts.ray_address)  # Ray installed and the cluster answering, before anything starts
    out.mkdir(parents=True, exist_ok=True)
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    (out / "options.json").write_text(json.dumps(options_json(opts), indent=1) + "\n")
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    raise_open_file_limit()  # the broker and the device hosts hold a socket per device
    broker = workers = None
    ray_hosts: list[dict[str, Any]] = []
    group = ProcessGroup(out / "logs")
    memory = MemoryWatch(group)
    links = run_links(opts)
    started = time.monotonic()
    status = "failed"
    try:
        if links is not None:
            links.open()  # the bridge first: the broker listens on it
        broker, broker_url = _start_broker(opts, out, links)
        memory.broker = broker
        device_url = broker.url_on(links.broker_host) if links is not None else broker_url
        say(f"broker: {device_url} ({type(broker).__name__ if broker else 'external'})")
        prepared = _prepare_and_say(opts, out, broker_url, say)
        if links is not None:
            links.add_devices(prepared.devices, out / "scenario.json", prepared.plan.devices_per_round, group,
                              out / "logs")
            say(f"network netem: {opts.devices} devices in namespaces sflam-{links.topology.tag}-*, "
                f"broker at {links.broker_host} on bridge {links.topology.bridge}")
        workers = start_run(group, prepared, opts, device_url, links)
        if opts.dashboard is not None:
            from server_runtime.dashboard import page_url, parse_bind

            say(f"fleet page: {page_url(*parse_bind(str(opts.dashboard)))}")
        _monitor(prepared, group, workers, opts, quiet, memory, links)
        status = "completed"
    except (KeyboardInterrupt, Interrupted) as exc:
        status = "interrupted"
        say(f"\n{exc or 'interrupted'}: stopping the server, the devices and the broker")
    except NetemError as exc:
        raise SimulateError(str(exc)) from None
    finally:
        try:
            if workers is not None:
                ray_hosts = workers.stop()
            # the delay line last: a device's goodbye on a delayed link waits in its queues
            group.stop([name for name in group.procs if name != RunLinks.DELAYLINE])
            group.stop()
            if broker is not None:
                broker.stop()
        finally:
            if links is not None and links.close():
                say(f"network netem: could not remove {', '.join(links.left)}")
            signal.signal(signal.SIGTERM, previous)
    return _report(opts, out, status, time.monotonic() - started, say, _fleet(opts, group, memory, links, ray_hosts))


def _fleet(opts: SimOptions, group: ProcessGroup, memory: MemoryWatch, links: RunLinks | None,
           ray_hosts: list[dict[str, Any]]) -> dict[str, Any]:
    """summary.json's figures of the processes and links that ran the devices."""
    fleet = {"hosts": host_count(opts), "devices_connected": _devices_announced(group),
             "peak_rss_mib": round(memory.peak_bytes / 2**20, 1), "engine": opts.engine,
             "network": opts.network if opts.emulate_link else "loopback",
             "signing": "ed25519" if opts.sign else "off"}
    if links is not None:
        fleet["links"] = links.summary(group.output(RunLinks.DELAYLINE) if RunLinks.DELAYLINE in group.procs else "")
        fleet["links"]["walls"] = _device_walls(group, [link.device_id for link in links.topology.links])
    if ray_hosts:
        fleet["ray_hosts"] = ray_hosts
    return fleet


def run_links(opts: SimOptions) -> RunLinks | None:
    """The run's kernel links (``--network netem``), not yet made; None with the token bucket."""
    if opts.network != "netem":
        return None
    return RunLinks(delay_ms=opts.link_delay_ms, jitter_ms=opts.link_jitter_ms, loss=opts.link_loss,
                    flap=Flap.parse(opts.link_flap) if opts.link_flap else None, seed=opts.seed)


class MemoryWatch:
    """The peak of the resident memory of every process of the run, summed: this one, the broker,
    the server and the device (or device-host) processes."""

    def __init__(self, group: ProcessGroup) -> None:
        self.group, self.broker, self.peak_bytes = group, None, 0

    def sample(self) -> None:
        pids = [os.getpid(), *(proc.pid for proc in self.group.procs.values() if proc.poll() is None)]
        proc = getattr(self.broker, "proc", None)
        if proc is not None:
            pids.append(proc.pid)
        self.peak_bytes = max(self.peak_bytes, sum(_rss_bytes(pid) for pid in pids))


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _summary_line(group: ProcessGroup, name: str, prefix: str) -> dict[str, Any] | None:
    """The JSON of the last ``<prefix> {...}`` line a child printed (its exit summary), or None."""
    if name not in group.procs:
        return None
    lines = [line for line in group.output(name).splitlines() if line.startswith(prefix + " ")]
    try:
        summary = json.loads(lines[-1].split(" ", 1)[1])
    except (IndexError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def _devices_announced(group: ProcessGroup) -> int | None:
    """Devices the server heard a Hello from (its summary line), None when it printed none."""
    try:
        return int(_summary_line(group, "server", "sflam-server-summary")["devices_announced"])
    except (KeyError, TypeError, ValueError):
        return None


def _device_walls(group: ProcessGroup, names: list[str]) -> dict[str, dict[str, float]]:
    """Each device's ``uplink_wall_s`` (plan round -> seconds) from its exit summary line."""
    walls = {}
    for name in names:
        try:
            walls[name] = {str(k): float(v) for k, v in
                           _summary_line(group, name, "sflam-device-summary")["uplink_wall_s"].items()}
        except (KeyError, TypeError, ValueError, AttributeError):
            continue
    return walls


def _prepare_and_say(opts: SimOptions, out: Path, broker_url: str, say) -> Prepared:
    t0 = time.monotonic()
    prepared = prepare(opts, out, broker_url)
    sizes = [d.samples for d in prepared.devices]
    how = f"drawn with replacement, {min(sizes)}-{max(sizes)} each" if opts.resample else \
        f"{min(sizes)}-{max(sizes)} each"
    say(f"{prepared.dataset_name}: {sum(sizes)} training images over {opts.devices} devices "
        f"(Dirichlet alpha={opts.alpha}, {how}), {prepared.test_size} test; "
        f"bundle exported in {time.monotonic() - t0:.1f} s")
    say(f"scheme {opts.scheme}: {opts.rounds} rounds of {opts.per_round} devices"
        + (" one at a time" if prepared.plan.turns_per_round > 1 else "")
        + f", bits {prepared.plan.bits}, model {opts.model}, {opts.local_epochs} local epochs, batch {opts.batch_size}")
    return prepared


def _report(opts: SimOptions, out: Path, status: str, wall_s: float, say, fleet: dict[str, Any]) -> dict[str, Any]:
    """summary.json (and, for a completed run, the plots and the table)."""
    from sflam import sim_report

    records = sim_report.read_records(out / "metrics.jsonl")
    if "links" in fleet:
        fleet["links"]["uplink"] = sim_report.uplink_check(out, records, fleet["links"].pop("walls"))
    summary = {**sim_report.summarize(opts, records, out, wall_s=wall_s, status=status), **fleet}
    sim_report.write_summary(summary, out)
    if status == "interrupted":
        raise RunInterrupted(f"interrupted after {summary['rounds']} rounds; partial results in {out}")
    sim_report.plot_run(summary, records, out)
    say("")
    say(sim_report.render_table(summary))
    say(f"\nresults in {out}: summary.json, metrics.jsonl, plots/*.png, logs/")
    return summary


def _start_broker(opts: SimOptions, out: Path, links: RunLinks | None = None) -> tuple[Any, str]:
    """(broker object or None, its loopback URL): a private loopback broker unless a URL was given;
    with ``links`` it listens on the run's bridge too."""
    if opts.broker not in LOCAL_BROKERS:
        return None, opts.broker
    from sflam.broker import start_local_broker

    also_on = (links.broker_host,) if links is not None else ()
    b = start_local_broker(out / "broker", LOCAL_BROKERS[opts.broker], also_on=also_on)
    return b, b.url


def _monitor(prepared: Prepared, group: ProcessGroup, workers: Workers, opts: SimOptions, quiet: bool,
             memory: MemoryWatch, links: RunLinks | None = None) -> list[RoundRecord]:
    """Follow metrics.jsonl until the server exits (driving the links' flap); SimulateError when it
    fails or the delay line dies."""
    progress = Progress(opts.rounds, prepared.plan.turns_per_round, stream=open(os.devnull, "w") if quiet else None)
    metrics = prepared.out / "metrics.jsonl"
    records: list[RoundRecord] = []
    offset = 0
    devices = workers.names  # device processes, device-host processes or actors
    reported_dead: set[str] = set()
    while True:
        memory.sample()
        new, offset = read_new_records(metrics, offset)
        records += new
        progress.update(records)
        if links is not None:
            _watch_links(links, group, records)
        code = group.exited(["server"]).get("server")
        if code is not None:
            new, offset = read_new_records(metrics, offset)
            progress.update(records + new)
            progress.close()
            if code != 0:
                raise SimulateError(f"the server exited with status {code}; its log ends:\n" + group.tail("server"))
            return records + new
        for name, status in workers.exited(devices).items():
            if name not in reported_dead:
                reported_dead.add(name)
                log.warning("%s exited early (status %s); its log ends:\n%s", name, status, workers.tail(name, 8))
        if len(reported_dead) == len(devices):
            raise SimulateError("every device process exited; the last one's log ends:\n"
                                + workers.tail(sorted(reported_dead)[-1]))
        time.sleep(POLL_S)


def _watch_links(links: RunLinks, group: ProcessGroup, records: list[RoundRecord]) -> None:
    links.poll(sum(1 for r in records if r.counted), time.monotonic())
    if RunLinks.DELAYLINE in group.procs and group.exited([RunLinks.DELAYLINE]):
        raise SimulateError("the delay line exited (every delayed link is dead); its log ends:\n"
                            + group.tail(RunLinks.DELAYLINE))


def cmd_simulate(args: argparse.Namespace) -> int:
    """Handler of ``sflam simulate``."""
    if getattr(args, "dashboard_token", None):  # the server process reads it from its environment, not argv
        from server_runtime.dashboard import TOKEN_ENV

        os.environ[TOKEN_ENV] = args.dashboard_token
    opts = resolve_options(args)
    out = Path(opts.out) if opts.out else default_out(opts)
    try:
        run_simulation(opts, out)
    except RunInterrupted as exc:
        print(f"sflam simulate: {exc}", file=sys.stderr)
        return 130
    return 0
