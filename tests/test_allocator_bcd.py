"""The BCD solver: near the brute-force optimum, monotone, feasible, never worse than the fixed baseline."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from allocator import Result, brute_force, solve
from allocator.baselines import fixed
from allocator.scenario import generate_scenario
from allocator.system import DeviceArrays, ModelError, Problem, SystemParams, evaluate, path_loss_db

INSTANCES = 200
ALLOWED_BITS = (2, 4, 6, 8, 16, 32)
ALLOWED_BITS_DOWN = (4, 8, 32)


def small_instance(rng: np.random.Generator) -> Problem:
    """2-3 devices 20-500 m out with Rayleigh fading, random weights, t_max 0.6-2.5 x the fixed baseline's."""
    n = int(rng.integers(2, 4))
    samples = rng.integers(20, 200, n).astype(float)
    fleet = DeviceArrays(
        ids=tuple(f"d{k}" for k in range(n)), samples=samples, cycles_per_sample=rng.uniform(1e7, 1e8, n),
        cpu_freq_hz=rng.uniform(1e9, 3e9, n), kappa=np.full(n, 1e-28),
        gain=10 ** (-path_loss_db(rng.uniform(20, 500, n)) / 10) * rng.exponential(1.0, n),
        max_tx_power_w=rng.uniform(0.05, 0.3, n), activation_range=rng.uniform(0.5, 2.0, n),
        weight=samples / samples.sum(), profiles=("test",) * n,
    )
    params = SystemParams(
        elements_per_sample=int(rng.choice([1024, 4096, 16384])), weight_bits=float(rng.uniform(0, 5e6)),
        total_bandwidth_hz=float(rng.uniform(1e6, 20e6)), lambda_time=float(rng.choice([0.0, 0.0, 0.01, 0.2, 2.0])),
        lambda_quant=float(rng.choice([0.0, 1e-4, 1e-3, 1e-2])), allowed_bits=ALLOWED_BITS,
    )
    problem = Problem(fleet, params)
    t_max = fixed(problem).evaluation.round_latency_s * rng.uniform(0.6, 2.5)
    return dataclasses.replace(problem, params=dataclasses.replace(params, t_max_s=float(t_max)))


def with_gradient_bits(problem: Problem, rng: np.random.Generator) -> Problem:
    """``problem`` with per-device gradient bits to choose (4, 8 or 32) over a downlink slow enough to matter."""
    params = dataclasses.replace(
        problem.params, allowed_bits=(2, 4, 8, 32), allowed_bits_down=ALLOWED_BITS_DOWN,
        downlink_rate_bps=float(rng.uniform(5e6, 50e6)), downlink_quant_weight=float(rng.choice([0.25, 1.0, 4.0])),
    )
    t_max = fixed(dataclasses.replace(problem, params=params)).evaluation.round_latency_s * rng.uniform(0.6, 2.5)
    return dataclasses.replace(problem, params=dataclasses.replace(params, t_max_s=float(t_max)))


def assert_well_formed(problem: Problem, result: Result) -> None:
    """History never increases; a non-infeasible result meets every constraint (T_k <= t_max)."""
    history = np.array(result.objective_history)
    assert np.all(np.diff(history) <= 0)
    assert history[-1] == pytest.approx(result.evaluation.objective, rel=1e-12)
    if result.status != "infeasible":
        assert result.evaluation.feasible, result.evaluation.violations
        assert np.all(result.evaluation.latency_s <= problem.params.t_max_s * (1 + 1e-9))


