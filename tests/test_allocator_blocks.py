"""The allocator's blocks against independent oracles: cvxpy/Clarabel, closed forms, enumeration."""

from __future__ import annotations

import dataclasses
import itertools
import math

import cvxpy as cp
import numpy as np
import pytest

from allocator import joint
from allocator.blocks import (
    bandwidth_block,
    bits_block,
    matching_block,
    power_bandwidth_block,
    power_block,
)
from allocator.power import RateCurve, dinkelbach_power_w, minimal_power_w
from allocator.rates import LN2, bandwidth_for_rate_hz
from allocator.system import (
    AllocationVectors,
    DeviceArrays,
    ModelError,
    Problem,
    SystemParams,
    evaluate,
    fixed_time_s,
    noise_psd_w_per_hz,
    path_loss_db,
    uplink_bits,
)

N0 = noise_psd_w_per_hz()


def random_problem(rng: np.random.Generator, n: int, *, slack: float = 1.5, **params: object) -> Problem:
    """A seeded fleet 50-400 m out with moderate fading; t_max = slack x the equal-split latency at 8 bits."""
    samples = rng.integers(50, 200, n).astype(float)
    gain = 10 ** (-path_loss_db(rng.uniform(50, 400, n)) / 10) * rng.uniform(0.3, 3.0, n)
    fleet = DeviceArrays(
        ids=tuple(f"d{k}" for k in range(n)), samples=samples, cycles_per_sample=rng.uniform(1e7, 1e8, n),
        cpu_freq_hz=rng.uniform(1e9, 3e9, n), kappa=np.full(n, 1e-28), gain=gain,
        max_tx_power_w=rng.uniform(0.05, 0.3, n), activation_range=rng.uniform(0.5, 2.0, n),
        weight=samples / samples.sum(), profiles=("test",) * n,
    )
    values = {"elements_per_sample": 4096, "weight_bits": 2e6, "total_bandwidth_hz": 10e6} | params
    problem = Problem(fleet, SystemParams(**values))
    equal = AllocationVectors(np.full(n, 8), fleet.max_tx_power_w, np.full(n, problem.params.total_bandwidth_hz / n))
    t_max = slack * evaluate(problem, equal).round_latency_s
    return dataclasses.replace(problem, params=dataclasses.replace(problem.params, t_max_s=t_max))


def random_allocation(rng: np.random.Generator, problem: Problem) -> AllocationVectors:
    """Random allowed bits, powers in [0.3, 1] x max and a random split of the whole band."""
    n, params = len(problem.fleet), problem.params
    share = rng.dirichlet(np.full(n, 4.0))
    return AllocationVectors(
        rng.choice(params.allowed_bits, n), problem.fleet.max_tx_power_w * rng.uniform(0.3, 1.0, n),
        share * params.total_bandwidth_hz,
    )


# ---------------------------------------------------------------- bandwidth: KKT against cvxpy


@pytest.mark.parametrize("lambda_time", [0.0, 0.02, 1.0])
@pytest.mark.parametrize("seed", range(4))
def test_kkt_bandwidth_matches_cvxpy(seed: int, lambda_time: float) -> None:
    # Prepare: a feasible (q, p) at max power, so only the bandwidth is free
    rng = np.random.default_rng(seed)
    problem = random_problem(rng, int(rng.integers(3, 9)), lambda_time=lambda_time)
    n = len(problem.fleet)
    alloc = AllocationVectors(
        np.full(n, 8), problem.fleet.max_tx_power_w, np.full(n, problem.params.total_bandwidth_hz / n)
    )
    # Execute
    kkt = bandwidth_block(problem, alloc, "kkt")
    reference = bandwidth_block(problem, alloc, "cvxpy")
    # Assert: same optimum; the KKT solution is no worse and within the budget and the cap
    assert kkt.status == reference.status == "optimal"
    assert kkt.objective == pytest.approx(reference.objective, rel=1e-6)
    assert kkt.objective <= reference.objective * (1 + 1e-9)
    np.testing.assert_allclose(kkt.allocation.bandwidth_hz, reference.allocation.bandwidth_hz, rtol=1e-6, atol=0)
    assert evaluate(problem, kkt.allocation).feasible
    assert np.sum(kkt.allocation.bandwidth_hz) == pytest.approx(problem.params.total_bandwidth_hz, rel=1e-12)


