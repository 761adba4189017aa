"""A light replay driver: N devices over MQTT in one process, with precomputed activations and no compute.

Each replayed device is an :class:`edge_runtime.device.DeviceClient` (its own MQTT session, client
id, retained online Status, last will, Hellos and heartbeats, Receiver, envelopes and step numbers:
what a real device does) whose round does no work: for every step of the plan it publishes the
same Activations (random tokens of the preset's (batch, num_patches, embed_dim), quantized once
per (bits_up, per_token, batch) and kept; labels in range), waits for the Gradient on its down
topic (through the device's own exchange; never applied), and at the end publishes a RoundUpdate that
returns the weights of the round's ModelWeights unchanged (float32) with telemetry from its own
thread's CPU time. Every device runs on a thread of its own, so the server sees as many steps
pending at once as there are devices, while the driver costs it little CPU.

:func:`run_replay` runs ``sflam server --config run.toml`` and this driver as two child processes
and returns the server's round records (``benchmarks/bench_server.py`` (c) and (d)). Alone::

    .venv/bin/python benchmarks/replay_driver.py --broker mqtt://127.0.0.1:1883 --run-id bench \\
        --devices 4 --preset vit_mini_patch4_32 --samples 256 --rounds 3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge_runtime import protocol as p
from edge_runtime.bundle import SharedBundle
from edge_runtime.device import DeviceClient, RoundStats
from edge_runtime.host import SharedDecoder
from edge_runtime.quantize import QuantizedTensor, quantize
from server_runtime.config import ConfigError, parse_config
from server_runtime.metrics import read_round_records
from server_runtime.presets import get_preset
from server_runtime.round_record import RoundRecord
from sflam.processes import ProcessError, ProcessGroup, child_env, sflam_command

log = logging.getLogger("replay_driver")
PROFILE = "raspberry-pi-5"  # the firmware profile the replayed devices announce (energy estimate)
BACKEND = "replay"  # the backend name they announce
HEARTBEAT_S = 2.0  # an idle device's Hello interval: a server that subscribes late hears of it soon
RESEND_AFTER_S = 60.0  # a step unanswered this long is sent again (a busy server is not a lost reply)
SERVER_READY_S = 180.0  # for ``sflam server`` to build its model and print its start line
SUMMARY = "replay-driver-summary"
GOAL_TRAINERS = 1.6  # bench_server.py (c): samples/s with 2 trainer ranks over 1


# -- one replayed device ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplayEngine:
    """The backend a replayed device announces; it computes nothing."""

    name: str = BACKEND


@dataclass(frozen=True)
class ReplayShard:
    """What DeviceClient reads of a device's data: how many samples it holds (no images)."""

    samples: int

    def __len__(self) -> int:
        return self.samples

    def samples_per_epoch(self, batch_size: int, *, drop_last: bool = False) -> int:
        """The samples of the whole batches an epoch replays."""
        return max(1, self.samples // batch_size) * batch_size


class Payloads:
    """One device's activations and labels: random tokens of the preset's shape, quantized once
    per (bits, per_token, batch) and reused for every step of every round."""

    def __init__(self, preset: str, seed: int) -> None:
        self.config = get_preset(preset)
        self.seed = seed
        self._tensors: dict[tuple[int, bool, int], QuantizedTensor] = {}
        self._labels: dict[int, p.Tensor] = {}

    def get(self, alloc: p.Allocation, batch: int) -> tuple[QuantizedTensor, p.Tensor]:
        """The quantized activations and the labels of a batch at ``alloc``'s bits."""
        key = (alloc.bits_up, alloc.per_token, batch)
        if key not in self._tensors:
            rng = np.random.default_rng((self.seed, *key))
            shape = (batch, self.config.num_patches, self.config.embed_dim)
            tokens = rng.standard_normal(shape, dtype=np.float32)
            per = "token" if alloc.per_token else "tensor"
            self._tensors[key] = quantize(tokens, alloc.bits_up, per=per, rng=rng)
        if batch not in self._labels:
            rng = np.random.default_rng((self.seed, batch))
            self._labels[batch] = p.Tensor.from_numpy(rng.integers(0, self.config.num_classes, batch, dtype=np.int64))
        return self._tensors[key], self._labels[batch]


@dataclass
class ReplayDevice(DeviceClient):
    """A DeviceClient whose round replays precomputed activations (module docstring)."""

    payloads: Payloads | None = None
    steps_done: int = 0
    gradient_bytes: int = 0
    errors: list[str] = field(default_factory=list)

    def train_round(self, plan: p.RoundPlan) -> p.RoundUpdate:
        """Replay one round: every step's Activations and Gradient, then the RoundUpdate."""
        round_, alloc = plan.envelope.round, self._allocation(plan)
        self.receiver.min_round = max(self.receiver.min_round, round_)
        weights = {name: np.asarray(value, np.float32) for name, value in self._wait_model(plan).items()}
        tensor, labels = self.payloads.get(alloc, plan.batch_size)
        steps = self.data.samples_per_epoch(plan.batch_size) // plan.batch_size * plan.local_epochs
        stats, cpu0 = RoundStats(), time.thread_time()
        sent0, recv0 = self.link.bytes_sent, self.link.bytes_received
        for step in range(steps):
            self._replay_step(plan, p.Activations(self._env(round_, step), tensor, labels), stats)
            self.applied.add((round_, step))
        stats.steps, stats.cpu_time_s = steps, time.thread_time() - cpu0
        stats.compute_time_s = stats.cpu_time_s  # encoding and decoding frames: all this device computes
        stats.bytes_sent, stats.bytes_received = self.link.bytes_sent - sent0, self.link.bytes_received - recv0
        compute_j, source = self._compute_energy(False, stats)
        samples = self.data.samples_per_epoch(plan.batch_size)

        def make_update(telemetry: p.Telemetry) -> p.RoundUpdate:
            return p.RoundUpdate(self._env(round_, steps), plan.model_version, samples,
                                 p.weights_from_numpy(weights), telemetry)

        update = self._publish_update(plan, make_update, stats, alloc, compute_j, source)
        self.gradients = {k: v for k, v in self.gradients.items() if k[0] > round_}
        return update

    def _replay_step(self, plan: p.RoundPlan, message: p.Activations, stats: RoundStats) -> None:
        """One step through the device's own exchange (publish, wait for the gradient, re-send after a
        reconnect or RESEND_AFTER_S); the gradient is only counted, never applied."""
        gradient = self._exchange(plan, message, stats)
        self.gradient_bytes += gradient.nbytes
        self.steps_done += 1


def make_device(url: str, run_id: str, index: int, samples: int, payloads: Payloads,
                decoder: SharedDecoder) -> ReplayDevice:
    """Replayed device ``dev-{index}``: its own session, no bundle (a stand-in announces the backend)."""
    shared = SharedBundle({"profile": PROFILE}, {}, ReplayEngine())
    return ReplayDevice(bundle=Path(BACKEND), broker_url=url, device_id=f"dev-{index}", data=ReplayShard(samples),
                        run_id=run_id, seed=index, meter="estimate", profile=PROFILE, heartbeat_s=HEARTBEAT_S,
                        resend_after_s=RESEND_AFTER_S, shared=shared, broadcast_decode=decoder, payloads=payloads)


# -- the driver process ----------------------------------------------------------------------------


def play(device: ReplayDevice, rounds: int) -> None:
    """A device thread: connect, serve ``rounds`` plans; an error is kept for the summary."""
    try:
        device.start()
        device.run(rounds)
    except Exception as exc:  # reported in the summary line and by the exit status
        log.exception("%s failed", device.device_id)
        device.errors.append(repr(exc))


def drive(url: str, run_id: str, devices: int, preset: str, samples: int, rounds: int) -> list[ReplayDevice]:
    """Play ``devices`` devices for ``rounds`` rounds each, concurrently; returns them, closed."""
    decoder = SharedDecoder()
    fleet = [make_device(url, run_id, i, samples, Payloads(preset, seed=i), decoder) for i in range(devices)]
    threads = [threading.Thread(target=play, args=(d, rounds), name=f"replay-{d.device_id}", daemon=True)
               for d in fleet]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            while thread.is_alive():
                thread.join(0.5)  # interruptible by SIGTERM / Ctrl-C
    finally:
        for device in fleet:
            device.close()
    return fleet


def summary(fleet: list[ReplayDevice]) -> dict:
    """What the driver did, per device: rounds, steps, gradient payload bytes, errors, counters."""
    return {d.device_id: {"rounds": d.counters["rounds"], "steps": d.steps_done, "gradient_bytes": d.gradient_bytes,
                          "errors": d.errors, "counters": dict(d.counters)} for d in fleet}


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--broker", required=True, help="mqtt://host:port")
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--devices", type=at_least(1), required=True, help="devices to play (dev-0 .. dev-N-1)")
    parser.add_argument("--preset", required=True, help="model preset: the activations' shape and class count")
    parser.add_argument("--samples", type=at_least(1), required=True,
                        help="samples per device (whole batches are replayed)")
    parser.add_argument("--rounds", type=at_least(1), required=True, help="rounds each device serves before it leaves")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        fleet = drive(args.broker, args.run_id, args.devices, args.preset, args.samples, args.rounds)
    except KeyboardInterrupt:
        return 130
    report = summary(fleet)
    print(f"{SUMMARY} {json.dumps({'cpu_s': time.process_time(), 'devices': report})}", flush=True)
    complete = all(d["rounds"] == args.rounds and not d["errors"] for d in report.values())
    return 0 if complete else 1


# -- a server process against the driver -----------------------------------------------------------


@dataclass(frozen=True)
class ReplayRun:
    """One ``sflam server`` run against the driver: its run.toml and what the driver plays."""

    config_text: str  # run.toml, validated by the caller
    metrics_path: Path  # where that config writes its round records
    run_id: str
    preset: str
    devices: int
    samples: int  # per device: a multiple of the config's batch size
    rounds: int
    timeout_s: float
    rank_threads: int | None = None  # torch threads per trainer rank (OMP_NUM_THREADS); None: torch's own


def driver_command(run: ReplayRun, broker_url: str) -> list[str]:
    """This file as a script, playing ``run``'s devices."""
    return [sys.executable, str(Path(__file__).resolve()), "--broker", broker_url, "--run-id", run.run_id,
            "--devices", str(run.devices), "--preset", run.preset, "--samples", str(run.samples),
            "--rounds", str(run.rounds)]


def descendants(pid: int) -> int:
    """How many processes descend from ``pid`` now (0 where /proc cannot tell)."""
    seen, todo = 0, [pid]
    while todo:
        current = todo.pop()
        for children in Path(f"/proc/{current}/task").glob("*/children"):
            try:
                found = [int(c) for c in children.read_text().split()]
            except (OSError, ValueError):
                continue
            seen += len(found)
            todo.extend(found)
    return seen


def wait_server(group: ProcessGroup, timeout_s: float) -> int:
    """Until the server exits (ProcessError when it fails, the driver fails or time runs out);
    returns the most processes seen under the server (its trainer ranks and their helpers)."""
    deadline, most = time.monotonic() + timeout_s, 0
    while group.procs["server"].poll() is None:
        if group.exited(["driver"]).get("driver", 0) != 0:
            raise ProcessError(f"the replay driver failed; its log ends:\n{group.tail('driver')}\n"
                               f"the server's log ends:\n{group.tail('server')}")
        if time.monotonic() > deadline:
            raise ProcessError(f"the server did not finish within {timeout_s:g} s; its log ends:\n"
                               f"{group.tail('server')}")
        most = max(most, descendants(group.procs["server"].pid))
        time.sleep(0.5)
    if group.procs["server"].returncode != 0:
        raise ProcessError(f"sflam server exited with status {group.procs['server'].returncode}; its log ends:\n"
                           f"{group.tail('server')}")
    return most


def run_replay(run: ReplayRun, broker_url: str, folder: Path) -> tuple[list[RoundRecord], int, float]:
    """Run ``sflam server`` and the driver to the end; (the server's round records, the most
    processes seen under the server, the driver's CPU seconds). ProcessError or RuntimeError, with
    log tails, on failure."""
    folder.mkdir(parents=True)
    config = folder / "run.toml"
    config.write_text(run.config_text, encoding="utf-8")
    with ProcessGroup(folder) as group:
        threads = None if run.rank_threads is None else child_env(threads=run.rank_threads)
        group.start("server", sflam_command("server", "--config", str(config)), env=threads)
        group.wait_for_log("server", "sflam server: run", SERVER_READY_S)
        group.start("driver", driver_command(run, broker_url), env=child_env(threads=1))
        children = wait_server(group, run.timeout_s)
        with contextlib.suppress(ProcessError):  # a driver still closing is stopped with the group
            group.wait_until(lambda: "driver" in group.exited(), 30.0, "the driver to finish", watch=())
        driver_log = group.output("driver")
    records = read_round_records(run.metrics_path)
    failed = {r.plan_round: dict(r.failed) for r in records if r.failed}
    lines = [line for line in driver_log.splitlines() if line.startswith(SUMMARY + " ")]
    if failed or len(records) < run.rounds or not lines:
        raise RuntimeError(f"replayed devices failed: {failed or 'rounds or summary missing'}\n{driver_log[-2000:]}")
    return records, children, json.loads(lines[-1].removeprefix(SUMMARY + " "))["cpu_s"]


# -- (c) and (d) of bench_server.py: two [compute] settings compared ----------------------------------


@dataclass(frozen=True)
class ReplaySettings:
    """What bench_server.py's (c) and (d) replay against ``sflam server``."""

    batch: int
    batches: int  # per device and round
    rounds: int  # the first is warm-up
    devices: int  # (c)
    batch_steps_devices: int  # (d)
    trainers: tuple[int, int]  # (c): compute.trainers of the baseline run, then of the compared one
    workers: int | None  # compute.workers; None: one per device
    rank_threads: int | None = None  # torch threads of each trainer rank; None: torch's default
    deadline_s: float = 600.0  # per round: no replayed device may fail for time on a loaded machine


def trainer_pair(text: str) -> tuple[int, int]:
    """argparse type: ``BASE,COMPARED``, two whole numbers >= 1."""
    values = text.split(",")
    if len(values) != 2 or not all(v.strip().isdigit() and int(v) >= 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected two trainer counts >= 1 as BASE,COMPARED, got {text!r}")
    return int(values[0]), int(values[1])


def at_least(low: int) -> Callable[[str], int]:
    """argparse type: a whole number >= ``low``."""
    def parse(text: str) -> int:
        if not text.strip().isdigit() or int(text) < low:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {low}, got {text!r}")
        return int(text)
    return parse


def add_replay_arguments(parser: argparse.ArgumentParser) -> None:
    """bench_server.py's options for (c) and (d)."""
    parser.add_argument("--replay-batch", type=at_least(1), default=64, help="batch size of (c) and (d)")
    parser.add_argument("--replay-batches", type=at_least(1), help="batches per device and round in (c) and (d) "
                        "(default 4; --quick 2)")
    parser.add_argument("--replay-rounds", type=at_least(2), help="rounds of (c) and (d), the first is warm-up "
                        "(default 3; --quick 2)")
    parser.add_argument("--replay-devices", type=at_least(1), default=4, help="replayed devices in (c)")
    parser.add_argument("--batch-steps-devices", type=at_least(1), default=8, help="replayed devices in (d)")
    parser.add_argument("--trainers-compare", type=trainer_pair, default=(1, 2), metavar="BASE,COMPARED",
                        help="compute.trainers of the two runs of (c) (default 1,2)")
    parser.add_argument("--rank-threads", type=at_least(1), help="torch threads of each trainer rank in (c) and "
                        "(d); with --workers 1, a rank per core (default: torch's, and the launcher's share)")


def replay_settings(args: argparse.Namespace) -> ReplaySettings:
    """The (c) and (d) settings of bench_server.py's options (:func:`add_replay_arguments`)."""
    return ReplaySettings(args.replay_batch, args.replay_batches or (2 if args.quick else 4),
                          args.replay_rounds or (2 if args.quick else 3), args.replay_devices,
                          args.batch_steps_devices, args.trainers_compare, args.workers, args.rank_threads)


def replay_header(r: ReplaySettings, parts: tuple[str, ...]) -> str:
    """The report's line on what (c) and (d), those in ``parts``, replayed."""
    fleets = {"c": f"(c) {r.devices}", "d": f"(d) {r.batch_steps_devices}"}
    return (f"{' and '.join(v for k, v in fleets.items() if k in parts)} replayed devices (one driver process) x "
            f"{r.batches} batches of {r.batch}, {r.rounds} rounds (1 warm-up); sflam server in a process of its own "
            f"with {f'{r.rank_threads} torch thread(s) per rank' if r.rank_threads else 'torch default threads'}, "
            f"compute.workers {r.workers or 'one per device'}")


def sfl_throughput(records: list[RoundRecord]) -> float:
    """Samples per second of the ``train`` phase over the rounds after the first (all counted)."""
    measured = records[1:]
    return sum(r.samples for r in measured) / sum(r.phases_s.train for r in measured)


def server_step_mean(records: list[RoundRecord]) -> float:
    """Mean server compute per step (``server_time_s / steps``) over rounds after the first."""
    rows = [d for r in records[1:] for d in r.devices.values()]
    return sum(d.server_time_s for d in rows) / sum(d.steps for d in rows)


def replay_figure(r: ReplaySettings, preset: str, make_config: Callable[..., str], broker_url: str, folder: Path,
                  devices: int, compute: dict) -> dict:
    """One replay run with ``compute`` added to ``[compute]``: train-phase samples/s, mean server
    step and the most processes seen under the server; or ``refused``: why the config is invalid.
    ``make_config(ckpt=, run_id=, devices=, rounds=, batch=, compute=, deadline_s=)`` is the run.toml."""
    text = make_config(ckpt=folder / "ckpt", run_id=folder.name, devices=devices, rounds=r.rounds, batch=r.batch,
                       compute={"workers": r.workers or devices, **compute}, deadline_s=r.deadline_s)
    try:
        config = parse_config(text, f"run.toml with [compute] {json.dumps(compute)}")
    except ConfigError as exc:
        return {"compute": compute, "refused": str(exc)}
    run = ReplayRun(text, config.metrics_path, folder.name, preset, devices, r.batches * r.batch, r.rounds,
                    r.rounds * (r.deadline_s + 60.0) + 120.0, r.rank_threads)
    records, children, driver_cpu_s = run_replay(run, broker_url, folder)
    return {"compute": compute, "sps": sfl_throughput(records), "children": children,
            "step_ms": server_step_mean(records) * 1e3, "driver_cpu_s": driver_cpu_s,
            "wall_s": sum(r.duration_s for r in records)}


def compare_replays(r: ReplaySettings, preset: str, make_config: Callable[..., str], broker_url: str, work: Path,
                    part: str, devices: int, variants: list[dict]) -> list[dict]:
    """:func:`replay_figure` for each ``[compute]`` variant in turn, the baseline first."""
    figures = []
    for index, compute in enumerate(variants):
        log.warning("(%s) sflam server with [compute] %s against %d replayed devices", part, json.dumps(compute),
                    devices)
        figures.append(replay_figure(r, preset, make_config, broker_url, work / f"{part}{index}", devices, compute))
    return figures


def measure_replays(r: ReplaySettings, parts: tuple[str, ...], preset: str, make_config: Callable[..., str],
                    broker_url: str, work: Path) -> dict[str, list[dict]]:
    """(c) trainers BASE then COMPARED with ``r.devices``; (d) batch_steps "off" then "on" with
    ``r.batch_steps_devices`` and one trainer; those of c and d that ``parts`` names."""
    variants = {"c": (r.devices, [{"trainers": n} for n in r.trainers]),
                "d": (r.batch_steps_devices, [{"trainers": 1, "batch_steps": v} for v in ("off", "on")])}
    return {part: compare_replays(r, preset, make_config, broker_url, work, part, devices, computes)
            for part, (devices, computes) in variants.items() if part in parts}


def replay_rows(figures: dict) -> list[tuple[str, ...] | str]:
    """The report of (c) and (d), those measured (see :func:`comparison_rows`)."""
    parts = [("c", "(c) trainer ranks", GOAL_TRAINERS), ("d", "(d) batched / sequential steps", None)]
    return [line for part, title, goal in parts if part in figures
            for line in comparison_rows(title, figures[part], goal)]


def comparison_rows(title: str, figures: list[dict], goal: float | None) -> list[tuple[str, ...] | str]:
    """The report of a comparison: (figure, value, goal, verdict) rows, and a line per refused config.
    The ratio is the second run's samples/s over the first's."""
    target = f">= {goal:g}" if goal is not None else ""
    if any("refused" in f for f in figures):
        rows: list[tuple[str, ...] | str] = [(title, "not measured", target, "refused")]
    else:
        ratio = figures[1]["sps"] / figures[0]["sps"]
        verdict = "" if goal is None else ("met" if ratio >= goal else "missed")
        rows = [(f"{title}, samples/s ratio", f"{ratio:.3f}", target, verdict)]
    for f in figures:
        keys = " ".join(f"{k}={json.dumps(v)}" for k, v in f["compute"].items())
        if "refused" in f:
            rows.append(f"    {keys}: config refused: {f['refused']}")
        else:
            rows.append((f"    {keys}: samples/s", f"{f['sps']:.1f}"))
            rows.append(("      mean step ms; processes under the server", f"{f['step_ms']:.1f}; {f['children']}"))
            rows.append(("      driver CPU s / server rounds wall s", f"{f['driver_cpu_s']:.1f} / {f['wall_s']:.1f}"))
    return rows


if __name__ == "__main__":
    sys.exit(main())
