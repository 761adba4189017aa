"""The server trainer and coordinator on their own: V1 aggregation, V2 rollback, steps, selection."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from edge_runtime import protocol as p
from edge_runtime.quantize import dequantize, quantize
from server_runtime.checkpoint import create_model
from server_runtime.config import OPTIMIZERS
from server_runtime.coordinator import DeviceRegistry, DeviceRound, FixedAllocation, RoundState, select_devices
from server_runtime.trainer import OptimizerSpec, SplitTrainer, StepError

PRESET = "vit_quick_patch4_16"


def make_trainer(mode: str, lr: float = 0.05) -> SplitTrainer:
    return SplitTrainer(create_model(PRESET, num_classes=10, seed=0), mode, OptimizerSpec("sgd", lr, 0.9))


def batch(trainer: SplitTrainer, seed: int, size: int = 6):
    rng = np.random.default_rng(seed)
    tokens = rng.normal(size=(size, *trainer.tokens_shape)).astype(np.float32)
    return quantize(tokens, 32), rng.integers(0, 10, size)


def device_upload(trainer: SplitTrainer, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (v + rng.normal(scale=0.1, size=v.shape)).astype(np.float32) for k, v in trainer.device_weights().items()}


def test_v1_aggregate_is_the_sample_weighted_mean_of_differing_copies() -> None:
    # Prepare: three copies trained on different batches
    trainer = make_trainer("v1")
    ids = ("a", "b", "c")
    trainer.begin_round(ids)
    for i, device_id in enumerate(ids):
        for step in range(2):
            tensor, labels = batch(trainer, 10 * i + step)
            trainer.step(device_id, tensor, labels, 32)
    copies = {d: copy.deepcopy(trainer.copies[d].part.state_dict()) for d in ids}
    uploads = {d: device_upload(trainer, i) for i, d in enumerate(ids)}
    counts = {"a": 10, "b": 30, "c": 60}
    # Execute
    trainer.finish_round({d: (uploads[d], counts[d]) for d in ids})
    # Assert: the copies differ (no aliasing) and the global model is their weighted mean
    name = "blocks.0.attn.qkv.weight"
    assert not torch.allclose(copies["a"][name], copies["b"][name])
    server = trainer.halves.server.state_dict()
    for key, value in server.items():
        expected = sum(counts[d] * copies[d][key].double() for d in ids) / 100.0
        torch.testing.assert_close(value.double(), expected, rtol=1e-6, atol=1e-7)
    device = trainer.halves.device.state_dict()
    for key, value in device.items():
        expected = sum(counts[d] * uploads[d][key].astype(np.float64) for d in ids) / 100.0
        np.testing.assert_allclose(value.numpy(), expected, rtol=1e-6, atol=1e-7)
    assert not np.allclose(device["patch_embed.proj.weight"].numpy(), uploads["c"]["patch_embed.proj.weight"])


def test_v1_copies_start_from_the_global_model_and_the_optimizer_persists_across_batches() -> None:
    trainer = make_trainer("v1")
    before = copy.deepcopy(trainer.halves.server.state_dict())
    trainer.begin_round(["a"])
    tensor, labels = batch(trainer, 1)
    trainer.step("a", tensor, labels, 32)
    trainer.step("a", tensor, labels, 32)
    state = trainer.copies["a"].optimizer.state_dict()["state"]
    assert state and all("momentum_buffer" in s for s in state.values())
    for key, value in trainer.halves.server.state_dict().items():  # the global model is untouched
        torch.testing.assert_close(value, before[key])


def test_v2_abort_restores_the_round_start_model_and_optimizer() -> None:
    trainer = make_trainer("v2")
    trainer.begin_round(["a"])
    tensor, labels = batch(trainer, 2)
    trainer.step("a", tensor, labels, 32)
    trainer.finish_round({"a": (trainer.device_weights(), 5)})
    start_model = copy.deepcopy(trainer.state_dict())
    start_opt = copy.deepcopy(trainer.optimizer_state())
    trainer.begin_round(["a", "b"])
    trainer.step("b", *batch(trainer, 3), 32)
    assert not torch.equal(trainer.state_dict()["head.weight"], start_model["head.weight"])
    trainer.abort_round()
    for key, value in trainer.state_dict().items():
        torch.testing.assert_close(value, start_model[key], rtol=0, atol=0)
    restored = trainer.optimizer_state()["state"]
    for index, entry in start_opt["state"].items():
        torch.testing.assert_close(restored[index]["momentum_buffer"], entry["momentum_buffer"], rtol=0, atol=0)


def test_step_returns_the_activation_gradient_quantized_as_asked() -> None:
    trainer = make_trainer("v2")
    trainer.begin_round(["a"])
    tensor, labels = batch(trainer, 4)
    reference = copy.deepcopy(trainer.halves.server)
    x = torch.from_numpy(dequantize(tensor)).requires_grad_(True)
    torch.nn.functional.cross_entropy(reference(x), torch.from_numpy(labels)).backward()
    result = trainer.step("a", tensor, labels, 8)
    assert result.gradient.bits == 8 and result.gradient.shape == tuple(x.shape)
    delta = (result.gradient.hi - result.gradient.lo) / 255
    assert np.all(np.abs(dequantize(result.gradient) - x.grad.numpy()) <= delta * 1.0001 + 1e-9)
    assert result.loss > 0 and result.server_time_s > 0


@pytest.mark.parametrize("bad", ["shape", "labels", "range", "stranger"])
def test_bad_batches_are_refused_with_a_typed_error(bad: str) -> None:
    trainer = make_trainer("v1")
    trainer.begin_round(["a"])
    tensor, labels = batch(trainer, 5)
    device_id = "a"
    if bad == "shape":
        tensor = quantize(np.zeros((2, 3, 4), np.float32), 32)
    elif bad == "labels":
        labels = labels[:-1]
    elif bad == "range":
        labels = labels + 10
    else:
        device_id = "zz"
    with pytest.raises(StepError):
        trainer.step(device_id, tensor, labels, 32)


def test_bad_uploads_are_refused() -> None:
    trainer = make_trainer("v1")
    weights = trainer.device_weights()
    trainer.check_device_weights(weights)
    nan = {k: v.copy() for k, v in weights.items()}
    nan["patch_embed.proj.bias"][0] = np.nan
    for bad in (nan, {"patch_embed.proj.weight": weights["patch_embed.proj.weight"]},
                {**weights, "patch_embed.proj.bias": np.zeros(3, np.float32)}):
        with pytest.raises(StepError):
            trainer.check_device_weights(bad)


def test_selection_is_seeded_and_without_replacement() -> None:
    online = [f"d{i}" for i in range(10)]
    first = select_devices(online, 4, seed=1, plan_round=3)
    assert first == select_devices(online, 4, seed=1, plan_round=3)
    assert len(set(first)) == 4 and set(first) <= set(online)
    assert any(select_devices(online, 4, seed=1, plan_round=r) != first for r in range(4, 10))
    assert select_devices(online[:2], 4, seed=1, plan_round=1) == ("d0", "d1")


def test_registry_follows_hello_status_and_will() -> None:
    registry = DeviceRegistry()
    env = p.Envelope("r", 0, "a")
    registry.on_hello(p.Hello(env, "raspberry-pi-5", "numpy", "0.1.0", 120))
    registry.on_status(p.Status(p.Envelope("r", 0, "b"), online=True))
    assert registry.online() == ["a"]  # b is online by its retained Status, but has not said who it is
    registry.on_hello(p.Hello(p.Envelope("r", 0, "b"), "jetson-orin-nano", "onnx", "0.1.0", 80, heartbeat=True))
    assert registry.online() == ["a", "b"] and registry.devices["b"].profile == "jetson-orin-nano"
    registry.on_status(p.Status(p.Envelope("r", 0, "b"), online=False, reason="connection lost"))
    assert registry.online() == ["a"] and registry.devices["a"].num_samples == 120


def test_fixed_allocation_splits_bandwidth_and_uses_profile_power() -> None:
    registry = DeviceRegistry()
    registry.on_hello(p.Hello(p.Envelope("r", 0, "a"), "raspberry-pi-5", "numpy", "0.1.0", 10))
    allocations = FixedAllocation(4, 32, True, 20e6).allocate(("a", "b"), registry)
    assert [a.bandwidth_hz for a in allocations] == [10e6, 10e6]
    assert allocations[0].tx_power_w > 0 and allocations[0].bits_up == 4 and allocations[0].per_token


def test_round_state_deadline_failures_and_completion_policy() -> None:
    alloc = p.Allocation("x", 8, 32, 0.1, 1e6)
    state = RoundState(1, 1, {d: DeviceRound(alloc) for d in ("a", "b", "c")}, deadline=100.0, lr=0.05)
    state.devices["a"].update = object()  # type: ignore[assignment]
    state.fail("b", "offline")
    state.expire(50.0)
    assert not state.done
    state.expire(100.0)
    assert state.done and state.failures() == {"b": "offline", "c": "deadline"}
    assert state.counts(0.3) and not state.counts(0.5)


def test_an_offline_device_fails_only_if_not_back_within_the_grace() -> None:
    # Prepare: a and b go offline at t = 10; a comes back at t = 14
    alloc = p.Allocation("x", 8, 32, 0.1, 1e6)
    state = RoundState(1, 1, {d: DeviceRound(alloc) for d in ("a", "b")}, deadline=100.0, lr=0.05)
    state.went_offline("a", "connection lost", 10.0)
    state.went_offline("b", "connection lost", 10.0)
    state.went_offline("b", "again", 12.0)  # the first report's time and reason stand
    # Execute / Assert
    state.expire(14.0, offline_grace_s=5.0)
    state.came_online("a")
    assert state.failures() == {}
    state.expire(15.0, offline_grace_s=5.0)
    assert state.failures() == {"b": "offline (connection lost)"}
    state.expire(99.0, offline_grace_s=5.0)
    assert "a" not in state.failures()


def test_with_no_grace_an_offline_device_fails_at_once() -> None:
    state = RoundState(1, 1, {"a": DeviceRound(p.Allocation("x", 8, 32, 0.1, 1e6))}, deadline=100.0, lr=0.05)
    state.went_offline("a", "shutdown", 10.0)
    state.expire(10.0)
    assert state.failures() == {"a": "offline (shutdown)"}


def test_bf16_autocast_step_trains_and_returns_float32_gradients() -> None:
    trainer = SplitTrainer(create_model(PRESET, num_classes=10, seed=0), "v2", OptimizerSpec("sgd", 0.05, 0.9), bf16=True)
    trainer.begin_round(["a"])
    tensor, labels = batch(trainer, 6)
    before = trainer.state_dict()["head.weight"].clone()
    result = trainer.step("a", tensor, labels, 32)
    grad = dequantize(result.gradient)
    assert grad.dtype == np.float32 and np.isfinite(grad).all() and np.abs(grad).max() > 0
    assert np.isfinite(result.loss)
    assert not torch.equal(trainer.state_dict()["head.weight"], before)
    assert trainer.state_dict()["head.weight"].dtype == torch.float32  # master weights stay fp32


def test_pick_device_and_bf16_policy() -> None:
    from server_runtime.trainer import pick_device, use_bf16

    assert pick_device("cpu").type == "cpu"
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            pick_device("cuda")
    assert use_bf16("bf16", torch.device("cpu")) and not use_bf16("auto", torch.device("cpu"))
    assert use_bf16("auto", torch.device("cuda")) and not use_bf16("off", torch.device("cuda"))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_run_toml_accepts_is_built(name: str) -> None:
    # Prepare
    params = [torch.nn.Parameter(torch.zeros(2))]

    # Execute
    optimizer = OptimizerSpec(name, lr=0.1, weight_decay=0.01).build(params)

    # Assert
    assert type(optimizer).__name__.lower() == name
    assert optimizer.defaults["lr"] == 0.1 and optimizer.defaults["weight_decay"] == 0.01


def test_an_unknown_optimizer_is_refused_naming_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"optimizer must be one of \('sgd', 'adam', 'adamw'\), got 'lion'"):
        OptimizerSpec("lion").build([torch.nn.Parameter(torch.zeros(2))])


def test_a_round_counts_each_outage_and_how_long_it_lasted(monkeypatch) -> None:
    """What a device's round record says about a dead link: outages, time offline, and the
    offline report that repeats while it is away is not a second outage."""
    alloc = p.Allocation("a", 8, 32, 0.1, 1e6)
    state = RoundState(1, 1, {"a": DeviceRound(alloc), "b": DeviceRound(alloc)}, deadline=100.0, lr=0.05)
    clock = iter([12.5, 30.0])
    monkeypatch.setattr("server_runtime.coordinator.time.monotonic", lambda: next(clock))
    state.went_offline("a", "connection lost", 10.0)
    state.went_offline("a", "connection lost", 11.0)  # its will again: the same outage
    state.came_online("a")  # at 12.5
    state.went_offline("a", "connection lost", 20.0)
    state.came_online("a")  # at 30.0
    assert state.devices["a"].outages == 2
    assert state.devices["a"].offline_s == pytest.approx(2.5 + 10.0)
    assert state.devices["b"].outages == 0 and state.devices["b"].offline_s == 0.0