def test_bandwidth_block_reports_an_unreachable_cap_as_infeasible() -> None:
    problem = random_problem(np.random.default_rng(7), 4, slack=0.2)
    alloc = AllocationVectors(np.full(4, 8), problem.fleet.max_tx_power_w, np.full(4, 2.5e6))
    for solver in ("kkt", "cvxpy"):
        result = bandwidth_block(problem, alloc, solver)
        assert result.status == "infeasible" and result.allocation is None and result.message


# ---------------------------------------------------------------- power


def _shannon_power_w(rate_bps: float, width_hz: float, gain: float, n0: float) -> float:
    """p with W log2(1 + p h / (N0 W)) = R, written out here: (2^(R / W) - 1) N0 W / h."""
    return (2.0 ** (rate_bps / width_hz) - 1.0) * n0 * width_hz / gain


def test_power_for_rate_is_the_inverse_shannon_closed_form() -> None:
    # Prepare: devices 10-500 m out, rates from 1 % to 3 bit/s/Hz of their bandwidth
    rng = np.random.default_rng(31)
    n = 64
    bandwidth = rng.uniform(1e4, 5e6, n)
    gain = 10 ** (-path_loss_db(rng.uniform(10, 500, n)) / 10) * rng.exponential(1.0, n)
    rate = bandwidth * rng.uniform(0.01, 3.0, n)
    curve = RateCurve.continuous(bandwidth, gain, N0)
    # Execute
    power = curve.power_for_rate_w(rate)
    table = curve.power_for_rate_w(np.stack([rate, 0.5 * rate], axis=1))  # (N, levels), as the bits block asks
    least = minimal_power_w(rate, np.ones(n), bandwidth, gain, N0)
    # Assert: the closed form term by term, and the forward rate gives R back
    expected = np.array([_shannon_power_w(r, b, h, N0) for r, b, h in zip(rate, bandwidth, gain)])
    np.testing.assert_allclose(power, expected, rtol=1e-9)
    np.testing.assert_allclose(least, expected, rtol=1e-9)
    np.testing.assert_allclose(table[:, 1], [_shannon_power_w(r / 2, b, h, N0) for r, b, h in zip(rate, bandwidth, gain)],
                               rtol=1e-9)
    np.testing.assert_allclose(bandwidth * np.log2(1 + power * gain / (N0 * bandwidth)), rate, rtol=1e-12)
    assert curve.power_for_rate_w(np.zeros(n)).tolist() == [0.0] * n


def test_subchannel_rate_inversion_matches_the_closed_form_of_equal_subchannels() -> None:
    # Prepare: device k holds k + 1 subchannels of equal gain, power split evenly over them, so
    # r = n W log2(1 + p h / (n N0 W)) and p = (2^(R / (n W)) - 1) n N0 W / h
    rng = np.random.default_rng(32)
    n, m, width = 5, 8, 180e3
    held = (np.arange(m)[None, :] <= np.arange(n)[:, None]).astype(float)
    gain = 10 ** (-path_loss_db(rng.uniform(20, 300, n)) / 10)
    curve = RateCurve.subchannels(held, np.repeat(gain[:, None], m, axis=1), width, N0)
    count = held.sum(axis=1)
    rate = count * width * rng.uniform(0.05, 2.5, n)
    # Execute
    power = curve.power_for_rate_w(rate)
    # Assert
    expected = [_shannon_power_w(r, c * width, h, N0) for r, c, h in zip(rate, count, gain)]
    np.testing.assert_allclose(power, expected, rtol=1e-9)
    np.testing.assert_allclose(curve.rate_bps(power), rate, rtol=1e-9)


