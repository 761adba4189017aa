"""Failures are data: a device killed mid-round fails, the round counts (or not) by policy."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from server_runtime.config import parse_config
from server_runtime.daemon import DaemonError, ServerDaemon
from server_runtime.metrics import read_metrics
from test_server import config_text, start_device, stop, write_shards

pytestmark = pytest.mark.broker


def run_with_a_killed_device(quick_bundle: Path, broker, tmp_path: Path, min_completed: float):
    """Two devices in one round; dev-1 is SIGKILLed once it has had a few steps served."""
    shards = write_shards(tmp_path, 2, 96)
    cfg = parse_config(config_text(broker.url, tmp_path / "ckpt", training__rounds=1, training__devices_per_round=2,
                                   training__local_epochs=3, round__min_completed=min_completed,
                                   round__wait_for_devices_s=3.0))
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
    devices = [start_device(quick_bundle, broker.url, f"dev-{i}", shard, seed=i) for i, shard in enumerate(shards)]
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


def test_killed_device_fails_and_the_round_counts_without_it(quick_bundle: Path, broker, tmp_path: Path) -> None:
    daemon, start, aggregated, errors, records = run_with_a_killed_device(quick_bundle, broker, tmp_path, 0.5)
    assert errors == []
    (record,) = records
    assert record["counted"] and record["completed"] == ["dev-0"]
    assert record["failed"]["dev-1"].startswith("offline")  # the broker published its last will
    assert aggregated == [["dev-0"]]  # the aggregate excludes the failed device
    assert record["devices"]["dev-1"]["steps"] >= 3 and record["devices"]["dev-1"]["energy_j"] is None
    assert not torch.equal(daemon.trainer.state_dict()["head.weight"], start["head.weight"])


def test_round_below_minimum_completion_does_not_count(quick_bundle: Path, broker, tmp_path: Path) -> None:
    daemon, start, aggregated, errors, records = run_with_a_killed_device(quick_bundle, broker, tmp_path, 1.0)
    record = records[0]
    assert not record["counted"] and record["round"] == 1 and record["accuracy"] is None
    assert aggregated == []
    for key, value in daemon.trainer.state_dict().items():  # the global model is the round-start one
        torch.testing.assert_close(value, start[key], rtol=0, atol=0)
    assert daemon.round == 0
    # the retry needs two devices online; only one is left, so the daemon gives up with a clear error
    assert len(errors) == 1 and "only 1 of the 2 devices" in str(errors[0])