@pytest.mark.parametrize("gradient_bits", [False, True], ids=["uplink-bits", "uplink-and-downlink-bits"])
def test_bcd_is_within_one_percent_of_the_brute_force_optimum(gradient_bits: bool) -> None:
    # Prepare
    rng = np.random.default_rng(2024)
    gaps, infeasible = [], 0
    for _ in range(INSTANCES // 2 if gradient_bits else INSTANCES):
        problem = small_instance(rng)
        if gradient_bits:
            problem = with_gradient_bits(problem, rng)
        # Execute
        optimum, result = brute_force(problem), solve(problem)
        # Assert: same verdict on feasibility; never better than the optimum
        assert_well_formed(problem, result)
        if optimum.status == "infeasible":
            assert result.status == "infeasible"
            infeasible += 1
            continue
        assert result.status in ("optimal", "feasible")
        gap = (result.evaluation.objective - optimum.objective) / abs(optimum.objective)
        assert gap >= -1e-6, gap
        gaps.append(gap)
        if gradient_bits:  # the downlink's bits are the allocator's: an allowed pair for every device
            assert result.allocation.bits_down is not None
            assert set(result.allocation.bits_down) <= set(ALLOWED_BITS_DOWN)
    gaps = np.array(gaps)
    assert gaps.size >= (INSTANCES // 4 if gradient_bits else INSTANCES // 2) and infeasible > 0  # both kinds drawn
    assert np.all(gaps <= 0.01), np.sort(gaps)[-10:]  # every instance, not a share of them


@pytest.mark.parametrize(
    ("devices", "params"),
    [
        (10, {}), (50, {"lambda_time": 0.05}), (30, {"lambda_quant": 0.0}), (8, {"subchannels": 16}),
        (20, {"subchannels": 40, "lambda_time": 0.05}),
    ],
)
def test_solution_is_never_worse_than_the_fixed_baseline(devices: int, params: dict[str, object]) -> None:
    problem = generate_scenario(devices, 3, params=params)
    result = solve(problem)
    assert result.status == "optimal"
    assert_well_formed(problem, result)
    assert result.evaluation.objective <= fixed(problem).evaluation.objective * (1 + 1e-9)


def test_an_infeasible_instance_returns_a_fallback_and_says_what_was_relaxed() -> None:
    problem = generate_scenario(6, 1)
    problem = dataclasses.replace(problem, params=dataclasses.replace(problem.params, t_max_s=1.0))
    result = solve(problem)
    assert result.status == "infeasible"
    assert not result.evaluation.feasible
    assert "t_max_s" in result.message and "relaxed" in result.message
    alloc = result.allocation
    assert (alloc.bits == problem.params.allowed_bits[0]).all()
    assert np.allclose(alloc.tx_power_w, problem.fleet.max_tx_power_w)
    assert np.sum(alloc.bandwidth_hz) == pytest.approx(problem.params.total_bandwidth_hz, rel=1e-9)
    # the fallback minimizes the round latency: its devices finish together
    assert np.ptp(result.evaluation.latency_s) <= 1e-6 * result.evaluation.round_latency_s


def test_cvxpy_and_kkt_bandwidth_solvers_reach_the_same_objective() -> None:
    problem = generate_scenario(6, 4, params={"lambda_time": 0.02})
    fast, reference = solve(problem), solve(problem, bandwidth_solver="cvxpy")
    assert fast.evaluation.objective == pytest.approx(reference.evaluation.objective, rel=1e-6)


def test_uncapped_rounds_are_capped_with_a_message() -> None:
    problem = generate_scenario(5, 2, t_max_s=math.inf)
    result = solve(problem)
    assert result.status == "optimal" and result.evaluation.feasible
    assert "t_max_s = inf" in result.message and math.isfinite(result.evaluation.round_latency_s)
    timed = solve(dataclasses.replace(problem, params=dataclasses.replace(problem.params, lambda_time=0.1)))
    assert timed.status == "optimal" and timed.message == ""


def test_solve_rejects_bad_arguments_all_at_once() -> None:
    problem = generate_scenario(3, 0)
    with pytest.raises(ModelError) as caught:
        solve(problem, max_iterations=0, tol=-1.0, bandwidth_solver="scs")
    assert len(caught.value.problems) == 3


def test_an_iteration_limit_gives_status_feasible() -> None:
    problem = generate_scenario(20, 5, params={"lambda_time": 0.05})
    result = solve(problem, max_iterations=1, tol=0.0)
    assert result.status == "feasible" and result.iterations == 1 and "iteration limit" in result.message
    assert_well_formed(problem, result)


def test_a_thousand_devices_solve_to_optimal() -> None:
    # the time goal (< 1 s) is measured by benchmarks/bench_allocator.py, never asserted here
    problem = generate_scenario(1000, 0)
    result = solve(problem)
    assert result.status == "optimal" and result.evaluation.objective < fixed(problem).evaluation.objective
    assert evaluate(problem, result.allocation).feasible
