"""The BCD blocks on a Problem: each returns the exact optimum of its block, the others held fixed.

- :func:`bits_block` (q, g | p, B): the coupled integer problem over the allowed (uplink, downlink)
  bit pairs, by an exact sweep over the latency levels T_k(q, g) (O(N |P| log(N |P|)), |P| = |Q| |G|).
- :func:`power_block` (p | q, B): per level T each device's least power (Dinkelbach on p / r(p),
  equal to the closed form :func:`allocator.power.minimal_power_w`); J(T) convex, Brent root of
  J'(T).
- :func:`bandwidth_block` (B | q, p): the convex program, ``solver="kkt"`` or ``"cvxpy"``
  (:mod:`allocator.bandwidth`).
- :func:`power_bandwidth_block` ((p, B) | q): the jointly convex problem (:mod:`allocator.joint`),
  which the two blocks above cannot reach on their own once every latency is at the cap.
- :func:`bits_power_block` ((q, g, p) | B): per latency level each device's cheapest bit pair with
  the least power it needs (exact for lambda_time = 0; grid + golden search of the level otherwise).
- :func:`matching_block` (subchannels | q, p): swap matching (:mod:`allocator.matching`).

Every block returns a :class:`BlockResult`; infeasibility and unboundedness are statuses. Malformed
input (an allocation that does not fit the problem, a wrong solver name) raises ModelError. The
blocks that hold the bits fixed keep both the uplink and the downlink bits of their input.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
from scipy.optimize import brentq

from allocator import joint
from allocator.bandwidth import UplinkData, cvxpy_bandwidth, kkt_bandwidth, min_max_level_s
from allocator.matching import MatchingData, greedy_assignment, swap_matching
from allocator.power import RateCurve, dinkelbach_power_w
from allocator.system import (
    AllocationVectors,
    ModelError,
    Problem,
    check_allocation,
    evaluate,
    fixed_time_s,
    quant_spread,
    relative_variance,
    uplink_bits,
    uplink_rate_bps,
)

LEVEL_RTOL = 1e-10  # a latency within T_max (1 + this) meets the cap (evaluate allows 1e-9)
LEVEL_XTOL = 1e-11  # relative accuracy of a best latency level (the objective is flat there: ~1e-20 off)
BANDWIDTH_SOLVERS = ("kkt", "cvxpy")


@dataclass(frozen=True)
class BlockResult:
    """A block's outcome: status "optimal", "infeasible" or "unbounded", and its allocation (or None)."""

    status: str
    allocation: AllocationVectors | None
    objective: float
    message: str = ""


def _optimal(problem: Problem, alloc: AllocationVectors, message: str = "") -> BlockResult:
    """An optimal block result scored by the system model."""
    return BlockResult("optimal", alloc, evaluate(problem, alloc).objective, message)


def _failed(status: str, message: str) -> BlockResult:
    """A block result without an allocation."""
    return BlockResult(status, None, math.inf, message)


def _cap_s(problem: Problem) -> float:
    """T_max with the feasibility slack of the blocks."""
    return problem.params.t_max_s * (1 + LEVEL_RTOL)


# ---------------------------------------------------------------- bits


@dataclass(frozen=True)
class BitsTable:
    """Every allowed bit pair (q, g) of params.bit_pairs, per device: an (N, |P|) table each."""

    up: np.ndarray  # (|P|,) uplink activation bits q of each pair
    down: np.ndarray  # (|P|,) downlink gradient bits g of each pair
    size: np.ndarray  # S_k(q): uplink bits
    quant: np.ndarray  # lQ Phi_k(q, g)
    fixed: np.ndarray  # a_k(g): compute + downlink + server time
    chosen: bool  # the gradient bits are the allocator's (params.allowed_bits_down), not one fixed g

    def allocation(self, choice: np.ndarray, alloc: AllocationVectors, **changes: np.ndarray) -> AllocationVectors:
        """``alloc`` with each device's pair ``choice`` (and any other field changed)."""
        bits_down = self.down[choice] if self.chosen else None
        return replace(alloc, bits=self.up[choice], bits_down=bits_down, **changes)


