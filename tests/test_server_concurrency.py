"""Devices are served concurrently: one device's slow step holds up neither the others nor the network loop."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edge_runtime import protocol as p
from edge_runtime.mqtt import LinkConfig, MqttLink
from edge_runtime.quantize import quantize
from server_runtime.config import parse_config
from server_runtime.daemon import ServerDaemon
from test_server import config_text

pytestmark = pytest.mark.broker
RUN = "srv"


class ScriptedDevice:
    """A device played by the test: announces itself, sends what it is told, collects replies."""

    def __init__(self, broker_url: str, device_id: str) -> None:
        self.id, self.topics, self.receiver = device_id, p.Topics(RUN), p.Receiver(RUN)
        self.link = MqttLink(broker_url, LinkConfig(client_id=f"test-{device_id}"))
        self.link.subscribe([self.topics.retained_filter("plan"), self.topics.retained_filter("model"),
                             self.topics.down(device_id)])
        self.link.start()
        env = p.Envelope(RUN, 0, device_id)
        self.link.send(self.topics.status(device_id), p.Status(env, online=True), retain=True)
        self.hello()

    def hello(self) -> None:
        env = p.Envelope(RUN, 0, self.id)
        self.link.send(self.topics.up(self.id), p.Hello(env, "raspberry-pi-5", "numpy", "test", 32))

    def wait_for(self, kind: type, timeout_s: float) -> p.Message | None:
        """The next message of type ``kind`` within ``timeout_s`` (others are skipped). While it waits
        for a RoundPlan it re-sends its Hello every second, as a real device's heartbeat does: a Hello
        sent before the server subscribed is lost, and the server selects only announced devices."""
        deadline = threading.Event()
        timer = threading.Timer(timeout_s, deadline.set)
        timer.start()
        next_hello = time.monotonic() + 1.0
        try:
            while not deadline.is_set():
                if kind is p.RoundPlan and time.monotonic() >= next_hello:
                    self.hello()
                    next_hello = time.monotonic() + 1.0
                incoming = self.link.get(0.05)
                if incoming is None:
                    continue
                message = self.receiver.accept(incoming.payload, incoming.topic)
                if isinstance(message, kind):
                    return message
            return None
        finally:
            timer.cancel()

    def activations(self, plan_round: int, tokens_shape: tuple[int, int]) -> None:
        rng = np.random.default_rng(len(self.id))
        tokens = rng.normal(size=(4, *tokens_shape)).astype(np.float32)
        message = p.Activations(p.Envelope(RUN, plan_round, self.id, 0), quantize(tokens, 8),
                                p.Tensor.from_numpy(rng.integers(0, 10, 4)))
        self.link.send(self.topics.up(self.id), message)

    def train_one_step(self, plan: p.RoundPlan, daemon: ServerDaemon) -> None:
        """The plan's round as one step: activations, their gradient (asserted), the update."""
        self.activations(plan.envelope.round, daemon.trainer.tokens_shape)
        assert self.wait_for(p.Gradient, 20) is not None
        self.update(plan.envelope.round, daemon.trainer.device_weights())

    def update(self, plan_round: int, weights: dict[str, np.ndarray]) -> None:
        telemetry = p.Telemetry(0.1, 0.1, 1.0, "estimated", 1, 1, 1)
        message = p.RoundUpdate(p.Envelope(RUN, plan_round, self.id, 1), plan_round, 4,
                                p.weights_from_numpy(weights), telemetry)
        self.link.send(self.topics.up(self.id), message)


def test_a_slow_step_blocks_neither_other_devices_nor_the_network_loop(broker, tmp_path: Path) -> None:
    # Prepare: device "a"'s server step blocks until the test releases it
    cfg = parse_config(config_text(broker.url, tmp_path / "ckpt", training__rounds=1, training__devices_per_round=2,
                                   compute__workers=2))
    daemon = ServerDaemon(cfg)
    gate, served = threading.Event(), []
    step = daemon.trainer.step

    def gated_step(device_id: str, *args, **kwargs):
        if device_id == "a":
            gate.wait(30)
        served.append(device_id)
        return step(device_id, *args, **kwargs)

    daemon.trainer.step = gated_step
    runner = threading.Thread(target=daemon.run, daemon=True)
    runner.start()
    daemon.link.wait_connected(30)  # subscribed before the devices' first Hellos (not retained)
    a, b = ScriptedDevice(broker.url, "a"), ScriptedDevice(broker.url, "b")
    try:
        plan = a.wait_for(p.RoundPlan, 30)
        assert plan is not None and b.wait_for(p.RoundPlan, 10) is not None
        round_ = plan.envelope.round
        # Execute: a's step is stuck; b's must be answered, and a late Hello must still be handled
        a.activations(round_, daemon.trainer.tokens_shape)
        b.activations(round_, daemon.trainer.tokens_shape)
        b_gradient = b.wait_for(p.Gradient, 20)
        late = ScriptedDevice(broker.url, "late")
        registry_saw_late = False
        for _ in range(100):
            if "late" in daemon.registry.online():
                registry_saw_late = True
                break
            threading.Event().wait(0.05)
        a_before_release = a.wait_for(p.Gradient, 0.5)
        gate.set()
        a_gradient = a.wait_for(p.Gradient, 20)
        weights = daemon.trainer.device_weights()
        a.update(round_, weights)
        b.update(round_, weights)
        runner.join(60)
    finally:
        gate.set()
        for device in (a, b):
            device.link.close()
    # Assert
    assert b_gradient is not None and b_gradient.envelope.step == 0
    assert registry_saw_late
    assert a_before_release is None and a_gradient is not None
    assert served[0] == "b"
    assert not runner.is_alive() and daemon.round == 1
    late.link.close()


def test_each_plan_carries_the_rounds_learning_rate_and_the_servers_optimizer(broker, tmp_path: Path) -> None:
    # Prepare: two rounds of AdamW under a cosine schedule, one scripted device
    cfg = parse_config(config_text(broker.url, tmp_path / "ckpt", training__rounds=2, training__devices_per_round=1,
                                   training__optimizer="adamw", training__lr=0.01, training__lr_schedule="cosine",
                                   training__lr_min=0.001, training__weight_decay=0.05))
    daemon = ServerDaemon(cfg)
    runner = threading.Thread(target=daemon.run, daemon=True)
    runner.start()
    daemon.link.wait_connected(30)
    device = ScriptedDevice(broker.url, "a")
    plans, server_lrs = [], []
    try:
        # Execute: train both rounds, noting each plan and the server optimizer's rate
        for _ in range(2):
            plan = device.wait_for(p.RoundPlan, 30)
            assert plan is not None
            plans.append(plan)
            server_lrs.append(daemon.trainer.spec.lr)
            device.train_one_step(plan, daemon)
        runner.join(60)
    finally:
        device.link.close()
    # Assert: round 1 at lr, round 2 halfway to lr_min, on both sides; the optimizer and decay travel
    assert not runner.is_alive() and daemon.round == 2
    assert [plan.lr for plan in plans] == pytest.approx([0.01, 0.0055]) == server_lrs
    assert {(plan.optimizer, plan.momentum, plan.weight_decay) for plan in plans} == {("adamw", 0.9, 0.05)}
