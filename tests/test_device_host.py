"""A device host: many real MQTT devices in one process train split rounds against a real server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_runtime.host import HostError, read_host_file
from server_runtime.metrics import read_round_records
from sflam.processes import ProcessGroup, sflam_command
from test_server import config_text, write_shards

pytestmark = pytest.mark.broker
DEVICES, PER_ROUND, ROUNDS = 40, 6, 2


def _host_file(path: Path, shards: list[Path], first: int = 0) -> Path:
    devices = [{"device_id": f"dev-{first + i:03d}", "data": f"npz:{shard}", "seed": first + i}
               for i, shard in enumerate(shards)]
    path.write_text(json.dumps({"devices": devices}))
    return path


def _summary(text: str, tag: str) -> dict:
    (line,) = [line for line in text.splitlines() if line.startswith(tag + " ")]
    return json.loads(line.split(" ", 1)[1])


def test_two_hosts_train_rounds_with_every_device_its_own_session(quick_bundle: Path, broker, tmp_path: Path) -> None:
    # Prepare: DEVICES devices over two host processes, PER_ROUND selected per round
    shards = write_shards(tmp_path, DEVICES, 24)
    half = DEVICES // 2
    files = [_host_file(tmp_path / "host-0.json", shards[:half]), _host_file(tmp_path / "host-1.json", shards[half:], half)]
    ckpt = tmp_path / "ckpt"
    config = tmp_path / "run.toml"
    config.write_text(config_text(broker.url, ckpt, training__rounds=ROUNDS, training__devices_per_round=PER_ROUND,
                                  training__min_devices=DEVICES, round__min_completed=1.0))
    # Execute
    with ProcessGroup(tmp_path / "logs") as group:
        group.start("server", sflam_command("server", "--config", str(config)))
        group.wait_for_log("server", "waiting for devices", 120)
        for k, path in enumerate(files):
            group.start(f"host-{k}", sflam_command("device-host", "--bundle", str(quick_bundle), "--broker", broker.url,
                                                   "--devices", str(path), "--run-id", "srv", "--backend", "numpy",
                                                   "--concurrency", str(PER_ROUND), "--stagger-s", "0.5"))
        group.wait_until(lambda: "server" in group.exited(), 300, "the server to finish its rounds")
        codes = group.stop()
    # Assert: every round counted with all its devices, and the hosts saw every device connect
    assert codes["server"] == 0, group.tail("server")
    records = read_round_records(ckpt / "metrics.jsonl")
    assert [r.counted for r in records] == [True] * ROUNDS
    assert all(len(r.completed) == PER_ROUND and not r.failed for r in records)
    assert all(d.steps > 0 and d.device_steps == d.steps for r in records for d in r.devices.values())
    hosts = [_summary(group.output(f"host-{k}"), "sflam-host-summary") for k in range(2)]
    assert [h["devices"] for h in hosts] == [half, half] and [h["connected"] for h in hosts] == [half, half]
    assert sum(h["rounds"] for h in hosts) == PER_ROUND * ROUNDS
    assert not any(h["torch_loaded"] for h in hosts)
    assert all(h["shared_decodes"] > 0 for h in hosts)  # plan and model decoded once per host, not per device
    server = _summary(group.output("server"), "sflam-server-summary")
    assert server["devices_announced"] == DEVICES


def test_a_bad_host_file_names_itself_and_the_expected_layout(tmp_path: Path) -> None:
    bad = tmp_path / "host.json"
    bad.write_text('{"devices": [{"id": "dev-0"}]}')
    with pytest.raises(HostError, match=r"host\.json: not a host file .*device_id"):
        read_host_file(bad)
    bad.write_text('{"devices": []}')
    with pytest.raises(HostError, match="at least one device"):
        read_host_file(bad)