def test_bandwidth_for_rate_inverts_the_shannon_rate() -> None:
    # Prepare: c = p h / N0 in Hz; reachable rates are below c / ln 2
    rng = np.random.default_rng(33)
    snr_hz = 10 ** rng.uniform(4, 9, 200)
    rate = snr_hz / LN2 * rng.uniform(1e-4, 0.999, 200)
    # Execute
    bandwidth = bandwidth_for_rate_hz(rate, snr_hz)
    # Assert: B log2(1 + c / B) = R, and a little less bandwidth falls short (the least B)
    np.testing.assert_allclose(bandwidth * np.log2(1 + snr_hz / bandwidth), rate, rtol=1e-10)
    less = bandwidth * (1 - 1e-6)
    assert np.all(less * np.log2(1 + snr_hz / less) < rate)
    assert np.isinf(bandwidth_for_rate_hz(np.array([1.01 * snr_hz[0] / LN2]), snr_hz[:1])).all()


def test_dinkelbach_power_equals_the_closed_form_minimal_power() -> None:
    # Prepare: 200 devices, airtimes between the max-power minimum and 20x it
    rng = np.random.default_rng(3)
    n = 200
    bandwidth = rng.uniform(1e4, 5e6, n)
    gain = 10 ** (-path_loss_db(rng.uniform(10, 500, n)) / 10) * rng.exponential(1.0, n)
    bits, p_max = rng.uniform(1e6, 3e8, n), rng.uniform(0.05, 0.3, n)
    curve = RateCurve.continuous(bandwidth, gain, N0)
    airtime = bits / curve.rate_bps(p_max) * rng.uniform(1.0, 20.0, n)
    # Execute
    power, iterations = dinkelbach_power_w(curve, bits / airtime, p_max)
    # Assert: the closed form, and no feasible power on a grid spends less energy p S / r(p)
    np.testing.assert_allclose(power, minimal_power_w(bits, airtime, bandwidth, gain, N0), rtol=1e-12)
    assert 1 <= iterations < 100
    grid = power[:, None] + (p_max - power)[:, None] * np.linspace(0.0, 1.0, 50)[None, :]
    energy = np.stack([grid[:, j] * bits / curve.rate_bps(grid[:, j]) for j in range(grid.shape[1])], axis=1)
    assert np.all(power * bits / curve.rate_bps(power) <= energy.min(axis=1) * (1 + 1e-12))


@pytest.mark.parametrize("lambda_time", [0.0, 0.05, 2.0])
def test_power_block_beats_every_latency_level(lambda_time: float) -> None:
    # Prepare
    rng = np.random.default_rng(11)
    problem = random_problem(rng, 5, lambda_time=lambda_time)
    alloc = AllocationVectors(np.full(5, 8), problem.fleet.max_tx_power_w, np.full(5, 2e6))
    fleet, params = problem.fleet, problem.params
    # Execute
    result = power_block(problem, alloc)
    # Assert: the least-power allocation at any level in [T_lo, T_max] is no better
    assert result.status == "optimal" and evaluate(problem, result.allocation).feasible
    size, fixed = uplink_bits(fleet, params, alloc.bits), fixed_time_s(fleet, params)
    lowest = evaluate(problem, alloc).round_latency_s
    for level in np.linspace(lowest, params.t_max_s, 60):
        power = minimal_power_w(size, level - fixed, alloc.bandwidth_hz, fleet.gain, N0)
        power = np.minimum(power, fleet.max_tx_power_w)
        other = evaluate(problem, dataclasses.replace(alloc, tx_power_w=power))
        assert result.objective <= other.objective * (1 + 1e-9)


# ---------------------------------------------------------------- bits