def bits_table(problem: Problem) -> BitsTable:
    """Uplink bits, quantization cost and fixed time of every allowed (q, g) pair, for every device."""
    fleet, params = problem.fleet, problem.params
    up, down = params.bit_pairs
    per_sample = params.elements_per_sample * up[None, :].astype(np.float64) + params.label_bits
    size = fleet.samples[:, None] * per_sample + params.weight_bits + params.overhead_bits
    quant = np.zeros(size.shape)
    if params.lambda_quant > 0:
        per_pair = relative_variance(up) + params.downlink_quant_weight * relative_variance(down)
        quant = params.lambda_quant * quant_spread(fleet, params)[:, None] * per_pair[None, :]
    options = params.bits_down_options  # a_k(g) once per distinct g, then a column per pair
    by_g = np.stack([fixed_time_s(fleet, params, np.full(len(fleet), g)) for g in options], axis=1)
    fixed = by_g[:, np.searchsorted(options, down)]
    return BitsTable(up, down, size, quant, fixed, bool(params.allowed_bits_down))


def bit_costs(problem: Problem, alloc: AllocationVectors) -> tuple[BitsTable, np.ndarray, np.ndarray]:
    """The pairs, and (N, |P|) latency T_k(q, g) and cost lE E_up_k(q) + lQ Phi_k(q, g), p and B fixed."""
    params = problem.params
    table = bits_table(problem)
    rate = uplink_rate_bps(problem, alloc)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        airtime = np.where(rate > 0, table.size / np.where(rate > 0, rate, 1.0), np.inf)
    cost = table.quant
    if params.lambda_energy > 0:
        cost = cost + params.lambda_energy * alloc.tx_power_w[:, None] * airtime
    return table, table.fixed + airtime, cost


def bits_block(problem: Problem, alloc: AllocationVectors) -> BlockResult:
    """The exact bit pairs given p and B: sweep the latency levels, each device its cheapest pair below."""
    check_allocation(problem, alloc)
    params = problem.params
    table, latency, cost = bit_costs(problem, alloc)
    cap = _cap_s(problem)
    late = ~(latency.min(axis=1) <= cap)
    if late.any():
        fewest = f"{table.up.min()} bits up, {table.down.min()} down"
        return _failed("infeasible", f"{int(late.sum())} devices miss t_max_s even with {fewest}")
    if params.lambda_time == 0:
        choice = np.argmin(np.where(latency <= cap, cost, np.inf), axis=1)
    else:  # the sweep wants every device's pairs in order of latency
        order = np.argsort(latency, axis=1, kind="stable")
        rows = np.arange(latency.shape[0])[:, None]
        choice = order[rows[:, 0], _sweep_levels(latency[rows, order], cost[rows, order], cap, params.lambda_time)]
    return _optimal(problem, table.allocation(choice, alloc))


