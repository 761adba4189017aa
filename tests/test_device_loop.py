"""The device loop against a real mosquitto on loopback and a scripted numpy server peer.

The harness replays every gradient it sends through ``NumpyBackend.train_step`` and checks each
activation against its own replayed weights, so the final weights prove that every gradient was
applied once, in order. The device runs as a subprocess (``python -m sflam device``) that reports
whether torch entered its ``sys.modules``; every backend (numpy reference, ONNX Runtime, LiteRT)
trains a round that way.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edge_runtime import protocol as p
from edge_runtime.backends.numpy_backend import NumpyBackend
from edge_runtime.bundle import load_weights
from edge_runtime.data import Preprocess, load_data
from edge_runtime.mqtt import LinkConfig, MqttLink
from edge_runtime.quantize import dequantize, quantize, step_sizes

ROOT = Path(__file__).resolve().parents[1]
RUN, DEVICE, SEED = "t1", "dev-a", 7
NUM_SAMPLES, BATCH, EPOCHS, LR = 10, 4, 2, 0.05  # 3 batches per epoch (last ragged), 6 steps

pytestmark = pytest.mark.broker


@pytest.fixture()
def bundle(quick_bundle: Path) -> Path:
    return quick_bundle


@pytest.fixture()
def data_file(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "data.npz"
    np.savez(path, images=rng.integers(0, 256, (NUM_SAMPLES, 32, 32, 3), dtype=np.uint8),
             labels=rng.integers(0, 10, NUM_SAMPLES))
    return path


def expected_batches(bundle: Path, data_file: Path, round_: int,
                     drop_last: bool = False) -> list[tuple[np.ndarray, np.ndarray]]:
    """The device's batches, rebuilt with its documented seeding (seed, round, 0, epoch); a
    fixed-batch backend (LiteRT) drops the ragged last one."""
    data = load_data(f"npz:{data_file}", Preprocess.from_device_json(json.loads((bundle / "device.json").read_text())))
    out = []
    for epoch in range(EPOCHS):
        out += list(data.batches(BATCH, np.random.default_rng((SEED, round_, 0, epoch)), drop_last=drop_last))
    return out


class ServerPeer:
    """Scripted server: retained model + plan, checks activations, replies gradients, replays them."""

    def __init__(self, broker, weights: dict, batches: list, restart_at_step: int | None = None) -> None:
        self.broker, self.batches, self.restart_at = broker, batches, restart_at_step
        self.w, self.b = weights["patch_embed.proj.weight"].copy(), weights["patch_embed.proj.bias"].copy()
        self.start_weights = weights
        self.mw, self.mb = np.zeros_like(self.w), np.zeros_like(self.b)
        self.numpy = NumpyBackend()
        self.topics, self.receiver = p.Topics(RUN), p.Receiver(RUN)
        self.steps_seen: list[int] = []
        self.pending: dict[int, p.Gradient] = {}
        self.update: p.RoundUpdate | None = None
        self.errors: list[str] = []
        self.restarted = False
        self.doubled = 0
        self.activation_bytes = 0  # payload bytes of (unchunked) Activations, re-sends included
        self.link = MqttLink(broker.url, LinkConfig(client_id="harness", reconnect_min_s=0.05, reconnect_max_s=0.5))

    def publish_round(self) -> None:
        env = p.Envelope(RUN, 1, "server")
        model = p.ModelWeights(env, 3, p.weights_from_numpy(self.start_weights))
        plan = p.RoundPlan(env, 3, 30.0, EPOCHS, BATCH, LR, (p.Allocation(DEVICE, 4, 32, 0.1, 1e6, True),))
        self.link.send(self.topics.model(), model, retain=True)
        self.link.send(self.topics.plan(), plan, retain=True)

    def serve(self, timeout_s: float = 45.0) -> None:
        self.link.subscribe([self.topics.up(DEVICE)])
        self.link.start()
        self.publish_round()
        deadline = time.monotonic() + timeout_s
        while self.update is None and time.monotonic() < deadline:
            incoming = self.link.get(0.2)
            if incoming is not None:
                self.handle(incoming)
        self.link.close()

    def handle(self, incoming) -> None:
        seen = self.receiver.counters["duplicates"] + self.receiver.reassembler.counters["late_chunks"]
        message = self.receiver.accept(incoming.payload, incoming.topic)
        resent = self.receiver.counters["duplicates"] + self.receiver.reassembler.counters["late_chunks"] > seen
        if message is None and resent and self.pending:
            step = min(self.pending)  # the device re-sent a step we withheld: answer it now
            self.link.send(self.topics.down(DEVICE), self.pending.pop(step))
        elif isinstance(message, p.Activations):
            self.activation_bytes += len(incoming.payload)
            self.on_activations(message)
        elif isinstance(message, p.RoundUpdate):
            self.update = message

    def on_activations(self, message: p.Activations) -> None:
        step = message.envelope.step
        self.steps_seen.append(step)
        images, labels = self.batches[step]
        deq = dequantize(message.tensor)
        tokens = self.numpy.embed(images, self.w, self.b)
        delta = step_sizes(message.tensor.lo, message.tensor.hi, message.tensor.bits).reshape(*tokens.shape[:2], 1)
        if not np.array_equal(message.labels.to_numpy(), labels):
            self.errors.append(f"step {step}: labels differ")
        if np.any(np.abs(deq - tokens) > delta * 1.0001 + 1e-5):
            self.errors.append(f"step {step}: activations are not Q(embed(images, replayed weights))")
        grad = np.float32(1e-2) * deq  # the deterministic "server gradient"
        self.w, self.b, self.mw, self.mb = self.numpy.train_step(self.w, self.b, self.mw, self.mb, images, grad, LR, 0.9)
        reply = p.Gradient(p.Envelope(RUN, 1, DEVICE, step), quantize(grad, 32), 0.0)
        if step == self.restart_at and not self.restarted:
            self.restarted = True
            self.pending[step] = reply
            generation = self.link.connections
            self.broker.restart()  # the device must notice, reconnect and re-send this step
            deadline = time.monotonic() + 10
            while self.link.connections == generation and time.monotonic() < deadline:
                time.sleep(0.02)
            return
        self.doubled += 1
        for _ in range(2):  # every gradient twice: the device must apply it once
            self.link.send(self.topics.down(DEVICE), reply)


def run_device(bundle: Path, broker, data_file: Path, max_frame_bytes: int,
               extra: tuple[str, ...] = ("--meter", "estimate"), backend: str = "numpy") -> subprocess.Popen:
    cmd = [sys.executable, "-m", "sflam", "device", "--bundle", str(bundle), "--broker", broker.url,
           "--device-id", DEVICE, "--data", f"npz:{data_file}", "--backend", backend, "--run-id", RUN,
           "--rounds", "1", "--seed", str(SEED), "--max-frame-bytes", str(max_frame_bytes), *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def round_trip(bundle: Path, broker, data_file: Path, restart_at_step: int | None,
               max_frame_bytes: int, extra: tuple[str, ...] = ("--meter", "estimate"),
               backend: str = "numpy") -> tuple[ServerPeer, dict]:
    batches = expected_batches(bundle, data_file, 1, drop_last=backend == "litert")
    peer = ServerPeer(broker, load_weights(bundle), batches, restart_at_step)
    thread = threading.Thread(target=peer.serve, daemon=True)
    thread.start()
    device = run_device(bundle, broker, data_file, max_frame_bytes, extra, backend)
    out, err = device.communicate(timeout=60)
    thread.join(10)
    assert device.returncode == 0, err[-3000:]
    line = next(l for l in out.splitlines() if l.startswith("sflam-device-summary "))
    return peer, json.loads(line.split(" ", 1)[1])


def check_round(peer: ServerPeer, summary: dict, backend: str = "numpy") -> None:
    per_epoch = NUM_SAMPLES // BATCH if backend == "litert" else -(-NUM_SAMPLES // BATCH)
    steps = EPOCHS * per_epoch
    assert summary["backend"] == backend
    assert peer.errors == []
    assert peer.update is not None
    assert sorted(set(peer.steps_seen)) == list(range(steps))
    final = p.weights_to_numpy(peer.update.weights)
    np.testing.assert_allclose(final["patch_embed.proj.weight"], peer.w, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(final["patch_embed.proj.bias"], peer.b, rtol=1e-5, atol=1e-7)
    assert not np.allclose(final["patch_embed.proj.bias"], peer.start_weights["patch_embed.proj.bias"])
    tel = peer.update.telemetry
    assert tel.steps == steps and tel.energy_j > 0 and tel.energy_source == "estimated"
    assert tel.bytes_sent > 0 and tel.bytes_received > 0
    assert peer.update.num_samples == min(per_epoch * BATCH, NUM_SAMPLES)
    assert summary["torch_loaded"] is False
    # every gradient was sent twice; the last copy may arrive after the device has finished
    assert summary["counters"]["duplicate_gradients"] >= peer.doubled - 1


@pytest.mark.parametrize("backend", ["numpy", "onnx", "litert"])
def test_one_round(backend: str, bundle: Path, quick_tflite_bundle: Path, broker, data_file: Path) -> None:
    # Prepare: the LiteRT backend runs the TFLite bundle (fixed batch), the others the ONNX one
    artifacts = quick_tflite_bundle if backend == "litert" else bundle
    # Execute: one round in a device process, activations in 1500-byte frames
    peer, summary = round_trip(artifacts, broker, data_file, restart_at_step=None, max_frame_bytes=1500,
                               backend=backend)
    # Assert: the harness's replay of every gradient matches the device's weights; no torch loaded
    check_round(peer, summary, backend)
    assert peer.steps_seen == list(range(len(peer.batches)))  # every step exactly once, in order
    assert peer.receiver.counters["duplicates"] == 0
    assert peer.receiver.counters["chunks"] > 0  # 1500-byte frames: activations travel chunked


def test_reconnect_mid_round(bundle: Path, broker, data_file: Path) -> None:
    peer, summary = round_trip(bundle, broker, data_file, restart_at_step=2, max_frame_bytes=256 * 1024)
    check_round(peer, summary)
    assert peer.restarted
    assert summary["counters"]["resent_activations"] >= 1
    assert peer.receiver.counters["duplicates"] >= 1  # the re-sent step 2 was deduplicated
    assert peer.steps_seen.count(2) == 1


def test_emulated_link_paces_uplink_and_counts_radio_energy(bundle: Path, broker, data_file: Path) -> None:
    from edge_runtime.link import channel_gain_from_distance, uplink_rate_bps

    peer, summary = round_trip(bundle, broker, data_file, restart_at_step=None, max_frame_bytes=256 * 1024,
                               extra=("--meter", "estimate", "--emulate-link", "--distance-m", "500"))
    check_round(peer, summary)
    assert summary["emulated_link"] is True
    tx_power_w, bandwidth_hz = 0.1, 1e6  # the harness plan's Allocation(DEVICE, 4, 32, 0.1, 1e6, True)
    rate = uplink_rate_bps(bandwidth_hz, tx_power_w, channel_gain_from_distance(500.0))
    airtime = peer.activation_bytes * 8 / rate
    assert peer.activation_bytes > 0
    tel = peer.update.telemetry
    assert tel.uplink_time_s >= airtime
    assert tel.energy_j >= tx_power_w * airtime
