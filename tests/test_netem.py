"""``sflam simulate --network netem``: devices behind kernel-shaped links (namespaces, tc, packet
queues), their faults, and cleanup that leaves nothing behind.

Every test here runs the real thing as root: network namespaces, veth pairs on a bridge, tc token
bucket filters, iptables NFQUEUE rules and the delay line, a real mosquitto, the server and the
device processes. ``make test`` installs iproute2 and iptables (scripts/ensure-netem.sh). The link
flap waits out an MQTT keep-alive and is a drill (``make drill``).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from sflam import sim_report
from sflam.netem import STATE_DIR, leftovers

ROOT = Path(__file__).resolve().parents[1]
SMALL = ("--devices", "4", "--per-round", "2", "--rounds", "2", "--local-epochs", "1", "--batch-size", "16",
         "--bits", "8", "--network", "netem")
TAG_LINE = re.compile(r"namespaces sflam-([0-9a-f]{4})-\*")


class Run:
    """``sflam simulate`` in a subprocess, its output collected line by line."""

    def __init__(self, out: Path, *args: str) -> None:
        self.out = out
        self.lines: list[str] = []
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen([sys.executable, "-m", "sflam", "simulate", *args, "--out", str(out)],
                                     cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def tag(self) -> str:
        found = TAG_LINE.search(self.output)
        assert found, self.output[-3000:]
        return found.group(1)

    def wait_for(self, ready, what: str, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            assert self.proc.poll() is None, f"exited before {what}:\n{self.output[-4000:]}"
            assert time.monotonic() < deadline, f"no {what} in {timeout_s} s:\n{self.output[-4000:]}"
            time.sleep(0.2)

    def finish(self, timeout_s: float = 600.0) -> int:
        code = self.proc.wait(timeout_s)
        self.reader.join(10)
        return code


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def _assert_nothing_left(tag: str) -> None:
    """No interface, namespace or state file of the run: its qdiscs and queue rules lived on them."""
    assert leftovers(tag) == []
    assert not (STATE_DIR / f"{tag}.json").exists()
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    assert f"sf{tag}" not in links
    qdiscs = subprocess.run(["tc", "qdisc", "show"], capture_output=True, text=True, check=True).stdout
    assert f"sf{tag}" not in qdiscs


def _assert_steps_exactly_once(records) -> None:
    """Every completed device of a counted round: the server trained each step once, and that is
    the number of steps the device says it applied."""
    counted = [r for r in records if r.counted]
    assert counted
    for record in counted:
        for device in record.completed:
            figures = record.devices[device]
            assert figures.steps == figures.device_steps > 0, (record.round, device, figures)


def _processes_of(out: Path) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if str(out).encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


SINK = """
import socket, sys
server = socket.create_server((sys.argv[1], 0))
print(server.getsockname()[1], flush=True)
conn, _ = server.accept()
while conn.recv(1 << 16):
    pass