def _sweep_levels(latency: np.ndarray, cost: np.ndarray, cap: float, lambda_time: float) -> np.ndarray:
    """Per device the index of q at the best level L: min over L of sum_k min_{T_k(q) <= L} cost + lT L."""
    n, nq = latency.shape
    best_so_far = np.minimum.accumulate(cost, axis=1)  # latency rises with q: the prefix is what fits
    delta = np.diff(best_so_far, axis=1, prepend=0.0).ravel()
    level = latency.ravel()
    order = np.argsort(level, kind="stable")
    order = order[level[order] <= cap]
    first = (order % nq) == 0
    entered = np.cumsum(first)
    total = np.cumsum(delta[order]) + lambda_time * level[order]
    total = np.where(entered == n, total, np.inf)
    pick = int(np.argmin(total))
    reach = np.zeros(n, dtype=np.int64)
    np.maximum.at(reach, order[: pick + 1] // nq, order[: pick + 1] % nq)
    prefix_arg = _prefix_argmin(cost)
    return prefix_arg[np.arange(n), reach]


def _prefix_argmin(cost: np.ndarray) -> np.ndarray:
    """(N, |Q|): the index of the least cost among the first j + 1 columns."""
    arg = np.zeros(cost.shape, dtype=np.int64)
    for j in range(1, cost.shape[1]):
        better = cost[:, j] < cost[np.arange(cost.shape[0]), arg[:, j - 1]]
        arg[:, j] = np.where(better, j, arg[:, j - 1])
    return arg


# ---------------------------------------------------------------- power


def rate_curve(problem: Problem, alloc: AllocationVectors) -> RateCurve:
    """Each device's rate against its power under ``alloc``'s bandwidth or subchannels."""
    params = problem.params
    if alloc.subchannels is None:
        return RateCurve.continuous(alloc.bandwidth_hz, problem.fleet.gain, params.noise_psd_w_per_hz)
    width = params.total_bandwidth_hz / params.subchannels
    return RateCurve.subchannels(alloc.subchannels, problem.subchannel_gain, width, params.noise_psd_w_per_hz)


def power_block(problem: Problem, alloc: AllocationVectors) -> BlockResult:
    """The exact powers given q and B: best latency level T (convex 1-D), least power per device."""
    check_allocation(problem, alloc)
    fleet, params = problem.fleet, problem.params
    curve = rate_curve(problem, alloc)
    size = uplink_bits(fleet, params, alloc.bits)
    fixed = fixed_time_s(fleet, params, alloc.bits_down)
    with np.errstate(divide="ignore"):
        lowest = float(np.max(fixed + size / curve.rate_bps(fleet.max_tx_power_w)))
    if not lowest <= _cap_s(problem):
        return _failed("infeasible", f"even max power needs a round of {lowest:.6g} s > t_max_s")
    level = _power_level_s(problem, curve, size, fixed, lowest)
    if level is None:
        return _failed("unbounded", "t_max_s = inf and lambda_time = 0: energy falls as power -> 0, no minimum")
    airtime = np.maximum(level - fixed, 0.0)
    power, _ = dinkelbach_power_w(curve, size / airtime, fleet.max_tx_power_w)
    power = np.minimum(power, fleet.max_tx_power_w)
    return _optimal(problem, replace(alloc, tx_power_w=power))


def _power_level_s(
    problem: Problem, curve: RateCurve, size: np.ndarray, fixed: np.ndarray, lowest: float
) -> float | None:
    """The round latency minimizing lE sum E_k(T) + lT T on [lowest, T_max]; None if unbounded."""
    params = problem.params
    if params.lambda_energy == 0:
        return lowest
    if params.lambda_time == 0:
        return params.t_max_s if math.isfinite(params.t_max_s) else None

    def slope(level: float) -> float:
        rate = size / (level - fixed)
        power = curve.power_for_rate_w(rate)
        return params.lambda_time + params.lambda_energy * float(np.sum(power - rate / curve.slope(power)))

    if math.isfinite(params.t_max_s):
        high = params.t_max_s
    else:  # J' -> lT > 0 as T grows: double the gap until the slope turns
        high = lowest * 2.0
        while slope(high) < 0:
            high = lowest + 2.0 * (high - lowest)
    if slope(high) <= 0:
        return high
    if slope(lowest) >= 0:
        return lowest
    return brentq(slope, lowest, high, xtol=LEVEL_XTOL * high, rtol=LEVEL_XTOL)


# ---------------------------------------------------------------- bits and power together


@dataclass(frozen=True)
class _BitLevels:
    """What :func:`bits_power_block` re-evaluates per level: the bit pairs' table and the rate curves."""

    table: BitsTable
    curve: RateCurve

    def at(self, problem: Problem, level: float) -> tuple[float, np.ndarray, np.ndarray]:
        """(lQ Phi + lE E_up + lT T, chosen pair index, power) of the best (pair, least p) per device at ``level``."""
        params, pmax = problem.params, problem.fleet.max_tx_power_w
        airtime = level - self.table.fixed
        with np.errstate(divide="ignore", invalid="ignore"):
            rate = np.where(airtime > 0, self.table.size / airtime, np.inf)
        if self.curve.width_hz.shape[1] == 1:
            power = self.curve.power_for_rate_w(rate)
        else:
            power = np.stack([self.curve.power_for_rate_w(rate[:, j]) for j in range(rate.shape[1])], axis=1)
        cost = self.table.quant + (params.lambda_energy * power * airtime if params.lambda_energy > 0 else 0.0)
        cost = np.where(power <= pmax[:, None] * (1 + 1e-12), cost, np.inf)
        choice = np.argmin(cost, axis=1)
        rows = np.arange(choice.size)
        total = float(np.sum(cost[rows, choice])) + params.lambda_time * level
        return total, choice, np.minimum(power[rows, choice], pmax)


def _bit_levels(problem: Problem, alloc: AllocationVectors) -> _BitLevels:
    """The per-level data of :func:`bits_power_block`."""
    return _BitLevels(bits_table(problem), rate_curve(problem, alloc))


def bits_power_block(
    problem: Problem, alloc: AllocationVectors, grid_points: int = 24, golden_steps: int = 32
) -> BlockResult:
    """(q, p) given B (or the subchannels): per latency level each device's cheapest (q, least power).

    Exact when lambda_time = 0 (the level is T_max and devices separate); with a latency weight
    the level is searched on a grid over [T_lo, T_max] refined by golden section.
    """
    check_allocation(problem, alloc)
    fleet, params = problem.fleet, problem.params
    levels = _bit_levels(problem, alloc)
    with np.errstate(divide="ignore"):
        fastest = levels.table.fixed + levels.table.size / levels.curve.rate_bps(fleet.max_tx_power_w)[:, None]
    lowest = float(np.max(np.min(fastest, axis=1)))
    if not lowest <= _cap_s(problem):
        return _failed("infeasible", f"even the fewest bits at max power need a round of {lowest:.6g} s > t_max_s")
    if params.lambda_time == 0 and params.lambda_energy > 0 and not math.isfinite(params.t_max_s):
        return _failed("unbounded", "t_max_s = inf and lambda_time = 0: energy falls as power -> 0, no minimum")
    value = lambda level: levels.at(problem, level)[0]  # noqa: E731
    if params.lambda_time == 0:  # only lQ Phi when lE = 0 too: the loosest level lets the most bits fit
        current = evaluate(problem, alloc).round_latency_s
        level = params.t_max_s if math.isfinite(params.t_max_s) else max(lowest, current)
    else:
        high = _level_high(problem, value, lowest)
        level = _grid_golden_min(value, lowest * (1 + 1e-13), high, grid_points, golden_steps)
    _, choice, power = levels.at(problem, level)
    return _optimal(problem, levels.table.allocation(choice, alloc, tx_power_w=power))


def _level_high(problem: Problem, value: Callable[[float], float], lowest: float) -> float:
    """T_max, or when uncapped a level beyond which lT T alone exceeds the value at ``lowest``."""
    params = problem.params
    if math.isfinite(params.t_max_s):
        return params.t_max_s
    return lowest + value(lowest * (1 + 1e-13)) / params.lambda_time


def _grid_golden_min(
    value: Callable[[float], float], low: float, high: float, grid_points: int, steps: int
) -> float:
    """The best level on a grid over [low, high], refined by golden section between its neighbours."""
    grid = np.linspace(low, high, grid_points)
    values = np.array([value(level) for level in grid])
    pick = int(np.argmin(values))
    left, right = grid[max(pick - 1, 0)], grid[min(pick + 1, grid_points - 1)]
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = right - ratio * (right - left), left + ratio * (right - left)
    fa, fb = value(a), value(b)
    for _ in range(steps):
        if fa <= fb:
            right, b, fb = b, a, fa
            a = right - ratio * (right - left)
            fa = value(a)
        else:
            left, a, fa = a, b, fb
            b = left + ratio * (right - left)
            fb = value(b)
    best = min((values[pick], grid[pick]), (fa, a), (fb, b))
    return float(best[1])


# ---------------------------------------------------------------- bandwidth


def uplink_data(problem: Problem, alloc: AllocationVectors, tx_power_w: np.ndarray | None = None) -> UplinkData:
    """The bandwidth block's data for ``alloc`` (powers overridable: max power for the cap level)."""
    fleet, params = problem.fleet, problem.params
    power = alloc.tx_power_w if tx_power_w is None else tx_power_w
    return UplinkData(
        power * fleet.gain / params.noise_psd_w_per_hz, power, uplink_bits(fleet, params, alloc.bits),
        fixed_time_s(fleet, params, alloc.bits_down), params.total_bandwidth_hz, params.t_max_s, params.lambda_energy,
        params.lambda_time,
    )


def _continuous_only(problem: Problem, block: str) -> None:
    """Raise ModelError when a continuous-bandwidth block is applied to a subchannel problem."""
    if problem.params.subchannels > 0:
        raise ModelError(block, ["params.subchannels > 0: use matching_block"])


def bandwidth_block(problem: Problem, alloc: AllocationVectors, solver: str = "kkt") -> BlockResult:
    """The exact bandwidths given q and p, by the KKT solver or cvxpy/Clarabel."""
    check_allocation(problem, alloc)
    _continuous_only(problem, "bandwidth_block")
    if solver not in BANDWIDTH_SOLVERS:
        raise ModelError("bandwidth_block", [f"solver: must be one of {BANDWIDTH_SOLVERS}, got {solver!r}"])
    if not (alloc.tx_power_w > 0).all():
        return _failed("infeasible", "a device with zero power has no rate at any bandwidth")
    data = uplink_data(problem, alloc)
    solution = kkt_bandwidth(data) if solver == "kkt" else cvxpy_bandwidth(data)
    if solution.status != "optimal":
        return _failed(solution.status, solution.message)
    return _optimal(problem, replace(alloc, bandwidth_hz=solution.bandwidth_hz, subchannels=None))


# ---------------------------------------------------------------- power and bandwidth together


def power_bandwidth_block(problem: Problem, alloc: AllocationVectors) -> BlockResult:
    """The exact (p, B) given q: the jointly convex problem, a Brent root of dV/dT over the level."""
    check_allocation(problem, alloc)
    _continuous_only(problem, "power_bandwidth_block")
    fleet, params = problem.fleet, problem.params
    size, fixed = uplink_bits(fleet, params, alloc.bits), fixed_time_s(fleet, params, alloc.bits_down)
    gain_n0 = fleet.gain / params.noise_psd_w_per_hz
    lowest = min_max_level_s(uplink_data(problem, alloc, fleet.max_tx_power_w))
    if not lowest <= _cap_s(problem):
        return _failed("infeasible", f"the whole band at max power needs a round of {lowest:.6g} s > t_max_s")
    warm = [np.nan]  # the last multiplier: nearby levels start from it

    def solve(level: float) -> joint.JointLevel:
        solution = joint.solve_level(
            size, level - fixed, gain_n0, fleet.max_tx_power_w, params.total_bandwidth_hz, warm[0]
        )
        warm[0] = float(solution.log_nu) if np.isfinite(solution.log_nu) else np.nan
        return solution

    if params.lambda_energy == 0:
        level = lowest
    elif params.lambda_time == 0:
        if not math.isfinite(params.t_max_s):
            return _failed("unbounded", "t_max_s = inf and lambda_time = 0: energy falls as power -> 0, no minimum")
        level = params.t_max_s
    else:
        level = _joint_level_s(problem, solve, size, fixed, gain_n0, lowest)
    solution = solve(min(max(level, lowest), params.t_max_s))
    if not solution.feasible:
        solution = solve(lowest * (1 + 1e-13))
    power = np.minimum(solution.tx_power_w, fleet.max_tx_power_w)
    return _optimal(problem, replace(alloc, tx_power_w=power, bandwidth_hz=solution.bandwidth_hz, subchannels=None))


def _joint_level_s(
    problem: Problem,
    solve: Callable[[float], joint.JointLevel],
    size: np.ndarray,
    fixed: np.ndarray,
    gain_n0: np.ndarray,
    lowest: float,
) -> float:
    """The level minimizing V(T) = lE sum e_k(T) + lT T (convex) on [lowest, T_max]."""
    params, pmax = problem.params, problem.fleet.max_tx_power_w

    def slope(level: float) -> float:
        solution = solve(level)
        if not solution.feasible:
            return -math.inf
        energy_slope = float(joint.level_slope(solution, size, level - fixed, gain_n0, pmax))
        return params.lambda_time + params.lambda_energy * energy_slope

    high = params.t_max_s
    if not math.isfinite(high):
        energy = float(np.sum(solve(lowest * (1 + 1e-12)).energy_j))
        high = joint.uncapped_level_s(lowest, params.lambda_time, params.lambda_energy, energy)
    if slope(high) <= 0:
        return high
    low = lowest * (1 + 1e-13)
    if slope(low) >= 0:
        return low
    return brentq(slope, low, high, xtol=LEVEL_XTOL * high, rtol=LEVEL_XTOL)


# ---------------------------------------------------------------- subchannels


def matching_data(problem: Problem, alloc: AllocationVectors) -> MatchingData:
    """The matching block's data for ``alloc``'s bits and powers."""
    fleet, params = problem.fleet, problem.params
    return MatchingData(
        problem.subchannel_gain, alloc.tx_power_w, uplink_bits(fleet, params, alloc.bits),
        fixed_time_s(fleet, params, alloc.bits_down),
        params.total_bandwidth_hz / params.subchannels, params.noise_psd_w_per_hz, params.t_max_s,
        params.lambda_energy, params.lambda_time,
    )


def matching_block(problem: Problem, alloc: AllocationVectors) -> BlockResult:
    """A stable subchannel assignment given q and p (from ``alloc``'s, or greedy when it has none)."""
    check_allocation(problem, alloc)
    if problem.params.subchannels == 0:
        raise ModelError("matching_block", ["params.subchannels is 0: use bandwidth_block"])
    data = matching_data(problem, alloc)
    start = alloc.subchannels if alloc.subchannels is not None else greedy_assignment(data)
    found = swap_matching(data, start)
    width = problem.params.total_bandwidth_hz / problem.params.subchannels
    result = replace(alloc, bandwidth_hz=found.held.sum(axis=1) * width, subchannels=found.held)
    note = "" if found.stable else f"stopped after {found.exchanges} exchanges, not yet stable"
    if found.shortfall > 0:
        message = "no assignment meets t_max_s" + (f"; {note}" if note else "")
        return BlockResult("infeasible", result, evaluate(problem, result).objective, message)
    return _optimal(problem, result, note)
