"""Failures on the provisioned TLS broker (``fleet`` fixture): a device killed mid-step fails and
the round counts (or not) by policy, without it in the aggregate; a broker restarted mid-round
loses no step and applies none twice."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from server_runtime.config import parse_config
from server_runtime.daemon import DaemonError, ServerDaemon
from server_runtime.metrics import read_metrics
from sflam.fleet import LocalFleet
from test_server import config_text, counted_rounds, start_device, start_server, stop, wait_for, write_shards

pytestmark = pytest.mark.broker


def fleet_config(fleet: LocalFleet, ckpt: Path, **overrides: object) -> str:
    """tests/test_server.config_text logged in to ``fleet`` as the server."""
    login = {f"broker__{key}": value for key, value in fleet.server_config().items()}
    return config_text(fleet.url, ckpt, **login, **overrides)


def run_with_a_killed_device(quick_bundle: Path, fleet: LocalFleet, tmp_path: Path, min_completed: float):
    """Two devices in one round; dev-1 is SIGKILLed once it has had a few steps served."""
    shards = write_shards(tmp_path, 2, 96)
    cfg = parse_config(fleet_config(fleet, tmp_path / "ckpt", training__rounds=1, training__devices_per_round=2,
                                    training__local_epochs=3, round__min_completed=min_completed,
                                    round__wait_for_devices_s=3.0, round__offline_grace_s=2.0))
    daemon = ServerDaemon(cfg)
    start = daemon.trainer.state_dict()
    aggregated: list[list[str]] = []
    finish = daemon.trainer.finish_round
    daemon.trainer.finish_round = lambda updates: (aggregated.append(sorted(updates)), finish(updates))[1]
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            daemon.run()
        except DaemonError as exc:
            errors.append(exc)

    runner = threading.Thread(target=serve, daemon=True)
    runner.start()
    devices = [start_device(quick_bundle, fleet.url, f"dev-{i}", shard, seed=i, extra=fleet.device_args(f"dev-{i}"))
               for i, shard in enumerate(shards)]
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            state = daemon.current
            if state is not None and state.devices["dev-1"].steps >= 3:
                break
            time.sleep(0.05)
        devices[1].send_signal(signal.SIGKILL)
        runner.join(90)
    finally:
        stop(devices)
    assert not runner.is_alive()
    return daemon, start, aggregated, errors, read_metrics(cfg.metrics_path)


def test_killed_device_fails_and_the_round_counts_without_it(quick_bundle: Path, fleet: LocalFleet,
                                                             tmp_path: Path) -> None:
    daemon, start, aggregated, errors, records = run_with_a_killed_device(quick_bundle, fleet, tmp_path, 0.5)
    assert errors == []
    (record,) = records
    assert record["counted"] and record["completed"] == ["dev-0"]
    assert record["failed"]["dev-1"].startswith("offline")  # the broker published its last will
    assert aggregated == [["dev-0"]]  # the aggregate excludes the failed device
    assert record["devices"]["dev-1"]["steps"] >= 3 and record["devices"]["dev-1"]["energy_j"] is None
    assert not torch.equal(daemon.trainer.state_dict()["head.weight"], start["head.weight"])


def test_round_below_minimum_completion_does_not_count(quick_bundle: Path, fleet: LocalFleet, tmp_path: Path) -> None:
    daemon, start, aggregated, errors, records = run_with_a_killed_device(quick_bundle, fleet, tmp_path, 1.0)
    record = records[0]
    assert not record["counted"] and record["round"] == 1 and record["accuracy"] is None
    assert aggregated == []
    for key, value in daemon.trainer.state_dict().items():  # the global model is the round-start one
        torch.testing.assert_close(value, start[key], rtol=0, atol=0)
    assert daemon.round == 0
    # the retry needs two devices online; only one is left, so the daemon gives up with a clear error
    assert len(errors) == 1 and "only 1 of the 2 devices" in str(errors[0])


def test_a_broker_restart_mid_round_loses_no_step_and_applies_none_twice(quick_bundle: Path, fleet: LocalFleet,
                                                                         tmp_path: Path) -> None:
    # Prepare: two devices, three rounds of 4 epochs x 6 steps; the broker keeps nothing (persistence
    # false), so the restart also wipes the retained plan, model and presence
    shards = write_shards(tmp_path, 2, 96)
    ckpt, config = tmp_path / "ckpt", tmp_path / "run.toml"
    config.write_text(fleet_config(fleet, ckpt, training__rounds=3, training__devices_per_round=2,
                                   training__local_epochs=4, round__deadline_s=90.0))
    server = start_server(config)
    devices = [start_device(quick_bundle, fleet.url, f"dev-{i}", shard, seed=i, rounds=3,
                            extra=fleet.device_args(f"dev-{i}")) for i, shard in enumerate(shards)]
    try:
        # Execute: restart the broker as soon as round 1 is in the log (round 2 is under way)
        wait_for(lambda: counted_rounds(ckpt / "metrics.jsonl") == [1], 180, "round 1")
        fleet.broker.restart()
        out, err = server.communicate(timeout=240)
        device_out = [d.communicate(timeout=60) for d in devices]
    finally:
        stop([server, *devices])
    # Assert: every round counted with both devices, every step trained exactly once
    assert server.returncode == 0, err[-3000:]
    assert all(d.returncode == 0 for d in devices), [e[-2000:] for _, e in device_out]
    records = read_metrics(ckpt / "metrics.jsonl")
    assert [(r["round"], r["counted"]) for r in records] == [(1, True), (2, True), (3, True)]  # no attempt lost
    for record in records:
        assert record["completed"] == ["dev-0", "dev-1"], record["failed"]
        for stats in record["devices"].values():
            assert stats["steps"] == stats["device_steps"] == 4 * 6  # server-trained == device-taken
    summaries = [json.loads(o.split("sflam-device-summary ", 1)[1].splitlines()[0]) for o, _ in device_out]
    assert all(s["rounds"] == 3 for s in summaries)
    # the restart was felt: both devices connected twice
    assert [s["connections"] for s in summaries] == [2, 2]
    final = records[-1]["counters"]
    resent = sum(s["counters"].get("resent_activations", 0) for s in summaries)
    print(f"broker restart: {len(records)} attempts, resent steps {resent}, server duplicates "
          f"{final.get('receiver.duplicates', 0)}, re-answered {final.get('reanswered_steps', 0)}")
