"""The allocator's system model (docs/allocator.md) against hand computations for one device."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from allocator import baselines
from allocator.system import (
    AllocationVectors,
    DeviceArrays,
    ModelError,
    Problem,
    SystemParams,
    compute_energy_j,
    compute_time_s,
    device_latency_s,
    downlink_time_s,
    evaluate,
    noise_psd_w_per_hz,
    path_loss_db,
    quant_variance,
    server_time_s,
    shannon_rate_bps,
    uplink_bits,
    uplink_energy_j,
    uplink_rate_bps,
    uplink_time_s,
)
from edge_runtime.link import uplink_rate_bps as link_rate_bps
from sflam_common.bits import BIT_WIDTHS
from sflam_common.problems import ProblemsError

N0 = 1e-20  # W/Hz, round so the hand computations stay readable


def one_device(**changes: object) -> DeviceArrays:
    values = dict(
        ids=("a",), samples=[100.0], cycles_per_sample=[1e6], cpu_freq_hz=[1e9], kappa=[1e-28],
        gain=[1e-10], max_tx_power_w=[0.2], activation_range=[2.0], weight=[1.0], profiles=("raspberry-pi-5",),
    )
    values.update(changes)
    return DeviceArrays(**values)


def params(**changes: object) -> SystemParams:
    values = dict(
        elements_per_sample=10, label_bits=64, weight_bits=1000.0, overhead_bits=24.0, gradient_bits=32,
        server_cycles_per_sample=1e6, server_freq_hz=2e9, downlink_rate_bps=1e6, noise_psd_w_per_hz=N0,
        total_bandwidth_hz=1e6, t_max_s=10.0, lambda_energy=1.0, lambda_time=2.0, lambda_quant=3.0,
    )
    values.update(changes)
    return SystemParams(**values)


def alloc(bits: int = 4, power: float = 0.1, bandwidth: float = 1e6) -> AllocationVectors:
    return AllocationVectors(np.array([bits]), np.array([power]), np.array([bandwidth]))


def test_one_device_matches_the_hand_computation() -> None:
    # Prepare: D = 100, c = 1e6, f = 1e9, kappa = 1e-28; p h / (N0 B) = 0.1 x 1e-10 / (1e-20 x 1e6) = 1000
    problem = Problem(one_device(), params())
    a = alloc(bits=4)
    rate = 1e6 * math.log2(1001.0)
    bits = 100 * (10 * 4 + 64) + 1000 + 24
    # Execute
    ev = evaluate(problem, a)
    # Assert
    assert compute_time_s(problem.fleet)[0] == pytest.approx(0.1)
    assert compute_energy_j(problem.fleet)[0] == pytest.approx(1e-28 * 1e6 * 100 * 1e18)
    assert uplink_bits(problem.fleet, problem.params, np.array([4]))[0] == bits == 11424
    assert uplink_rate_bps(problem, a)[0] == pytest.approx(rate, rel=1e-12)
    assert uplink_time_s(problem, a)[0] == pytest.approx(bits / rate, rel=1e-12)
    assert uplink_energy_j(problem, a)[0] == pytest.approx(0.1 * bits / rate, rel=1e-12)
    assert downlink_time_s(problem.fleet, problem.params)[0] == pytest.approx((100 * 10 * 32 + 1000) / 1e6)
    assert server_time_s(problem.fleet, problem.params)[0] == pytest.approx(100 * 1e6 / 2e9)
    latency = 0.1 + 0.033 + 0.05 + bits / rate
    assert device_latency_s(problem, a)[0] == pytest.approx(latency, rel=1e-12)
    phi = 1.0 * 10 * 2.0**2 / (4 * 15**2)
    energy = 0.01 + 0.1 * bits / rate
    assert (ev.energy_j[0], ev.latency_s[0], ev.round_latency_s) == pytest.approx((energy, latency, latency))
    assert ev.phi == pytest.approx(phi)
    assert ev.objective == pytest.approx(energy + 2.0 * latency + 3.0 * phi, rel=1e-12)
    assert ev.feasible and ev.violations == ()


@pytest.mark.parametrize(
    ("bandwidth_hz", "power_w", "gain"), [(1e6, 0.1, 1e-10), (180e3, 0.2, 3e-13), (20e6, 1e-3, 1e-8), (1.0, 1.0, 1.0)]
)
def test_shannon_rate_equals_the_edge_runtime_link(bandwidth_hz: float, power_w: float, gain: float) -> None:
    n0 = noise_psd_w_per_hz()
    ours = shannon_rate_bps(np.array([bandwidth_hz]), np.array([power_w]), np.array([gain]), n0)[0]
    assert ours == pytest.approx(link_rate_bps(bandwidth_hz, power_w, gain, n0), rel=1e-12)


def test_shannon_rate_is_zero_without_bandwidth_or_power() -> None:
    rate = shannon_rate_bps(np.array([0.0, 1e6, 0.0]), np.array([0.1, 0.0, 0.0]), np.array([1e-10] * 3), N0)
    assert rate.tolist() == [0.0, 0.0, 0.0]
    silent = Problem(one_device(), params())
    assert uplink_time_s(silent, alloc(power=0.0))[0] == math.inf
    assert uplink_energy_j(silent, alloc(power=0.0))[0] == 0.0
    assert not evaluate(silent, alloc(bandwidth=0.0)).feasible


def test_noise_and_path_loss_constants() -> None:
    assert noise_psd_w_per_hz() == pytest.approx(10 ** (-20.4))  # -174 dBm/Hz
    assert noise_psd_w_per_hz(30.0) == pytest.approx(1.0)  # 30 dBm = 1 W
    assert path_loss_db(np.array([1000.0, 100.0, 10.0])) == pytest.approx([128.1, 128.1 - 37.6, 128.1 - 75.2])


def test_phi_is_the_uniform_quantizer_variance_and_zero_for_float32() -> None:
    p = params(elements_per_sample=49 * 768)
    bits = np.array([1, 2, 8, 16, 32])
    expected = [0.5 * 49 * 768 * 9.0 / (4 * (2.0**q - 1) ** 2) for q in (1, 2, 8, 16)] + [0.0]
    many = DeviceArrays(
        ids=tuple("abcde"), samples=[1.0] * 5, cycles_per_sample=[1.0] * 5, cpu_freq_hz=[1.0] * 5, kappa=[0.0] * 5,
        gain=[1.0] * 5, max_tx_power_w=[1.0] * 5, activation_range=[3.0] * 5, weight=[0.5] * 5, profiles=("x",) * 5,
    )
    assert quant_variance(many, p, bits) == pytest.approx(expected, rel=1e-12)
    assert np.all(np.diff(quant_variance(many, p, bits)) < 0)  # more bits, less noise


def test_subchannel_rate_sums_held_subchannels_at_split_power() -> None:
    # Prepare: 2 devices, 4 subchannels of 250 kHz; device a holds 0 and 1, device b holds 3
    fleet = dataclasses.replace(
        one_device(), ids=("a", "b"), samples=[100.0, 100.0], cycles_per_sample=[1e6] * 2, cpu_freq_hz=[1e9] * 2,
        kappa=[1e-28] * 2, gain=[1e-10, 2e-10], max_tx_power_w=[0.2] * 2, activation_range=[1.0] * 2,
        weight=[0.5] * 2, profiles=("x", "y"),
    )
    gains = np.array([[1e-10, 2e-10, 3e-10, 4e-10], [5e-10, 6e-10, 7e-10, 8e-10]])
    problem = Problem(fleet, params(subchannels=4), gains)
    held = np.array([[1, 1, 0, 0], [0, 0, 0, 1]])
    a = AllocationVectors(np.array([4, 4]), np.array([0.2, 0.1]), np.array([5e5, 2.5e5]), held)
    # Execute
    rate = uplink_rate_bps(problem, a)
    # Assert
    b = 2.5e5
    expected_a = sum(b * math.log2(1 + 0.1 * g / (N0 * b)) for g in (1e-10, 2e-10))
    expected_b = b * math.log2(1 + 0.1 * 8e-10 / (N0 * b))
    assert rate == pytest.approx([expected_a, expected_b], rel=1e-12)
    assert evaluate(problem, a).feasible
    both_hold_1 = np.array([[1, 1, 0, 0], [0, 1, 0, 1]])
    shared = AllocationVectors(np.array([4, 4]), np.array([0.2, 0.1]), np.array([5e5, 5e5]), both_hold_1)
    assert "more than one device" in " ".join(evaluate(problem, shared).violations)


def test_flat_subchannel_gain_when_none_is_given() -> None:
    problem = Problem(one_device(), params(subchannels=3))
    assert problem.subchannel_gain.shape == (1, 3)
    assert np.all(problem.subchannel_gain == 1e-10)


def test_feasibility_flags_each_violated_constraint() -> None:
    problem = Problem(one_device(), params(t_max_s=0.18))  # fixed part alone is 0.183 s
    roomy = Problem(one_device(), params(t_max_s=10.0))
    assert evaluate(roomy, alloc(power=0.2 * (1 + 1e-12))).feasible  # within the 1e-9 tolerance
    over_power = evaluate(roomy, alloc(power=0.21))
    over_band = evaluate(roomy, alloc(bandwidth=1.01e6))
    late = evaluate(problem, alloc())
    assert not over_power.feasible and "max_tx_power_w" in over_power.violations[0]
    assert not over_band.feasible and "bandwidth sum" in over_band.violations[0]
    assert not late.feasible and "exceed t_max_s" in late.violations[0]


def test_a_zero_weight_drops_its_term_even_when_infinite() -> None:
    problem = Problem(one_device(), params(lambda_time=0.0, lambda_quant=0.0))
    ev = evaluate(problem, alloc(power=0.0))
    assert ev.round_latency_s == math.inf
    assert ev.objective == pytest.approx(0.01)  # compute energy only: a silent radio costs nothing


def test_fleet_validation_lists_every_problem() -> None:
    with pytest.raises(ModelError) as caught:
        one_device(ids=("a", "b"), samples=[-1.0, 5.0], gain=[np.nan], cpu_freq_hz=[0.0], weight="heavy")
    problems = caught.value.problems
    assert len(problems) >= 6, problems
    text = str(caught.value)
    for needle in ("profiles: expected 2", "samples: must be > 0", "gain:", "cpu_freq_hz:", "weight: not an array"):
        assert needle in text


def test_params_validation_lists_every_problem() -> None:
    with pytest.raises(ModelError) as caught:
        params(elements_per_sample=0, t_max_s=-1.0, lambda_quant=math.nan, allowed_bits=(0, 4, 40), subchannels=-2)
    fields = {problem.split(":")[0] for problem in caught.value.problems}
    assert fields == {"elements_per_sample", "t_max_s", "lambda_quant", "allowed_bits", "subchannels"}
    assert isinstance(caught.value, ProblemsError) and caught.value.source == "system parameters"
    assert str(caught.value).startswith("system parameters: 5 problems:\n  - ")


def test_allowed_bits_are_the_wire_bit_widths_or_a_subset() -> None:
    assert params().allowed_bits == BIT_WIDTHS
    assert params(allowed_bits=[8, np.int64(2), 32]).allowed_bits == (2, 8, 32)
    with pytest.raises(ModelError, match=r"allowed_bits: each must be one of 1\.\.8, 16, 32, got \[12, 0\]"):
        params(allowed_bits=(4, 12, 0))  # 12 bits cannot go on the wire


def test_allocation_validation() -> None:
    problem = Problem(one_device(), params(allowed_bits=(2, 4, 8)))
    with pytest.raises(ModelError, match="3 at index 0 is not one of \\[2, 4, 8\\]"):
        evaluate(problem, alloc(bits=3))
    with pytest.raises(ModelError) as caught:
        AllocationVectors(np.array([4.5, 4.0]), np.array([-0.1, 0.1]), np.array([1e6]))
    assert len(caught.value.problems) == 3
    with pytest.raises(ModelError, match="allocation has 2 devices"):
        evaluate(problem, AllocationVectors(np.array([4, 4]), np.array([0.1, 0.1]), np.array([1.0, 1.0])))
    with pytest.raises(ModelError, match="params.subchannels is 0"):
        evaluate(problem, AllocationVectors(np.array([4]), np.array([0.1]), np.array([1e6]), np.array([[1]])))


def test_evaluate_is_vectorized_for_ten_thousand_devices() -> None:
    n = 10_000
    rng = np.random.default_rng(0)
    fleet = DeviceArrays(
        ids=tuple(str(k) for k in range(n)), samples=rng.integers(400, 501, n), cycles_per_sample=np.full(n, 8.7e7),
        cpu_freq_hz=np.full(n, 2.4e9), kappa=np.full(n, 1e-28), gain=rng.exponential(1e-11, n),
        max_tx_power_w=np.full(n, 0.2), activation_range=np.ones(n), weight=np.full(n, 1 / n), profiles=("x",) * n,
    )
    problem = Problem(fleet, SystemParams(elements_per_sample=37632, t_max_s=1e9))
    a = AllocationVectors(np.full(n, 8), np.full(n, 0.2), np.full(n, 20e6 / n))
    ev = evaluate(problem, a)  # vectorized; its speed is the allocator benchmark's business
    assert ev.energy_j.shape == (n,) and ev.feasible


# --- baselines -----------------------------------------------------------------------------------


def two_devices() -> Problem:
    fleet = DeviceArrays(
        ids=("a", "b"), samples=[100.0, 200.0], cycles_per_sample=[1e6, 2e6], cpu_freq_hz=[1e9, 2e9],
        kappa=[1e-28] * 2, gain=[1e-10, 1e-11], max_tx_power_w=[0.2, 0.1], activation_range=[1.0] * 2,
        weight=[1 / 3, 2 / 3], profiles=("x", "y"),
    )
    return Problem(fleet, params(allowed_bits=(2, 4), t_max_s=100.0))


def test_fixed_and_fp32_use_max_power_and_an_equal_band_even_outside_the_allowed_bits() -> None:
    problem = two_devices()
    for result, bits in ((baselines.fixed(problem), 8), (baselines.fp32_sfl(problem), 32)):
        assert result.allocation.bits.tolist() == [bits, bits]
        assert result.allocation.tx_power_w.tolist() == [0.2, 0.1]
        assert result.allocation.bandwidth_hz.tolist() == [5e5, 5e5]
        assert result.evaluation.energy_j == pytest.approx(
            compute_energy_j(problem.fleet) + uplink_energy_j(problem, result.allocation)
        )
    assert baselines.fp32_sfl(problem).evaluation.phi == 0.0


def test_sequential_sl_takes_the_sum_of_whole_band_latencies() -> None:
    problem = two_devices()
    result = baselines.sequential_sl(problem)
    alone = AllocationVectors(np.array([32, 32]), np.array([0.2, 0.1]), np.array([1e6, 1e6]))
    per_device = device_latency_s(Problem(problem.fleet, params(t_max_s=100.0)), alone)
    assert result.evaluation.round_latency_s == pytest.approx(per_device.sum(), rel=1e-12)
    tight = dataclasses.replace(problem, params=dataclasses.replace(problem.params, t_max_s=per_device.max() * 1.01))
    assert baselines.sequential_sl(tight).evaluation.feasible is False  # each fits alone, not in turn


def test_fl_trains_the_whole_model_and_uploads_its_weights() -> None:
    problem = two_devices()
    result = baselines.fl(problem, model_to_device_compute_ratio=10.0, model_weight_bits=1e6)
    rate = shannon_rate_bps(np.array([5e5] * 2), np.array([0.2, 0.1]), problem.fleet.gain, N0)
    uplink_s = (1e6 + 24) / rate
    expected_latency = 10.0 * compute_time_s(problem.fleet) + uplink_s + 1e6 / 1e6
    assert result.evaluation.latency_s == pytest.approx(expected_latency, rel=1e-12)
    assert result.evaluation.energy_j == pytest.approx(10.0 * compute_energy_j(problem.fleet) + [0.2, 0.1] * uplink_s)
    assert baselines.FL_COMPUTE_RATIO_VIT_B32 == pytest.approx(38.14, abs=0.01)
    with pytest.raises(ModelError, match="model_to_device_compute_ratio"):
        baselines.fl(problem, model_to_device_compute_ratio=0.0)
