"""A fleet page fed by a synthetic fleet: N devices and R round records built through the real
:class:`~server_runtime.fleet_view.FleetView` (tests and benchmarks of the page at 1,000 devices,
which no machine here trains at once; docs/dashboard.md)."""

from __future__ import annotations

import time

import numpy as np

from edge_runtime import protocol as p
from server_runtime.coordinator import DeviceInfo, DeviceRegistry, DeviceRound, RoundState
from server_runtime.fleet_view import FleetView
from server_runtime.round_record import RoundRecord

PROFILES = ("raspberry-pi-5", "jetson-orin-nano", "android-flagship", "android-midrange")
BITS = (2, 4, 6, 8)


def synthetic_registry(devices: int, seed: int = 0) -> DeviceRegistry:
    """``devices`` announced devices, about one in twenty offline."""
    rng = np.random.default_rng(seed)
    registry, now = DeviceRegistry(), time.time()
    for k in range(devices):
        device_id = f"dev-{k:05d}"
        registry.devices[device_id] = DeviceInfo(
            device_id, online=bool(rng.random() > 0.05), profile=PROFILES[k % len(PROFILES)], backend="onnx",
            num_samples=int(rng.integers(20, 400)), last_seen=now - float(rng.uniform(0, 60)), announced=True)
    return registry


def synthetic_record(plan_round: int, selected: list[str], rng: np.random.Generator) -> RoundRecord:
    """One round record of ``selected`` devices with plausible figures (a few failures)."""
    failed = {d: str(rng.choice(["deadline", "offline (link lost)"])) for d in selected if rng.random() < 0.05}
    completed = sorted(d for d in selected if d not in failed)
    progress = 1.0 - np.exp(-plan_round / 8.0)
    devices = {d: _device_figures(rng, d in failed) for d in selected}
    allocator = {"status": "optimal", "objective": 3.0 - progress, "solve_time_s": 0.05, "iterations": 3,
                 "predicted_round_latency_s": 2.0 + rng.random(), "predicted_energy_j": 5.0 + rng.random(),
                 "fixed_objective": 4.0, "fixed_round_latency_s": 3.5 + rng.random(), "fixed_energy_j": 8.0}
    return RoundRecord.from_dict({
        "event": "round", "round": plan_round, "plan_round": plan_round, "counted": True, "mode": "v1",
        "time": time.time(), "selected": sorted(selected), "completed": completed, "failed": failed,
        "accuracy": 0.3 + 0.6 * progress, "test_loss": 2.0 - 1.5 * progress, "train_loss": 1.9 - 1.5 * progress,
        "validation_accuracy": 0.28 + 0.6 * progress, "samples": 200 * len(completed), "duration_s": 12.0,
        "phases_s": {"wait_devices": 0.2, "train": 10.0 + rng.random(), "aggregate": 0.3, "evaluate": 0.8,
                     "checkpoint": 0.1},
        "bytes_broadcast": 40_000, "devices": devices, "counters": {"accepted.activations": 100 * plan_round},
        "allocator": allocator,
    })


def _device_figures(rng: np.random.Generator, failed: bool) -> dict:
    bits = int(rng.choice(BITS))
    return {"bytes_up": 0 if failed else int(rng.integers(50_000, 500_000)),
            "bytes_down": 0 if failed else int(rng.integers(50_000, 500_000)), "steps": 0 if failed else 12,
            "server_time_s": 0.5, "downlink_time_s": 0.1, "compute_time_s": None if failed else 3.0,
            "uplink_time_s": None if failed else 1.0, "device_steps": None if failed else 12,
            "energy_j": None if failed else float(rng.uniform(0.5, 3.0)), "energy_source": "estimated",
            "allocation": {"bits_up": bits, "bits_down": 8, "tx_power_w": float(rng.uniform(0.05, 0.2)),
                           "bandwidth_hz": float(rng.uniform(1e5, 2e6))}}


def synthetic_view(devices: int = 1000, rounds: int = 30, per_round: int = 50, seed: int = 0) -> FleetView:
    """A FleetView of ``devices`` devices after ``rounds`` rounds of ``per_round`` each, with the
    next round in flight (some devices training, some done, one failed)."""
    rng = np.random.default_rng(seed)
    registry = synthetic_registry(devices, seed)
    ids = sorted(registry.devices)
    run = {"run_id": "synthetic", "mode": "v1", "preset": "vit_quick_patch4_16", "rounds": rounds + 10,
           "devices_per_round": per_round, "bits": "auto", "deadline_s": 300.0, "started": time.time() - 600}
    view = FleetView(run)
    for plan_round in range(1, rounds + 1):
        view.add_round(synthetic_record(plan_round, list(rng.choice(ids, size=min(per_round, devices), replace=False)),
                                        rng))
    selected = sorted(rng.choice(ids, size=min(per_round, devices), replace=False))
    state = RoundState(rounds + 1, rounds + 1, {}, time.monotonic() + 300.0, 0.001)
    for k, device_id in enumerate(selected):
        member = DeviceRound(p.Allocation(device_id, int(rng.choice(BITS)), 8, 0.1, 1e6, False), steps=k % 13)
        if k == 0:
            member.failure = "offline (link lost)"
        state.devices[device_id] = member
    view.refresh(registry, state, round=rounds, plan_round=rounds + 1, needed=per_round)
    return view