"""
SEND = """
import socket, sys, time
t0 = time.monotonic()
conn = socket.create_connection((sys.argv[1], int(sys.argv[2])))
connected = time.monotonic()
conn.sendall(b"x" * int(sys.argv[3]))
conn.shutdown(socket.SHUT_WR)
conn.recv(1)  # the sink's close: every byte arrived
print(connected - t0, time.monotonic() - connected)
"""


def test_a_kernel_link_carries_at_the_shaped_rate_with_its_delay(tmp_path: Path) -> None:
    """The link itself, without sflam on it: 250 kB up a 1 Mbit/s, 50 ms-each-way link take
    2 s plus a few round trips, and the TCP handshake takes one 100 ms round trip."""
    from sflam.delayline import LinkImpairment
    from sflam.netem import Topology

    topology = Topology()
    delayline = sink = None
    try:
        topology.open()
        topology.add_devices(["dev-0"], [LinkImpairment(50.0, 0.0, 0.0)], 100e6, [1e6])
        links = topology.delayline_file(tmp_path / "links.json", seed=0)
        delayline = subprocess.Popen([sys.executable, "-m", "sflam.delayline", "--links", str(links)],
                                     cwd=ROOT, stdout=subprocess.PIPE, text=True)
        assert "ready" in delayline.stdout.readline()
        sink = subprocess.Popen([sys.executable, "-c", SINK, topology.broker_host], stdout=subprocess.PIPE, text=True)
        port = sink.stdout.readline().strip()
        sent = subprocess.run(topology.device_command(0, [sys.executable, "-c", SEND, topology.broker_host, port,
                                                         "250000"]), capture_output=True, text=True, timeout=60)
        handshake, transfer = (float(x) for x in sent.stdout.split())
        assert 0.1 <= handshake < 0.2, sent  # one round trip of 2 x 50 ms
        # 8 x 250 kB (plus ~5 % of headers) at 1 Mbit/s is 2.1 s; slow start adds a few round trips
        assert 2.0 <= transfer < 2.9, transfer
    finally:
        for proc in (sink, delayline):
            if proc is not None:
                proc.terminate()
                proc.wait(10)
        assert topology.close() == []


@pytest.mark.broker
@pytest.mark.slow
def test_kernel_links_honour_airtime_and_the_allocated_rate(tmp_path: Path) -> None:
    # Execute: the acceptance command
    out = tmp_path / "run"
    run = Run(out, "--devices", "4", "--per-round", "2", "--rounds", "2", "--bits", "8", "--network", "netem")
    code = run.finish()
    # Assert
    assert code == 0, run.output[-4000:]
    summary = _summary(out)
    assert summary["network"] == "netem" and summary["status"] == "completed" and summary["rounds"] == 2
    records = sim_report.read_records(out / "metrics.jsonl")
    for record in (r for r in records if r.counted):  # the wall time of a round holds its airtime
        for device in record.completed:
            assert record.phases_s.train >= record.devices[device].uplink_time_s > 0
    check = summary["links"]["uplink"]
    assert len(check["rows"]) == 4  # 2 devices in each of 2 rounds
    assert check["max_relative_error"] <= 0.15, check["rows"]  # what the link carried, at the allocated rate
    for row in check["rows"]:  # publishing waits for every byte and a PUBACK: never less than the airtime
        assert row["publish_wall_s"] >= 0.9 * row["measured_s"], row
    assert all(link["delay_ms"] > 0 for link in summary["links"]["links"].values())  # the radios' defaults
    _assert_steps_exactly_once(records)
    assert summary["links"]["left_after_cleanup"] == []
    _assert_nothing_left(run.tag())


@pytest.mark.broker
@pytest.mark.slow
def test_sustained_five_percent_loss_is_survived_with_every_step_once(tmp_path: Path) -> None:
    out = tmp_path / "run"
    run = Run(out, *SMALL, "--link-loss", "0.05", "--link-delay-ms", "2")
    code = run.finish()
    assert code == 0, run.output[-4000:]
    summary = _summary(out)
    assert summary["rounds"] == 2 and summary["status"] == "completed"
    counts = {name: c for name, c in summary["links"]["delayline"].items() if name != "unknown"}
    assert len(counts) == 4
    dropped = sum(c["dropped"] for c in counts.values())
    passed = sum(c["accepted"] for c in counts.values())
    assert all(c["up"]["dropped"] and c["down"]["dropped"] for c in counts.values())  # both ways
    assert 0.03 < dropped / (dropped + passed) < 0.07, counts  # the kernel really lost 5 % of the packets
    records = sim_report.read_records(out / "metrics.jsonl")
    _assert_steps_exactly_once(records)
    assert all(r.counted for r in records)
    _assert_nothing_left(run.tag())


@pytest.mark.broker
@pytest.mark.slow
def test_a_300_ms_round_trip_is_felt_by_every_step(tmp_path: Path) -> None:
    out = tmp_path / "run"
    run = Run(out, *SMALL, "--link-delay-ms", "150", "--batch-size", "32")  # fewer, larger steps
    code = run.finish()
    assert code == 0, run.output[-4000:]
    summary = _summary(out)
    assert summary["rounds"] == 2
    assert {link["delay_ms"] for link in summary["links"]["links"].values()} == {150.0}
    records = sim_report.read_records(out / "metrics.jsonl")
    _assert_steps_exactly_once(records)
    for row in summary["links"]["uplink"]["rows"]:
        record = next(r for r in records if r.counted and r.round == row["round"])
        steps = record.devices[row["device"]].steps
        # every step's publish waits for its PUBACK: at least one 300 ms round trip each
        assert row["publish_wall_s"] >= 0.3 * steps, row
        # and the round waited for each step's gradient: another round trip each
        assert record.phases_s.train >= 0.3 * steps
    _assert_nothing_left(run.tag())


@pytest.mark.broker
@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
def test_an_interrupted_run_removes_every_namespace_veth_and_qdisc(tmp_path: Path, signum: int) -> None:
    out = tmp_path / "run"
    run = Run(out, *SMALL, "--rounds", "50", "--link-delay-ms", "5")
    run.wait_for(lambda: sim_report.read_records(out / "metrics.jsonl"), "a round")
    tag = run.tag()
    assert leftovers(tag)  # the links exist while it runs
    run.proc.send_signal(signum)
    assert run.finish(120) == 130, run.output[-4000:]
    assert _summary(out)["status"] == "interrupted"
    _assert_nothing_left(tag)
    assert _processes_of(out) == []  # devices (in their namespaces), delay line, server, broker


@pytest.mark.broker
@pytest.mark.slow
def test_a_failed_run_removes_its_links_too(tmp_path: Path) -> None:
    out = tmp_path / "run"
    run = Run(out, *SMALL, "--rounds", "50", "--link-delay-ms", "5")
    run.wait_for(lambda: sim_report.read_records(out / "metrics.jsonl"), "a round")
    tag = run.tag()
    server = [pid for pid in _processes_of(out)
              if b"server" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]
    assert server, "no server process found"
    os.kill(server[0], signal.SIGKILL)  # the run fails: its server is gone
    code = run.finish(120)
    assert code not in (0, 130), run.output[-4000:]
    assert "the server exited" in run.output
    _assert_nothing_left(tag)
    assert _processes_of(out) == []


@pytest.mark.broker
@pytest.mark.drill
def test_a_link_flap_longer_than_the_keep_alive_is_ridden_out(tmp_path: Path) -> None:
    # Prepare: device 0's link goes down for 12 s in round 2, with a 3 s keep-alive (its broker
    # gives up on it after 4.5 s and publishes its will); the server waits up to 60 s for it
    config = tmp_path / "flap.toml"
    config.write_text("[server.round]\noffline_grace_s = 60.0\n")
    out = tmp_path / "run"
    run = Run(out, "--config", str(config), "--devices", "2", "--per-round", "2", "--rounds", "3", "--bits", "8",
              "--network", "netem", "--link-delay-ms", "20", "--keepalive-s", "3", "--link-flap", "2:12:0")
    # Execute
    code = run.finish(900)
    # Assert
    assert code == 0, run.output[-4000:]
    summary = _summary(out)
    assert summary["rounds"] == 3 and summary["links"]["flap"]["happened"], summary["links"].get("flap")
    records = sim_report.read_records(out / "metrics.jsonl")
    flapped = next(r for r in records if r.round == 2 and r.counted)
    figures = flapped.devices["dev-0"]
    assert "dev-0" in flapped.completed  # it came back and finished the round
    assert figures.outages >= 1 and figures.offline_s > 0  # the record says what happened
    _assert_steps_exactly_once(records)
    device_log = (out / "logs" / "dev-0.log").read_text()
    summary_line = json.loads(device_log.split("sflam-device-summary ", 1)[1].splitlines()[0])
    assert summary_line["connections"] >= 2  # it reconnected
    _assert_nothing_left(run.tag())
