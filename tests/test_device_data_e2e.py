"""Shards written for a deployment, trained on where devices keep them: ``sflam data partition
--out D --format folder`` writes PNG folders, and three ``sflam device --data folder:D/dev-k`` (or
``manifest:D/dev-k/manifest.csv``) processes train two rounds against ``sflam server`` over a real
mosquitto, with the augmentation the run announces; the device processes never load torch. A
device whose class list differs from the run's refuses to train and tells the server why, alone
or in a device host (which goes on with its other devices).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from server_runtime.metrics import read_round_records
from test_server import ROOT, config_text, start_server, stop

pytestmark = pytest.mark.broker


def partition(out: Path, fmt: str = "folder") -> dict:
    done = subprocess.run([sys.executable, "-m", "sflam", "data", "partition", "--dataset", "digits", "--devices", "3",
                           "--scheme", "iid", "--out", str(out), "--format", fmt],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads((out / "summary.json").read_text())


def misnumber(shard: Path) -> None:
    """Reverse the shard's class list: its labels no longer mean what the run's do."""
    listed = shard / "classes.txt"
    listed.write_text("".join(f"{name}\n" for name in reversed(listed.read_text().split())))


def start_device(bundle: Path, broker_url: str, device_id: str, data: str, rounds: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "sflam", "device", "--bundle", str(bundle), "--broker", broker_url,
           "--device-id", device_id, "--data", data, "--backend", "numpy", "--run-id", "srv",
           "--seed", device_id[-1], "--meter", "estimate", "--rounds", str(rounds)]
    return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_text(path: Path, text: str, timeout_s: float) -> str:
    """The file's contents once ``text`` is in them (or whatever they are after ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while text not in path.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    return path.read_text()


def device_summary(stdout: str) -> dict:
    line = next(line for line in stdout.splitlines() if line.startswith("sflam-device-summary "))
    return json.loads(line.split(" ", 1)[1])


@pytest.mark.parametrize("source", ["folder", "manifest"])
def test_three_devices_train_on_partitioned_image_folders(quick_bundle: Path, broker, tmp_path: Path,
                                                          source: str) -> None:
    # Prepare: the shards, one unreadable file dropped into dev-0's folder, a run that augments
    shards = tmp_path / "shards"
    summary = partition(shards)
    (shards / "dev-0" / "3" / "broken.png").write_bytes(b"a phone's half-written file")
    config = tmp_path / "run.toml"
    config.write_text(config_text(broker.url, tmp_path / "ckpt", training__rounds=2, training__batch_size=32,
                                  data__augment_crop_padding=1, data__augment_hflip=True))
    specs = {f"dev-{k}": f"folder:{shards / f'dev-{k}'}" if source == "folder"
             else f"manifest:{shards / f'dev-{k}' / 'manifest.csv'}" for k in range(3)}
    # Execute
    server = start_server(config)
    devices = [start_device(quick_bundle, broker.url, device_id, spec, rounds=2) for device_id, spec in specs.items()]
    try:
        out, err = server.communicate(timeout=240)
        results = [device.communicate(timeout=60) for device in devices]
    finally:
        stop([server, *devices])
    # Assert: two counted rounds with all three devices, which trained on every image they hold
    assert server.returncode == 0, err[-3000:]
    records = read_round_records(tmp_path / "ckpt" / "metrics.jsonl")
    assert [r.round for r in records] == [1, 2] and all(r.counted for r in records)
    sizes = {s["device_id"]: s["samples"] for s in summary["shards"]}
    for record in records:
        assert record.completed == ("dev-0", "dev-1", "dev-2") and record.failed == {}
        for device_id, stats in record.devices.items():
            assert stats.steps == -(-sizes[device_id] // 32)
    for (stdout, stderr), device in zip(results, devices):
        assert device.returncode == 0, stderr[-2000:]
        report = device_summary(stdout)
        assert report["rounds"] == 2 and report["torch_loaded"] is False
        assert report["samples"] in sizes.values()
    skipped = device_summary(results[0][0])["skipped_samples"]
    assert skipped == (1 if source == "folder" else 0)
    assert ("dev-0 skips 1 unreadable image" in err) == (source == "folder")


def test_a_device_whose_classes_differ_from_the_runs_refuses_to_train(quick_bundle: Path, broker,
                                                                       tmp_path: Path) -> None:
    # Prepare: dev-0's shard, with its class list in another order than the run's (digits 0..9)
    shards = tmp_path / "shards"
    partition(shards)
    misnumber(shards / "dev-0")
    config = tmp_path / "run.toml"
    config.write_text(config_text(broker.url, tmp_path / "ckpt", training__rounds=1, training__devices_per_round=1,
                                  round__deadline_s=20.0))
    # Execute: the server's log goes to a file, read while it runs (it waits for the device to come back)
    log = tmp_path / "server.log"
    with log.open("w") as handle:
        server = subprocess.Popen([sys.executable, "-m", "sflam", "server", "--config", str(config)], cwd=ROOT,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL, stderr=handle)
    device = start_device(quick_bundle, broker.url, "dev-0", f"folder:{shards / 'dev-0'}", rounds=1)
    try:
        _, device_err = device.communicate(timeout=120)
        server_err = wait_for_text(log, "the run's classes:", timeout_s=60)
    finally:
        server.kill()
        server.wait()
        stop([device])
    # Assert: the device stops with the reason, and the server heard it
    assert device.returncode == 2, device_err[-2000:]
    assert "numbers its classes 0=9, 1=8" in device_err and "classes.txt" in device_err
    assert "dev-0 reported data_mismatch" in server_err
    assert "the run's classes: 0=0, 1=1" in server_err


def test_a_device_host_trains_folder_shards_and_takes_a_mismatched_device_offline(quick_bundle: Path, broker,
                                                                                  tmp_path: Path) -> None:
    from sflam.processes import ProcessGroup, sflam_command

    # Prepare: one host of three devices, folder shards; dev-2's class list is in another order
    shards = tmp_path / "shards"
    partition(shards)
    misnumber(shards / "dev-2")
    host_file = tmp_path / "host.json"
    host_file.write_text(json.dumps({"devices": [{"device_id": f"dev-{k}", "data": f"folder:{shards / f'dev-{k}'}",
                                                  "seed": k} for k in range(3)]}))
    config = tmp_path / "run.toml"
    config.write_text(config_text(broker.url, tmp_path / "ckpt", training__rounds=1, training__devices_per_round=3,
                                  training__batch_size=64, round__min_completed=0.5))
    # Execute
    with ProcessGroup(tmp_path / "logs") as group:
        group.start("server", sflam_command("server", "--config", str(config)))
        group.wait_for_log("server", "waiting for devices", 120)
        group.start("host", sflam_command("device-host", "--bundle", str(quick_bundle), "--broker", broker.url,
                                          "--devices", str(host_file), "--run-id", "srv", "--backend", "numpy",
                                          "--data-cache-mb", "0.5"))
        group.wait_until(lambda: "server" in group.exited(), 300, "the server to finish its rounds")
        codes = group.stop()
    # Assert: the round counts with the two others; dev-2 told the server why and went offline
    assert codes["server"] == 0, group.tail("server")
    (record,) = read_round_records(tmp_path / "ckpt" / "metrics.jsonl")
    assert record.counted and record.completed == ("dev-0", "dev-1") and "dev-2" in record.failed
    assert "device dev-2 stops: this device numbers its classes 0=9" in group.output("host")
    assert "dev-2 reported data_mismatch" in group.output("server")
