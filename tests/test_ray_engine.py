"""Device hosts as Ray actors on a real two-node Ray cluster: a head in one network namespace, a
worker node in another, joined by a veth pair; the broker and the server stay with the head."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sflam import sim_report

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
pytestmark = [pytest.mark.broker, pytest.mark.slow]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def _in(ns: str, *cmd: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True, **kwargs)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    """(head namespace, Ray address, broker URL, worker IP): a head and a worker node with the
    ``sflam_host`` resource, mosquitto on the head's veth address; all of it removed afterwards."""
    tag = f"{os.getpid() % 10000}"
    head, worker = f"sfh{tag}", f"sfw{tag}"
    subnet = f"10.{200 + os.getpid() % 50}.{os.getpid() % 250}"
    head_ip, worker_ip = f"{subnet}.1", f"{subnet}.2"
    broker = None
    try:
        _ip("netns", "add", head)
        _ip("netns", "add", worker)
        _ip("link", "add", f"{head}v", "type", "veth", "peer", "name", f"{worker}v")
        for ns, ip in ((head, head_ip), (worker, worker_ip)):
            _ip("link", "set", f"{ns}v", "netns", ns)
            _ip("netns", "exec", ns, "ip", "addr", "add", f"{ip}/24", "dev", f"{ns}v")
            _ip("netns", "exec", ns, "ip", "link", "set", f"{ns}v", "up")
            _ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
        conf = tmp_path_factory.mktemp("ray-broker") / "mosquitto.conf"
        conf.write_text(f"listener 1883 {head_ip}\nallow_anonymous true\npersistence false\nset_tcp_nodelay true\n")
        broker = subprocess.Popen(["ip", "netns", "exec", head, "mosquitto", "-c", str(conf)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started = _in(head, RAY, "start", "--head", "--node-ip-address", head_ip, "--port", "6379", "--num-cpus", "1",
                      "--include-dashboard", "false", "--disable-usage-stats", timeout=120)
        assert started.returncode == 0, started.stderr[-2000:]
        joined = _in(worker, RAY, "start", "--address", f"{head_ip}:6379", "--node-ip-address", worker_ip,
                     "--num-cpus", "2", "--resources", '{"sflam_host": 4}', "--disable-usage-stats", timeout=120)
        assert joined.returncode == 0, joined.stderr[-2000:]
        yield head, f"{head_ip}:6379", f"mqtt://{head_ip}:1883", worker_ip
    finally:
        for ns in (worker, head):
            _in(ns, RAY, "stop", "--force", timeout=120)
        if broker is not None:
            broker.send_signal(signal.SIGTERM)
            broker.wait(10)
        for ns in (head, worker):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _simulate(head: str, address: str, broker: str, out: Path, *extra: str) -> list[str]:
    return ["ip", "netns", "exec", head, sys.executable, "-m", "sflam", "simulate", "--engine", "ray",
            "--ray-address", address, "--broker", broker, "--devices", "40", "--hosts", "2", "--local-epochs", "1",
            "--bits", "8", "--out", str(out), *extra]


def _hosts(out: Path) -> dict[str, set[str]]:
    return {f"sflam-host-{k}": {d["device_id"] for d in json.loads((out / "hosts" / f"host-{k}.json").read_text())["devices"]}
            for k in range(2)}


def test_forty_devices_in_two_actors_on_the_worker_node_train_two_rounds(cluster, tmp_path: Path) -> None:
    head, address, broker, worker_ip = cluster
    out = tmp_path / "forty"
    result = subprocess.run(_simulate(head, address, broker, out, "--per-round", "6", "--rounds", "2"),
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["status"], summary["rounds"], summary["engine"], summary["devices_connected"]) == (
        "completed", 2, "ray", 40)
    # both actors ran on the worker node (the one offering sflam_host), each with its 20 sessions
    assert [(h["node"], h["connected"]) for h in summary["ray_hosts"]] == [(worker_ip, 20), (worker_ip, 20)]


def test_killing_an_actor_mid_round_fails_exactly_its_devices_and_the_run_goes_on(cluster, tmp_path: Path) -> None:
    # Prepare: 8 rounds of 12 devices; a device reported offline fails after 1 s (simulate's
    # default quorum, the whole fleet, gates the first round only)
    head, address, broker, _ = cluster
    out = tmp_path / "killed"
    config = tmp_path / "sim.toml"
    config.write_text("[server.round]\noffline_grace_s = 1.0\nmin_completed = 0.3\n")
    log = tmp_path / "simulate.log"  # a file, not a pipe: nobody reads a pipe while the run goes on
    with open(log, "wb") as sink:
        proc = subprocess.Popen(_simulate(head, address, broker, out, "--per-round", "12", "--rounds", "8",
                                          "--config", str(config)), cwd=tmp_path, stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not (out / "metrics.jsonl").exists() or not sim_report.read_records(out / "metrics.jsonl"):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.2)
        # Execute: round 1 is in; kill host 1 while the next rounds run
        kill = _in(head, sys.executable, "-c",
                   "import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
                   "ray.kill(ray.get_actor('sflam-host-1', namespace=sys.argv[2]))", address, f"sflam-{out.name}",
                   timeout=120)
        assert kill.returncode == 0, kill.stderr[-2000:]
        at_kill = len(sim_report.read_records(out / "metrics.jsonl"))  # attempts recorded once the actor was gone
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    # Assert: the run completed its 8 rounds
    assert proc.returncode == 0, log.read_text()[-4000:]
    records = sim_report.read_records(out / "metrics.jsonl")
    assert [r.counted for r in records].count(True) == 8
    dead = _hosts(out)["sflam-host-1"]
    failed = {d: reason for r in records for d, reason in r.failed.items()}
    # whatever failed was one of the killed actor's devices, reported offline through its will;
    # every survivor selected in a round completed it
    assert set(failed) <= dead and all("offline" in reason for reason in failed.values())
    assert all(set(r.selected) - dead <= set(r.completed) for r in records)
    # the round in flight when the kill returned may have selected dead devices; every round that
    # started after it selected among the survivors only (and the kill came early enough to show it)
    later = records[at_kill + 1:]
    assert later and all(not set(r.selected) & dead for r in later), (at_kill, [r.selected for r in records])
    summary = json.loads((out / "summary.json").read_text())
    assert [("error" in h) for h in summary["ray_hosts"]] == [False, True]  # host 1 died, host 0 reported


def test_an_unreachable_ray_address_fails_fast_with_the_address_named(tmp_path: Path) -> None:
    t0 = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "sflam", "simulate", "--engine", "ray", "--ray-address",
                             "127.0.0.1:9", "--devices", "4", "--per-round", "2", "--rounds", "1",
                             "--out", str(tmp_path / "run")], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "--ray-address 127.0.0.1:9: no Ray cluster answers there" in result.stderr
    assert time.monotonic() - t0 < 120  # fails at the address, not after a round's deadline


def test_engine_ray_without_ray_installed_says_how_to_install_it(tmp_path: Path) -> None:
    code = ("import sys; sys.modules['ray'] = None\n"
            "from sflam.ray_engine import connect\n"
            "try:\n    connect('127.0.0.1:9')\nexcept ValueError as exc:\n    print(exc)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "pip install 'sflam[cluster]'" in result.stdout