@pytest.mark.parametrize("lambda_time", [0.0, 0.1, 3.0])
@pytest.mark.parametrize("seed", range(4))
def test_bits_block_equals_exhaustive_enumeration(seed: int, lambda_time: float) -> None:
    # Prepare: a random (p, B) under which some bit-widths miss the cap
    rng = np.random.default_rng(100 + seed)
    allowed = (1, 2, 3, 4, 6, 8, 16, 32)
    problem = random_problem(rng, 4, slack=1.2, lambda_time=lambda_time, lambda_quant=1e-2, allowed_bits=allowed)
    alloc = random_allocation(rng, problem)
    # Execute
    result = bits_block(problem, alloc)
    # Assert: the best feasible objective over all |Q|^N combinations
    best = math.inf
    for bits in itertools.product(allowed, repeat=4):
        ev = evaluate(problem, dataclasses.replace(alloc, bits=np.array(bits)))
        if ev.feasible:
            best = min(best, ev.objective)
    if math.isinf(best):
        assert result.status == "infeasible" and result.allocation is None
    else:
        assert result.status == "optimal"
        assert result.objective == pytest.approx(best, rel=1e-12)
        assert evaluate(problem, result.allocation).feasible


# ---------------------------------------------------------------- power and bandwidth together


@pytest.mark.parametrize("seed", range(3))
def test_joint_level_matches_an_exponential_cone_program(seed: int) -> None:
    # Prepare: K devices with given airtimes; cvxpy minimizes sum (N0 t / h) (B e^(S ln2 / (B t)) - B)
    rng = np.random.default_rng(seed)
    k, total = 4, 20e6
    gain_n0 = 10 ** (-path_loss_db(rng.uniform(50, 400, k)) / 10) * rng.uniform(0.3, 3.0, k) / N0
    p_max, bits, airtime = rng.uniform(0.05, 0.3, k), rng.uniform(5e7, 3e8, k), rng.uniform(5, 40, k)
    unit = total / k
    band, z = cp.Variable(k, nonneg=True), cp.Variable(k)
    weight = airtime / gain_n0 * unit
    scale = float(np.sum(weight * np.expm1(bits * math.log(2) / (airtime * unit))))
    program = cp.Problem(
        cp.Minimize(cp.sum(cp.multiply(weight / scale, z - band))),
        [cp.constraints.ExpCone(bits * math.log(2) / (airtime * unit), band, z), cp.sum(band) <= k,
         z - band <= p_max * gain_n0 / unit],
    )
    program.solve(solver=cp.CLARABEL, tol_gap_abs=1e-11, tol_gap_rel=1e-11, tol_feas=1e-11)
    # Execute
    level = joint.solve_level(bits, airtime, gain_n0, p_max, total)
    # Assert
    assert level.feasible
    assert float(np.sum(level.energy_j)) == pytest.approx(program.value * scale, rel=1e-8)
    np.testing.assert_allclose(level.bandwidth_hz, band.value * unit, rtol=1e-5, atol=1e-6 * total)
    least = minimal_power_w(bits, airtime, level.bandwidth_hz, gain_n0 * N0, N0)
    np.testing.assert_allclose(level.tx_power_w, least, rtol=1e-12)


def test_power_bandwidth_block_is_no_worse_than_the_two_blocks_in_turn() -> None:
    rng = np.random.default_rng(5)
    problem = random_problem(rng, 6, lambda_time=0.05)
    alloc = AllocationVectors(
        np.full(6, 8), problem.fleet.max_tx_power_w, np.full(6, problem.params.total_bandwidth_hz / 6)
    )
    joint_result = power_bandwidth_block(problem, alloc)
    in_turn = bandwidth_block(problem, power_block(problem, alloc).allocation)
    assert joint_result.status == "optimal" and evaluate(problem, joint_result.allocation).feasible
    assert joint_result.objective <= in_turn.objective * (1 + 1e-12)


# ---------------------------------------------------------------- subchannels


