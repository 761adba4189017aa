"""The server daemon over a real mosquitto: against device processes (a, b) and a replay driver (c, d).

(a) SFL training throughput: samples/s of the daemon's ``train`` phase (rounds 2..R; round 1 is
    warm-up) with N device processes (``sflam device --backend numpy``), q = 8 activations, fp32
    gradients, SFL-V1, as a ratio to centralized training of the unsplit model in one process
    (forward, cross-entropy, backward, SGD step) on the same samples, batch size and optimizer.
    Goal >= 0.85.
(b) Step round trip: the median time a device spends in ``DeviceClient._exchange`` (encode and
    publish its Activations, wait for the Gradient, decode it), with one device alone, as a ratio
    to a raw broker echo of the same payload sizes through ``edge_runtime.mqtt.MqttLink``
    (QoS 1, TCP_NODELAY, the same broker). Goal <= 2.

(c) and (d): ``sflam server`` as a process against the light replay driver (replay_driver.py: one
process plays the devices, no compute), batch 64: samples/s of the ``train`` phase (rounds 2..R)
under two ``[compute]`` settings. (c) ``trainers`` 2 / 1 (``--trainers-compare``), 4 devices, goal
>= 1.6; (d) ``batch_steps`` "on" / "off", 8 devices, one trainer, reported without a goal.

    .venv/bin/python benchmarks/bench_server.py [--preset vit_mini_patch4_32] [--devices 3] [--only a,b,c,d] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import multiprocessing
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edge_runtime import protocol as p
from edge_runtime.data import Preprocess, preprocess
from edge_runtime.mqtt import DEFAULT_MAX_FRAME_BYTES, LinkConfig, MqttLink
from edge_runtime.quantize import quantize
from server_runtime.checkpoint import create_model
from server_runtime.config import RunConfig, parse_config
from server_runtime.data import load_dataset, write_digits_shards
from server_runtime.presets import get_preset
from server_runtime.round_record import RoundRecord
from sflam.broker import MosquittoBroker
from sflam.processes import ProcessError, ProcessGroup, child_env

from replay_driver import (  # benchmarks/, the folder of this script
    ReplaySettings, add_replay_arguments, at_least, measure_replays, replay_header, replay_rows, replay_settings,
    server_step_mean, sfl_throughput)

GOAL_THROUGHPUT, GOAL_RTT = 0.85, 2.0
BITS_UP, BITS_DOWN, LR, MOMENTUM, SEED = 8, 32, 0.05, 0.9, 0
ROUND_TIMEOUT_S = 120.0
PARTS = ("a", "b", "c", "d")

# A device process whose DeviceClient._exchange is timed; the times go to a JSON file at exit.
TIMED_DEVICE = r"""
import json, sys, time
from edge_runtime.device import DeviceClient
from sflam.cli import main
out, times = sys.argv[1], []
exchange = DeviceClient._exchange
def timed(self, plan, message, stats):
    t0 = time.perf_counter()
    grad = exchange(self, plan, message, stats)
    times.append((message.envelope.round, message.envelope.step, time.perf_counter() - t0))
    return grad
DeviceClient._exchange = timed
try:
    code = main(sys.argv[2:])
finally:
    with open(out, "w") as f:
        json.dump(times, f)
