"""Failures on the provisioned TLS broker (``fleet`` fixture): a device killed mid-step fails and
the round counts (or not) by policy, without it in the aggregate; a broker restarted mid-round
loses no step and applies none twice. A step re-sent after its reply was lost is answered again
with the same gradient and trained once (a scripted device, so the path is taken every run)."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from edge_runtime import protocol as p
from server_runtime.config import parse_config
from server_runtime.daemon import DaemonError, ServerDaemon
from server_runtime.metrics import read_round_records
from sflam.testing.local_fleet import LocalFleet
from test_server_concurrency import RUN, ScriptedDevice
from test_server import config_text, counted_rounds, start_device, start_server, stop, wait_for, write_shards

pytestmark = pytest.mark.broker


def fleet_config(fleet: LocalFleet, ckpt: Path, **overrides: object) -> str:
    """tests/test_server.config_text logged in to ``fleet`` as the server."""
    login = fleet.server_overrides()  # log in, and sign
    return config_text(fleet.url, ckpt, **login, **overrides)


def _run_into(daemon: ServerDaemon, errors: list[BaseException]) -> None:
    """Run the daemon (on a test thread), keeping a DaemonError for the test to check."""
    try:
        daemon.run()
    except DaemonError as exc:
        errors.append(exc)

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
    runner = threading.Thread(target=_run_into, args=(daemon, errors), daemon=True)
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
    return daemon, start, aggregated, errors, read_round_records(cfg.metrics_path)


def test_killed_device_fails_and_the_round_counts_without_it(quick_bundle: Path, fleet: LocalFleet,
                                                             tmp_path: Path) -> None:
    daemon, start, aggregated, errors, records = run_with_a_killed_device(quick_bundle, fleet, tmp_path, 0.5)
    assert errors == []
    (record,) = records
    assert record.counted and record.completed == ("dev-0",)
    assert record.failed["dev-1"].startswith("offline")  # the broker published its last will
    assert aggregated == [["dev-0"]]  # the aggregate excludes the failed device
    assert record.devices["dev-1"].steps >= 3 and record.devices["dev-1"].energy_j is None
    assert not torch.equal(daemon.trainer.state_dict()["head.weight"], start["head.weight"])


def test_round_below_minimum_completion_does_not_count(quick_bundle: Path, fleet: LocalFleet, tmp_path: Path) -> None:
    daemon, start, aggregated, errors, records = run_with_a_killed_device(quick_bundle, fleet, tmp_path, 1.0)
    record = records[0]
    assert not record.counted and record.round == 1 and record.accuracy is None
    assert aggregated == []
    for key, value in daemon.trainer.state_dict().items():  # the global model is the round-start one
        torch.testing.assert_close(value, start[key], rtol=0, atol=0)
    assert daemon.round == 0
    # the retry needs two devices online; only one is left, so the daemon gives up with a clear error
    assert len(errors) == 1 and "only 1 of the 2 devices" in str(errors[0])


def test_a_broker_restart_mid_round_loses_no_step_and_applies_none_twice(quick_bundle: Path, fleet: LocalFleet,
                                                                         tmp_path: Path) -> None:
    # Prepare: two devices, three rounds of 4 epochs x 6 steps; the broker keeps nothing (persistence
    # false), so the restart also wipes the retained plan, model and presence. dev-0's 30th server
    # step (round 2, step 5) is held: its gradient cannot leave before the test lets it.
    shards = write_shards(tmp_path, 2, 96)
    cfg = parse_config(fleet_config(fleet, tmp_path / "ckpt", training__rounds=3, training__devices_per_round=2,
                                    training__local_epochs=4, round__deadline_s=90.0))
    daemon = ServerDaemon(cfg)
    held, release, calls = threading.Event(), threading.Event(), []
    step = daemon.trainer.step

    def holding_step(device_id: str, *args, **kwargs):
        if device_id == "dev-0":
            calls.append(device_id)
            if len(calls) == 30:
                held.set()
                release.wait(120)
        return step(device_id, *args, **kwargs)

    daemon.trainer.step = holding_step
    resent_by: list[str] = []  # the sender of every duplicate step the server saw
    reanswer = daemon.steps.reanswer
    daemon.steps.reanswer = lambda envelope: (resent_by.append(envelope.device_id), reanswer(envelope))
    errors: list[BaseException] = []
    runner = threading.Thread(target=_run_into, args=(daemon, errors), daemon=True)
    runner.start()
    devices = [start_device(quick_bundle, fleet.url, f"dev-{i}", shard, seed=i, rounds=3,
                            extra=fleet.device_args(f"dev-{i}")) for i, shard in enumerate(shards)]
    try:
        # Execute: with dev-0's step in flight, restart the broker; release the gradient only once
        # dev-0 has reconnected and sent the step again (the server sees it as a duplicate)
        wait_for(held.is_set, 180, "dev-0's held step")
        fleet.broker.restart()
        wait_for(lambda: "dev-0" in resent_by, 60, "dev-0 re-sending its step")
        release.set()
        runner.join(240)
        device_out = [d.communicate(timeout=60) for d in devices]
    finally:
        release.set()
        stop(devices)
    # Assert: every round counted with both devices, every step trained exactly once
    assert errors == [] and not runner.is_alive()
    assert all(d.returncode == 0 for d in devices), [e[-2000:] for _, e in device_out]
    records = read_round_records(cfg.metrics_path)
    assert [(r.round, r.counted) for r in records] == [(1, True), (2, True), (3, True)]  # no attempt lost
    for record in records:
        assert record.completed == ("dev-0", "dev-1"), record.failed
        for stats in record.devices.values():
            assert stats.steps == stats.device_steps == 4 * 6  # server-trained == device-taken
    summaries = [json.loads(o.split("sflam-device-summary ", 1)[1].splitlines()[0]) for o, _ in device_out]
    assert all(s["rounds"] == 3 for s in summaries)
    # the restart was felt: both devices connected twice, and dev-0 re-sent the step in flight
    assert [s["connections"] for s in summaries] == [2, 2]
    resent = [s["counters"].get("resent_activations", 0) for s in summaries]
    assert resent[0] >= 1, summaries[0]["counters"]
    final = records[-1].counters
    print(f"broker restart: {len(records)} attempts, resent steps {resent}, server duplicates "
          f"{final.get('receiver.duplicates', 0)}, re-answered {final.get('reanswered_steps', 0)}, "
          f"duplicate gradients at the devices {[s['counters'].get('duplicate_gradients', 0) for s in summaries]}")


def next_gradient(device: ScriptedDevice, timeout_s: float) -> p.Gradient | None:
    """The next Gradient on the device's down topic, read by a fresh Receiver (no duplicate filter)."""
    fresh, deadline = p.Receiver(RUN), time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        incoming = device.link.get(0.05)
        if incoming is not None and incoming.topic == device.topics.down(device.id):
            message = fresh.accept(incoming.payload, incoming.topic)
            if isinstance(message, p.Gradient):
                return message
    return None