def _exchanges(held: np.ndarray) -> list[np.ndarray]:
    """Every assignment one swap or one move (to another device or the free pool) away from ``held``."""
    n, m = held.shape
    owner = [int(np.argmax(held[:, c])) if held[:, c].any() else -1 for c in range(m)]
    found = []
    for c in range(m):
        for target in [*range(n), -1]:
            if target != owner[c]:
                moved = held.copy()
                moved[:, c] = 0
                if target >= 0:
                    moved[target, c] = 1
                found.append(moved)
    for a, b in itertools.combinations(range(m), 2):
        if owner[a] >= 0 and owner[b] >= 0 and owner[a] != owner[b]:
            swapped = held.copy()
            swapped[:, [a, b]] = swapped[:, [b, a]]
            found.append(swapped)
    return found


@pytest.mark.parametrize("lambda_time", [0.0, 0.05])
def test_matching_admits_no_improving_swap_or_move(lambda_time: float) -> None:
    # Prepare: 4 devices, 10 subchannels with Rayleigh gains per subchannel
    rng = np.random.default_rng(21)
    problem = random_problem(rng, 4, slack=2.0, lambda_time=lambda_time, subchannels=10)
    problem = dataclasses.replace(problem, subchannel_gain=problem.fleet.gain[:, None] * rng.exponential(1.0, (4, 10)))
    start = AllocationVectors(np.full(4, 8), problem.fleet.max_tx_power_w, np.zeros(4))
    width = problem.params.total_bandwidth_hz / 10
    # Execute
    result = matching_block(problem, start)
    # Assert: feasible, and no single swap or move gives a feasible allocation with a lower objective
    assert result.status == "optimal"
    held = result.allocation.subchannels
    assert (held.sum(axis=0) <= 1).all() and evaluate(problem, result.allocation).feasible
    for other in _exchanges(held):
        candidate = AllocationVectors(start.bits, start.tx_power_w, other.sum(axis=1) * width, other)
        ev = evaluate(problem, candidate)
        assert not (ev.feasible and ev.objective < result.objective * (1 - 1e-9))


# ---------------------------------------------------------------- statuses and input errors


def test_blocks_report_infeasible_instead_of_raising() -> None:
    problem = random_problem(np.random.default_rng(8), 3, slack=0.05)
    alloc = AllocationVectors(
        np.full(3, 8), problem.fleet.max_tx_power_w, np.full(3, problem.params.total_bandwidth_hz / 3)
    )
    for block in (bits_block, power_block, bandwidth_block, power_bandwidth_block):
        result = block(problem, alloc)
        assert result.status == "infeasible" and result.allocation is None and math.isinf(result.objective)
        assert result.message


def test_uncapped_energy_only_power_is_unbounded() -> None:
    problem = random_problem(np.random.default_rng(9), 3)
    problem = dataclasses.replace(problem, params=dataclasses.replace(problem.params, t_max_s=math.inf))
    alloc = AllocationVectors(
        np.full(3, 8), problem.fleet.max_tx_power_w, np.full(3, problem.params.total_bandwidth_hz / 3)
    )
    assert power_block(problem, alloc).status == "unbounded"
    assert power_bandwidth_block(problem, alloc).status == "unbounded"


def test_malformed_block_input_raises_model_error() -> None:
    problem = random_problem(np.random.default_rng(10), 3)
    alloc = AllocationVectors(np.full(3, 8), problem.fleet.max_tx_power_w, np.full(3, 1e6))
    with pytest.raises(ModelError, match="solver"):
        bandwidth_block(problem, alloc, "scs")
    with pytest.raises(ModelError, match="the problem 3"):
        bits_block(problem, AllocationVectors(np.full(2, 8), np.full(2, 0.1), np.full(2, 1e6)))
    with pytest.raises(ModelError, match="not one of"):
        power_block(problem, dataclasses.replace(alloc, bits=np.array([8, 8, 9])))
    with pytest.raises(ModelError, match="matching_block"):
        bandwidth_block(dataclasses.replace(problem, params=dataclasses.replace(problem.params, subchannels=4)), alloc)
    with pytest.raises(ModelError, match="bandwidth_block"):
        matching_block(problem, alloc)
