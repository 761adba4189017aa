"""quant.bits = "auto": the allocator in the server's loop, recalibrated by device telemetry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from allocator.scenario import infer_model
from allocator.system import compute_energy_j, compute_time_s, shannon_rate_bps
from edge_runtime import protocol as p
from server_runtime.auto_allocation import AutoAllocation
from server_runtime.config import parse_config
from server_runtime.coordinator import DeviceRegistry
from server_runtime.metrics import read_round_records
from server_runtime.presets import get_preset
from test_server import config_text, start_device, start_server, stop, write_shards

AUTO = '[quant]\nbits = "auto"\n[training]\nlocal_epochs = 2\n'


def registry_with(*devices: tuple[str, str, int]) -> DeviceRegistry:
    registry = DeviceRegistry()
    for device_id, profile, samples in devices:
        registry.on_hello(p.Hello(p.Envelope("r", 0, device_id), profile, "numpy", "0.1.0", samples))
    return registry


def test_telemetry_recalibrates_compute_energy_and_channel() -> None:
    # Prepare
    auto = AutoAllocation(parse_config(AUTO), get_preset("vit_quick_patch4_16"))
    registry = registry_with(("a", "raspberry-pi-5", 100))
    allocation = p.Allocation("a", 4, 32, 0.1, 1e6)
    telemetry = p.Telemetry(compute_time_s=0.5, uplink_time_s=0.1, energy_j=2.0, energy_source="estimated",
                            bytes_sent=100_000, bytes_received=1, steps=8)
    update = p.RoundUpdate(p.Envelope("r", 1, "a", 8), 1, 100, (), telemetry)
    before = auto.problem(("a",), registry)
    # Execute
    auto.observe_round("a", "raspberry-pi-5", update, allocation, server_time_s=0.3)
    after = auto.problem(("a",), registry)
    # Assert: the model now predicts what the device measured
    assert not np.isclose(compute_time_s(before.fleet)[0], 0.5)
    assert compute_time_s(after.fleet)[0] == pytest.approx(0.5, rel=1e-9)
    assert compute_energy_j(after.fleet)[0] == pytest.approx(2.0 - 0.1 * 0.1, rel=1e-9)
    rate = shannon_rate_bps(np.array([1e6]), np.array([0.1]), after.fleet.gain, after.params.noise_psd_w_per_hz)
    assert rate[0] == pytest.approx(8 * 100_000 / 0.1, rel=1e-9)
    assert after.params.server_cycles_per_sample * 1.0 == pytest.approx(0.3 / 200)  # seconds per sample (f_S = 1)


def test_server_time_calibration_follows_the_server_both_ways_and_shrugs_off_one_slow_round() -> None:
    # Prepare: 100 samples x 2 local epochs per update, so server seconds per sample = time / 200
    auto = AutoAllocation(parse_config(AUTO), get_preset("vit_quick_patch4_16"))
    registry = registry_with(("a", "raspberry-pi-5", 100))
    telemetry = p.Telemetry(0.5, 0.1, 2.0, "estimated", 100_000, 1, 8)
    allocation = p.Allocation("a", 4, 32, 0.1, 1e6)

    def observe(server_time_s: float) -> float:
        update = p.RoundUpdate(p.Envelope("r", 1, "a", 8), 1, 100, (), telemetry)
        auto.observe_round("a", "raspberry-pi-5", update, allocation, server_time_s=server_time_s)
        return auto.problem(("a",), registry).params.server_cycles_per_sample  # f_S = 1: seconds

    # Execute / Assert: one slow round (a loaded host) among normal ones leaves the estimate alone
    for _ in range(10):
        observe(0.2)
    assert observe(20.0) == pytest.approx(0.2 / 200)
    # a server that became faster brings the estimate down once its window holds mostly fast steps
    for _ in range(40):
        faster = observe(0.1)
    assert faster == pytest.approx(0.1 / 200)
    # the old rule (the maximum ever seen) would still say 20 s
    assert max(auto.server_times) == pytest.approx(0.1 / 200)


def test_known_channel_gains_replace_the_default_path_loss() -> None:
    # Prepare: a gain for a, none for b
    config = parse_config(AUTO + '[allocator]\nchannel_gains = { "a" = 2.5e-12 }\n')
    auto = AutoAllocation(config, get_preset("vit_quick_patch4_16"))
    # Execute
    fleet = auto.problem(("a", "b"), registry_with(("a", "raspberry-pi-5", 100), ("b", "raspberry-pi-5", 100))).fleet
    # Assert: b is at allocator.default_distance_m (100 m): 128.1 + 37.6 log10(0.1) dB
    assert fleet.gain[0] == 2.5e-12
    assert fleet.gain[1] == pytest.approx(10 ** (-(128.1 - 37.6) / 10), rel=1e-12)


def test_bad_channel_gains_are_listed() -> None:
    with pytest.raises(ValueError) as caught:
        parse_config('[allocator]\nchannel_gains = { "a" = -1.0, "b" = "far", "c" = 1e-9 }\n')
    assert "allocator.channel_gains" in str(caught.value) and "a = -1.0" in str(caught.value)
    assert "b = 'far'" in str(caught.value) or 'b = "far"' in str(caught.value)


def test_the_problem_is_sized_by_the_preset() -> None:
    auto = AutoAllocation(parse_config(AUTO), get_preset("vit_mini_patch4_32"))
    # 8 x 8 patches of 3 x 4 x 4 values into 128 dims: 64 x 128 activations, 128 x 48 + 128 float32 weights
    assert auto.params.elements_per_sample == 64 * 128
    assert auto.params.weight_bits == 32 * (128 * 48 + 128)
    assert auto.macs_per_sample == 64 * 128 * 48
    assert infer_model(auto.params) == "vit_mini_patch4_32"  # the scenario files name the same preset


def test_uncalibrated_devices_come_from_their_profiles() -> None:
    auto = AutoAllocation(parse_config(AUTO), get_preset("vit_quick_patch4_16"))
    problem = auto.problem(("a", "b"), registry_with(("a", "raspberry-pi-5", 100), ("b", "no-such-profile", 50)))
    fleet = problem.fleet
    assert list(fleet.samples) == [200, 100]  # samples x local epochs
    assert fleet.cpu_freq_hz[0] == 2.4e9 and fleet.max_tx_power_w[0] == 0.1
    assert fleet.cpu_freq_hz[1] == 1.0e9  # the generic fallback, logged
    assert problem.params.t_max_s == 120.0  # round.deadline_s when allocator.t_max_s is 0
    assert set(problem.params.allowed_bits) == {2, 3, 4, 5, 6, 7, 8}


def test_allocate_returns_a_feasible_allocation_per_device() -> None:
    auto = AutoAllocation(parse_config(AUTO), get_preset("vit_quick_patch4_16"))
    registry = registry_with(("a", "raspberry-pi-5", 300), ("b", "raspberry-pi-5", 300), ("c", "jetson-orin-nano", 300))
    allocations = auto.allocate(("a", "b", "c"), registry)
    assert [a.device_id for a in allocations] == ["a", "b", "c"]
    assert all(a.bits_up in range(2, 9) and a.bits_down == 32 for a in allocations)
    assert sum(a.bandwidth_hz for a in allocations) <= 20e6 * (1 + 1e-6)
    assert all(0 < a.tx_power_w <= 0.1 + 1e-12 for a in allocations[:2])
    assert auto.summary()["status"] in ("optimal", "feasible")


def test_gradient_bits_auto_gives_each_device_allowed_downlink_bits() -> None:
    # Prepare: gradient bits chosen from 4-8 over a downlink slow enough for them to matter
    text = '[quant]\nbits = "auto"\ngradient_bits = "auto"\n[training]\nlocal_epochs = 2\n[allocator]\n'
    auto = AutoAllocation(parse_config(text + "downlink_rate_bps = 5e6\n"), get_preset("vit_quick_patch4_16"))
    fixed = AutoAllocation(parse_config(AUTO), get_preset("vit_quick_patch4_16"))
    registry = registry_with(("a", "raspberry-pi-5", 300), ("b", "android-midrange", 300))
    # Execute
    allocations = auto.allocate(("a", "b"), registry)
    # Assert: the allocator's choice from the allowed set; quant.gradient_bits (32) when it is not "auto"
    assert auto.params.allowed_bits_down == (4, 5, 6, 7, 8)
    assert all(a.bits_down in range(4, 9) for a in allocations)
    assert all(a.bits_down == 32 for a in fixed.allocate(("a", "b"), registry))


def test_gradient_bits_auto_needs_bits_auto() -> None:
    with pytest.raises(ValueError, match="quant.gradient_bits: 'auto' is chosen by the allocator"):
        parse_config('[quant]\nbits = 8\ngradient_bits = "auto"\n')


@pytest.mark.broker
def test_server_with_bits_auto_trains_over_the_broker(quick_bundle: Path, broker, tmp_path: Path) -> None:
    shards = write_shards(tmp_path, 3, 160)
    ckpt = tmp_path / "ckpt"
    config = tmp_path / "run.toml"
    config.write_text(config_text(broker.url, ckpt, training__rounds=2, quant__bits="auto",
                                  quant__gradient_bits="auto"))
    server = start_server(config)
    devices = [start_device(quick_bundle, broker.url, f"dev-{i}", shard, seed=i, rounds=2,
                            extra=("--emulate-link", "--distance-m", str(100 + 150 * i)))
               for i, shard in enumerate(shards)]
    try:
        out, err = server.communicate(timeout=240)
    finally:
        stop(devices)
    assert server.returncode == 0, err[-3000:]
    records = read_round_records(ckpt / "metrics.jsonl")
    assert [r.round for r in records] == [1, 2] and all(r.counted for r in records)
    for record in records:
        assert record.allocator is not None and record.allocator.status in ("optimal", "feasible")
        allocs = [d.allocation for d in record.devices.values()]
        assert all(a.bits_up in range(2, 9) and a.bits_down in range(4, 9) for a in allocs)
        assert sum(a.bandwidth_hz for a in allocs) <= 20e6 * (1 + 1e-6)