def test_a_resent_step_is_answered_again_and_trained_once(broker, tmp_path: Path) -> None:
    # Prepare: one scripted device in a one-round run
    cfg = parse_config(config_text(broker.url, tmp_path / "ckpt", training__rounds=1, training__devices_per_round=1))
    daemon = ServerDaemon(cfg)
    runner = threading.Thread(target=daemon.run, daemon=True)
    runner.start()
    daemon.link.wait_connected(30)  # subscribed before the devices' first Hellos (not retained)
    device = ScriptedDevice(broker.url, "a")
    try:
        plan = device.wait_for(p.RoundPlan, 30)
        assert plan is not None
        round_ = plan.envelope.round
        device.activations(round_, daemon.trainer.tokens_shape)
        first = next_gradient(device, 20)
        # Execute: the device sends step 0 again, as it does when the gradient was lost on the way
        device.activations(round_, daemon.trainer.tokens_shape)
        again = next_gradient(device, 20)
        device.update(round_, daemon.trainer.device_weights())
        runner.join(60)
    finally:
        device.link.close()
    # Assert: the same reply came back, the step was trained once, the run ended normally
    assert first is not None and again is not None
    assert (again.envelope.round, again.envelope.step) == (first.envelope.round, first.envelope.step) == (round_, 0)
    assert again.tensor == first.tensor and again.loss == first.loss
    assert not runner.is_alive() and daemon.round == 1
    (record,) = read_round_records(cfg.metrics_path)
    assert record.counted and record.devices["a"].steps == 1
    assert record.counters["reanswered_steps"] == 1 and record.counters["receiver.duplicates"] == 1


def test_the_start_quorum_gates_only_the_first_round_and_the_run_goes_on_with_survivors(broker, tmp_path: Path) -> None:
    # Prepare: two rounds of one device each; the first round waits for both devices (min_devices),
    # and a later wait for two would end the run after 8 s
    cfg = parse_config(config_text(broker.url, tmp_path / "ckpt", training__rounds=2, training__devices_per_round=1,
                                   training__min_devices=2, round__wait_for_devices_s=8.0))
    daemon = ServerDaemon(cfg)
    errors: list[BaseException] = []
    runner = threading.Thread(target=_run_into, args=(daemon, errors), daemon=True)
    runner.start()
    daemon.link.wait_connected(30)
    devices = {name: ScriptedDevice(broker.url, name) for name in ("a", "b")}
    try:
        plan = devices["a"].wait_for(p.RoundPlan, 30)
        assert plan is not None and devices["b"].wait_for(p.RoundPlan, 10) is not None
        (chosen,) = [a.device_id for a in plan.allocations]
        survivor, leaver = devices[chosen], devices[{"a": "b", "b": "a"}[chosen]]
        # Execute: the device not chosen leaves for good during round 1; the chosen one finishes it
        survivor.activations(plan.envelope.round, daemon.trainer.tokens_shape)
        assert survivor.wait_for(p.Gradient, 20) is not None
        leaver.link.send(leaver.topics.status(leaver.id), p.Status(p.Envelope(RUN, 0, leaver.id), online=False),
                         retain=True)
        wait_for(lambda: daemon.registry.online() == [survivor.id], 20, "the leaver offline at the server")
        survivor.update(plan.envelope.round, daemon.trainer.device_weights())
        second = survivor.wait_for(p.RoundPlan, 30)
        assert second is not None
        survivor.train_one_step(second, daemon)
        runner.join(60)
    finally:
        for device in devices.values():
            device.link.close()
    # Assert: round 2 started with one device online, and both rounds counted
    assert errors == [] and not runner.is_alive() and daemon.round == 2
    records = read_round_records(cfg.metrics_path)
    assert [(r.round, r.counted, r.completed) for r in records] == [(1, True, (chosen,)), (2, True, (chosen,))]
    assert daemon.devices_needed() == 1