sys.exit(code)
"""


@dataclass(frozen=True)
class Settings:
    """What one benchmark run does."""

    preset: str
    devices: int
    rounds: int
    batch: int
    per_device: int  # samples per device shard, a multiple of batch
    rtt_rounds: int
    rtt_per_device: int
    echo_iterations: int
    workers: int  # the daemon's compute.workers (server step threads)
    server_threads: int  # torch intra-op threads while the daemon runs
    parts: tuple[str, ...]  # which of a, b, c, d run
    replay: ReplaySettings


@dataclass
class DaemonWithDevices:
    """A daemon thread and its device processes, torn down by :meth:`close` whatever happened.

    ``done`` is set when the daemon thread ends: waiting on an Event survives a Ctrl-C, whereas
    an interrupted ``Thread.join`` can leave the thread looking finished (CPython < 3.13).
    """

    daemon: object
    thread: threading.Thread
    done: threading.Event
    devices: ProcessGroup
    timing_files: list[Path]

    def close(self) -> None:
        """Stop the daemon after its round, stop the device processes, wait for the daemon."""
        self.daemon.stop()
        self.devices.stop(timeout_s=15.0)
        if self.thread.ident is not None and not self.done.wait(60.0):
            logging.getLogger("bench_server").warning("the daemon thread did not end within 60 s")


# -- setup ---------------------------------------------------------------------------------------


def settings_from(args: argparse.Namespace) -> Settings:
    """The run's sizes: every device gets as many whole batches of digits as there are (--quick: 4)."""
    train = len(load_dataset("digits", seed=SEED).train)
    full = train // args.devices // args.batch * args.batch
    if full < args.batch:
        raise SystemExit(f"digits has {train} training images: too few for {args.devices} devices "
                         f"of batch {args.batch}")
    workers, threads = args.workers or args.devices, args.server_threads or torch.get_num_threads()
    replay = replay_settings(args)
    if args.quick:
        return Settings(args.preset, args.devices, args.rounds or 2, args.batch, min(full, 4 * args.batch),
                        2, min(full, 4 * args.batch), 50, workers, threads, args.only, replay)
    return Settings(args.preset, args.devices, args.rounds or 4, args.batch, full, 2,
                    min(train // args.batch * args.batch, 10 * args.batch), 200, workers, threads, args.only, replay)


def config_text(preset: str, batch: int, broker_url: str, ckpt: Path, run_id: str, devices: int, rounds: int,
                compute: dict, deadline_s: float = ROUND_TIMEOUT_S) -> str:
    """The daemon's run.toml: SFL-V1, q = 8 up, fp32 down, SGD, one local epoch; ``compute`` adds
    to (or replaces) the keys of ``[compute]``."""
    sections = {
        "model": {"preset": preset},
        "data": {"eval": "digits", "eval_batch_size": 512, "eval_every": 1000},  # evaluate the last round only
        "training": {"rounds": rounds, "devices_per_round": devices, "local_epochs": 1, "batch_size": batch,
                     "mode": "v1", "optimizer": "sgd", "lr": LR, "momentum": MOMENTUM},
        "quant": {"bits": BITS_UP, "gradient_bits": BITS_DOWN},
        "round": {"deadline_s": deadline_s, "min_completed": 1.0, "wait_for_devices_s": 60.0},
        "broker": {"url": broker_url, "run_id": run_id},
        "checkpoint": {"dir": str(ckpt)},
        "metrics": {"progress": False},
        "compute": {"device": "cpu", "amp": "off", **compute},
    }
    lines = [f"seed = {SEED}"]
    for name, values in sections.items():
        lines += [f"[{name}]"] + [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def run_config(s: Settings, broker_url: str, ckpt: Path, run_id: str, devices: int, rounds: int):
    """The daemon's RunConfig for (a) and (b) (see :func:`config_text`)."""
    return parse_config(config_text(s.preset, s.batch, broker_url, ckpt, run_id, devices, rounds,
                                    {"workers": s.workers}))


def start_device(group: ProcessGroup, bundle: Path, url: str, run_id: str, device_id: str, shard: Path,
                 rounds: int, seed: int, extra: tuple[str, ...] = ()) -> Path:
    """A ``sflam device`` process (``extra`` appended to its arguments) with its exchanges timed;
    returns the file the times go to."""
    times = group.logs / f"{run_id}-{device_id}-exchange.json"
    cmd = [sys.executable, "-c", TIMED_DEVICE, str(times), "device", "--bundle", str(bundle), "--broker", url,
           "--device-id", device_id, "--data", f"npz:{shard}", "--backend", "numpy", "--run-id", run_id,
           "--seed", str(seed), "--meter", "estimate", "--rounds", str(rounds), *extra]
    # one BLAS thread: an idle device's OpenBLAS worker otherwise spins while it waits for its
    # gradient, taking a core the co-located server needs (a real device has its own CPU)
    group.start(device_id, cmd, env=child_env(extra={"OPENBLAS_NUM_THREADS": "1"}))
    return times


# -- (a) and (b): the daemon with devices ----------------------------------------------------------


def run_fleet(s: Settings, broker_url: str, bundle: Path, work: Path, run_id: str, devices: int,
              per_device: int, rounds: int, *, change: Callable[[RunConfig], RunConfig] | None = None,
              device_extra: Callable[[str], tuple[str, ...]] | None = None) -> tuple[list[RoundRecord], list[list]]:
    """One daemon run with ``devices`` device processes; (round records, per-device exchange times).
    ``change`` edits the daemon's config, ``device_extra(device_id)`` adds device arguments."""
    from server_runtime.daemon import ServerDaemon

    folder = work / run_id
    folder.mkdir()
    cfg = run_config(s, broker_url, folder / "ckpt", run_id, devices, rounds)
    cfg = change(cfg) if change is not None else cfg
    records: list[RoundRecord] = []
    errors: list[BaseException] = []
    daemon = ServerDaemon(cfg, on_round=records.append)

    done = threading.Event()

    def serve() -> None:
        try:
            daemon.run()
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
        finally:
            done.set()

    fleet = DaemonWithDevices(daemon, threading.Thread(target=serve, name="bench-daemon", daemon=True), done,
                              ProcessGroup(folder), [])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(s.server_threads)
        fleet.thread.start()
        for i, shard in enumerate(write_digits_shards(folder, devices, per_device, SEED, stem="shard")):
            extra = device_extra(f"dev-{i}") if device_extra is not None else ()
            fleet.timing_files.append(start_device(fleet.devices, bundle, broker_url, run_id, f"dev-{i}", shard,
                                                   cfg.training.rounds, seed=i, extra=extra))
        wait_for(fleet, cfg.training.rounds * ROUND_TIMEOUT_S + 60.0)
    except RuntimeError as exc:
        raise RuntimeError(f"{exc}\n{log_tails(folder)}") from None
    finally:
        fleet.close()
        torch.set_num_threads(threads)
    failed = {r.plan_round: dict(r.failed) for r in records if r.failed}
    if errors or failed:
        what = f"the daemon failed: {errors[0]!r}" if errors else f"devices failed: {failed}"
        raise RuntimeError(f"{what}\n{log_tails(folder)}") from (errors[0] if errors else None)
    return records, [json.loads(path.read_text()) for path in fleet.timing_files]


def log_tails(folder: Path, lines: int = 8) -> str:
    """The last lines of every device log in ``folder`` (the folder is removed at exit)."""
    parts = []
    for path in sorted(folder.glob("*.log")):
        tail = path.read_text(errors="replace").splitlines()[-lines:]
        parts.append(f"--- {path.name}\n" + "\n".join(tail))
    return "\n".join(parts)


def wait_for(fleet: DaemonWithDevices, timeout_s: float) -> None:
    """Until the daemon thread ends; RuntimeError after ``timeout_s`` or when a device process fails."""
    deadline = time.monotonic() + timeout_s
    while not fleet.done.wait(0.5):
        crashed = [name for name, code in fleet.devices.exited().items() if code != 0]
        if crashed:
            raise RuntimeError(f"device process(es) {', '.join(crashed)} exited with an error")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the daemon did not finish within {timeout_s:g} s")
    with contextlib.suppress(ProcessError):  # close() stops what is still running
        fleet.devices.wait_until(lambda: len(fleet.devices.exited()) == len(fleet.devices.procs), 15.0,
                                 "the devices to finish their last round", watch=())


def exchange_median(times: list[list]) -> tuple[float, int]:
    """(median seconds, steps) of the timed exchanges (round, step, seconds) after the first round."""
    first = min(t[0] for t in times)
    kept = [t[2] for t in times if t[0] != first]
    return statistics.median(kept), len(kept)


# -- (a) baseline: centralized training ------------------------------------------------------------


class Centralized:
    """Plain torch training of the unsplit model on every shard's samples (the same init, batch, optimizer)."""

    def __init__(self, s: Settings) -> None:
        train = load_dataset("digits", seed=SEED).train
        order = np.random.default_rng(SEED).permutation(len(train))[:s.devices * s.per_device]
        self.model = create_model(s.preset, num_classes=10, seed=SEED).train()
        config = self.model.config
        spec = Preprocess(config.img_size, tuple(config.mean), tuple(config.std))
        self.images, self.labels = preprocess(train.images[order], spec), train.labels[order]
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=LR, momentum=MOMENTUM)
        self.batch, self.rng = s.batch, np.random.default_rng(SEED)
        self.samples, self.seconds = 0, 0.0
        self.epoch()  # warm-up, as round 1 is for split training

    def epoch(self) -> int:
        """One shuffled pass: forward, cross-entropy, backward, SGD step per batch."""
        permutation = self.rng.permutation(len(self.labels))
        for start in range(0, len(self.labels), self.batch):
            index = permutation[start:start + self.batch]
            x, y = torch.from_numpy(self.images[index]), torch.from_numpy(self.labels[index])
            loss = torch.nn.functional.cross_entropy(self.model(x), y)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
        return len(self.labels)

    def timed(self, epochs: int) -> None:
        """Train ``epochs`` passes and add them to the measured totals."""
        t0 = time.perf_counter()
        self.samples += sum(self.epoch() for _ in range(epochs))
        self.seconds += time.perf_counter() - t0



def centralized_run(s: Settings, epochs: int) -> tuple[int, float]:
    """(samples, seconds) of ``epochs`` timed epochs after a warm-up one (run in a fresh process)."""
    central = Centralized(s)
    central.timed(epochs)
    return central.samples, central.seconds


def centralized_in_child(s: Settings, epochs: int) -> tuple[int, float]:
    """:func:`centralized_run` in a spawned interpreter: a plain torch process, untouched by the
    daemon's threads (once several threads have run torch ops, OpenMP steps slow down process-wide)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(centralized_run, (s, epochs))


# -- (b) baseline: a raw broker echo ---------------------------------------------------------------


def frame_sizes(s: Settings, run_id: str, device_id: str) -> tuple[int, int, list[int], list[int]]:
    """Encoded sizes of one step's Activations and Gradient, whole and as chunked on the wire."""
    config = get_preset(s.preset)
    rng = np.random.default_rng(SEED)
    shape = (s.batch, config.num_patches, config.embed_dim)
    env = p.Envelope(run_id, 1, device_id, 0)
    up = p.Activations(env, quantize(rng.standard_normal(shape, dtype=np.float32), BITS_UP, rng=rng),
                       p.Tensor.from_numpy(rng.integers(0, 10, s.batch, dtype=np.int64)))
    down = p.Gradient(env, quantize(rng.standard_normal(shape, dtype=np.float32), BITS_DOWN), 2.3)
    chunks = [[len(f) for f in p.split(m, DEFAULT_MAX_FRAME_BYTES)] for m in (up, down)]
    return len(p.encode(up)), len(p.encode(down)), chunks[0], chunks[1]


def echo_rtt(url: str, up_sizes: list[int], down_sizes: list[int], iterations: int, tag: str) -> float:
    """Median seconds from publishing ``up_sizes`` payloads (QoS 1, each PUBACKed, as a device
    sends) to receiving the ``down_sizes`` payloads an echo client publishes back once all arrived."""
    up, down, ping = (f"bench/{tag}/{name}" for name in ("up", "down", "ping"))
    client = MqttLink(url, LinkConfig(client_id=f"bench-{tag}-client"))
    echo = MqttLink(url, LinkConfig(client_id=f"bench-{tag}-echo"))
    client.subscribe([down])
    echo.subscribe([up, ping])  # a ping answered proves the earlier ``up`` subscription is active
    stop, replies = threading.Event(), [os.urandom(n) for n in down_sizes]

    def serve() -> None:
        received = 0
        while not stop.is_set():
            incoming = echo.get(0.1)
            if incoming is not None and incoming.topic == ping:
                echo.publish(down, b"pong")
            elif incoming is not None:
                received += 1
                for payload in replies if received % len(up_sizes) == 0 else ():
                    echo.publish(down, payload)

    thread = threading.Thread(target=serve, name=f"bench-echo-{tag}", daemon=True)
    times, requests = [], [os.urandom(n) for n in up_sizes]
    try:
        echo.start()
        client.start()
        thread.start()
        handshake(client, ping)
        for _ in range(iterations):
            t0 = time.perf_counter()
            for payload in requests:
                client.publish(up, payload)
            if any(client.get(10.0) is None for _ in down_sizes):
                raise RuntimeError("the echo did not answer within 10 s")
            times.append(time.perf_counter() - t0)
    finally:
        stop.set()
        thread.join(5)
        client.close()
        echo.close()
    return statistics.median(times[iterations // 10:])  # the first tenth is warm-up


def handshake(client: MqttLink, ping: str) -> None:
    """Ping until the echo answers (subscriptions are not acknowledged to us), then drain."""
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        client.publish(ping, b"ping")
        if client.get(1.0) is not None:
            while client.get(0.3) is not None:
                pass
            return
    raise RuntimeError(f"no echo on {ping} within 10 s")


# -- report ----------------------------------------------------------------------------------------


def row(figure: str, value: str, goal: str = "", verdict: str = "") -> str:
    return f"{figure:<52} {value:>14}  {goal:>7}  {verdict}"


def print_report(s: Settings, r: dict) -> None:
    parts = s.parts
    print()
    print(f"sflam server benchmark: {s.preset}, digits, SFL-V1, q={BITS_UP} up, fp{BITS_DOWN} down, "
          f"SGD lr {LR} momentum {MOMENTUM}")
    if "a" in parts:
        print(f"(a) {s.devices} device processes x {s.per_device} samples, batch {s.batch}, {s.rounds} rounds "
              f"(1 warm-up); daemon: {s.workers} step worker(s), torch {s.server_threads} thread(s); centralized: "
              f"torch {torch.get_num_threads()} thread(s)")
    if "b" in parts:
        print(f"(b) 1 device x {s.rtt_per_device} samples, batch {s.batch}, {s.rtt_rounds} rounds; echo: "
              f"{s.echo_iterations} round trips")
    if "c" in parts or "d" in parts:
        print(replay_header(s.replay, parts))
    print()
    print(row("figure", "value", "goal", "met?"))
    print(row("-" * 52, "-" * 14, "-" * 7, "------"))
    if "a" in parts:
        report_a(r)
    if "b" in parts:
        report_b(s, r)
    for line in replay_rows(r):
        print(line if isinstance(line, str) else row(*line))
    print()
    print(f"caveat: {os.cpu_count()} CPU cores shared by the server, the devices (or the replay driver) and "
          "mosquitto; in (a) device compute and the server's torch steps compete, and the centralized baseline has "
          "the cores to itself. Device processes run with OPENBLAS_NUM_THREADS=1. Times are wall clock; load average "
          f"before the run: {r['load']:.2f} (other work on the machine skews every figure).")


def report_a(r: dict) -> None:
    ratio = r["sfl_sps"] / r["central_sps"]
    print(row("(a) SFL train-phase throughput / centralized", f"{ratio:.3f}", f">= {GOAL_THROUGHPUT}",
              "met" if ratio >= GOAL_THROUGHPUT else "missed"))
    print(row("    SFL samples/s (train phase, rounds 2..R)", f"{r['sfl_sps']:.1f}"))
    print(row("    centralized samples/s (same samples)", f"{r['central_sps']:.1f}"))


def report_b(s: Settings, r: dict) -> None:
    ratio = r["rtt_s"] / r["echo_s"]
    print(row("(b) device step round trip / raw broker echo", f"{ratio:.2f}", f"<= {GOAL_RTT:g}",
              "met" if ratio <= GOAL_RTT else "missed"))
    print(row(f"    device _exchange median ms ({r['rtt_steps']} steps)", f"{r['rtt_s'] * 1e3:.2f}"))
    print(row(f"    echo median ms ({r['up']} B up, {r['down']} B down)", f"{r['echo_s'] * 1e3:.2f}"))
    print(row("    server step compute, mean ms (in the round trip)", f"{r['server_step_s'] * 1e3:.2f}"))
    print(row("    (round trip - server compute) / echo", f"{(r['rtt_s'] - r['server_step_s']) / r['echo_s']:.2f}"))
    if r["echo_chunked_s"] is not None:
        print(row(f"    echo chunked as sent ({len(r['up_chunks'])} up + {len(r['down_chunks'])} down frames), ms",
                  f"{r['echo_chunked_s'] * 1e3:.2f}"))
    if "loaded_rtt_s" in r:
        print(row(f"    exchange median ms under {s.devices}-device load", f"{r['loaded_rtt_s'] * 1e3:.2f}"))


def measure_rtt(s: Settings, broker_url: str, bundle: Path, work: Path) -> dict:
    """(b): the raw echo (whole and chunked payloads), then one device alone against the daemon."""
    log = logging.getLogger("bench_server")
    up, down, up_chunks, down_chunks = frame_sizes(s, "fleet", "dev-0")
    log.warning("raw broker echo: %d B up, %d B down", up, down)
    echo_s = echo_rtt(broker_url, [up], [down], s.echo_iterations, "whole")
    echo_chunked_s = None
    if len(up_chunks) > 1 or len(down_chunks) > 1:
        echo_chunked_s = echo_rtt(broker_url, up_chunks, down_chunks, s.echo_iterations, "chunked")
    log.warning("one device alone: %d rounds", s.rtt_rounds)
    records, times = run_fleet(s, broker_url, bundle, work, "alone", 1, s.rtt_per_device, s.rtt_rounds)
    rtt_s, rtt_steps = exchange_median(times[0])
    return {"rtt_s": rtt_s, "rtt_steps": rtt_steps, "echo_s": echo_s, "echo_chunked_s": echo_chunked_s, "up": up,
            "down": down, "up_chunks": up_chunks, "down_chunks": down_chunks,
            "server_step_s": server_step_mean(records)}


def measure_devices(s: Settings, broker_url: str, work: Path) -> dict:
    """(a) and (b), whichever are selected; centralized epochs run before and after the device
    processes, so that a change in machine load hits both."""
    from export.bundle import export_bundle

    log, parts, figures = logging.getLogger("bench_server"), s.parts, {}
    log.warning("exporting a %s bundle", s.preset)
    bundle = work / "bundle"
    export_bundle(s.preset, "raspberry-pi-5", bundle, batch=4, formats=("onnx",))
    epochs, central = s.rounds - 1, []
    if "a" in parts:
        log.warning("centralized training: 1 + %d epochs of %d samples", (epochs + 1) // 2, s.devices * s.per_device)
        central.append(centralized_in_child(s, (epochs + 1) // 2))
    if "b" in parts:
        figures.update(measure_rtt(s, broker_url, bundle, work))
    if "a" in parts:
        log.warning("%d devices: %d rounds", s.devices, s.rounds)
        records, times = run_fleet(s, broker_url, bundle, work, "fleet", s.devices, s.per_device, s.rounds)
        figures["sfl_sps"] = sfl_throughput(records)
        figures["loaded_rtt_s"], _ = exchange_median([t for device in times for t in device])
        if epochs // 2:
            log.warning("centralized training: 1 + %d epochs", epochs // 2)
            central.append(centralized_in_child(s, epochs // 2))
        figures["central_sps"] = sum(n for n, _ in central) / sum(t for _, t in central)
    return figures


def measure(s: Settings, work: Path) -> dict:
    """Every selected part, in order; returns the figures for the report."""
    parts, figures = s.parts, {}
    with MosquittoBroker(work / "mosquitto") as broker:
        if "a" in parts or "b" in parts:
            figures.update(measure_devices(s, broker.url, work))
        make_config = functools.partial(config_text, preset=s.preset, broker_url=broker.url)
        figures.update(measure_replays(s.replay, parts, s.preset, make_config, broker.url, work))
    return figures


def parts_list(text: str) -> tuple[str, ...]:
    """argparse type: a comma-separated subset of a, b, c, d, kept in that order."""
    chosen = {part.strip() for part in text.split(",") if part.strip()}
    if not chosen or chosen - set(PARTS):
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(PARTS)}, got {text!r}")
    return tuple(part for part in PARTS if part in chosen)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="vit_mini_patch4_32", help="model preset (vit_quick_patch4_16 is faster)")
    parser.add_argument("--only", type=parts_list, default=PARTS, help="the parts to run, e.g. c,d (default a,b,c,d)")
    parser.add_argument("--devices", type=at_least(1), default=3, help="device processes in (a)")
    parser.add_argument("--rounds", type=at_least(2), help="rounds of (a), the first is warm-up (default 4; --quick 2)")
    parser.add_argument("--batch", type=at_least(1), default=32, help="batch size of (a) and (b)")
    parser.add_argument("--workers", type=at_least(1),
                        help="the daemon's compute.workers, step threads (default: one per device)")
    parser.add_argument("--server-threads", type=at_least(1),
                        help="torch intra-op threads while the daemon of (a) and (b) runs (default: torch's)")
    add_replay_arguments(parser)
    parser.add_argument("--quick", action="store_true", help="fewer samples, rounds and echoes: a smoke run")
    args = parser.parse_args()
    try:
        get_preset(args.preset)
    except ValueError as exc:
        parser.error(str(exc))
    return args


def main() -> int:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # optional-dependency notes while exporting
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM cleans up like Ctrl-C
    s = settings_from(args)
    load = os.getloadavg()[0]
    try:
        with tempfile.TemporaryDirectory(prefix="sflam-bench-server-") as work:
            figures = measure(s, Path(work))
    except KeyboardInterrupt:
        print("interrupted; processes stopped and temporary files removed", file=sys.stderr)
        return 130
    print_report(s, {**figures, "load": load})
    refused = any("refused" in f for part in ("c", "d") for f in figures.get(part, ()))
    return 1 if refused else 0


if __name__ == "__main__":
    sys.exit(main())
