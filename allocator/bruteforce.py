"""The global optimum of a small continuous-bandwidth problem (2-3 devices), for tests.

Every combination of the devices' (uplink, downlink) bit pairs is enumerated. For a combination
and a latency level T each device meets T with the least power, and the band is split by the
convex (B | T) problem of
:func:`allocator.joint.solve_level` (power caps as B_k >= beta_k(T)). The level is searched on a
dense grid over [T_lo, T_max] and refined by golden section around the best grid point, using
objective values only (not the derivative :func:`allocator.blocks.power_bandwidth_block` uses).
Everything is batched: combinations x grid points in one call.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from allocator import joint
from allocator.system import (
    AllocationVectors,
    Evaluation,
    ModelError,
    Problem,
    compute_energy_j,
    evaluate,
    fixed_time_s,
    quant_variance,
)

MAX_DEVICES = 4
MAX_COMBINATIONS = 50_000
GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


@dataclass(frozen=True)
class BruteForceResult:
    """The optimum ("optimal"), or "infeasible" / "unbounded" with allocation None."""

    status: str
    objective: float
    allocation: AllocationVectors | None
    evaluation: Evaluation | None
    combinations: int


class _Combos:
    """The batched data of every bit combination: uplink and downlink bits, uplink size and fixed time
    (C, N) each, and the objective's constant (C,)."""

    def __init__(self, problem: Problem) -> None:
        fleet, params = problem.fleet, problem.params
        self.problem = problem
        up, down = params.bit_pairs
        pairs = np.array(list(itertools.product(range(up.size), repeat=len(fleet))), dtype=np.int64)
        self.bits, self.bits_down = up[pairs], down[pairs]
        per_sample = params.elements_per_sample * self.bits + params.label_bits
        self.size = fleet.samples * per_sample + params.weight_bits + params.overhead_bits
        phi = np.stack([quant_variance(fleet, params, q, g) for q, g in zip(self.bits, self.bits_down)]).sum(axis=1)
        self.constant = params.lambda_energy * float(np.sum(compute_energy_j(fleet))) + params.lambda_quant * phi
        self.fixed = np.stack([fixed_time_s(fleet, params, g) for g in self.bits_down])
        self.gain_n0 = fleet.gain / params.noise_psd_w_per_hz

    def value(
        self, rows: np.ndarray, level: np.ndarray, start: np.ndarray | float = np.nan
    ) -> tuple[np.ndarray, np.ndarray]:
        """The objective of combinations ``rows`` at levels ``level`` (same shape; inf: infeasible) and
        the budget multipliers there (``start``: multipliers of nearby levels, a warm start)."""
        params, fleet = self.problem.params, self.problem.fleet
        solution = joint.solve_level(
            self.size[rows], level[..., None] - self.fixed[rows], self.gain_n0, fleet.max_tx_power_w,
            params.total_bandwidth_hz, start,
        )
        energy = solution.energy_j.sum(axis=-1) if params.lambda_energy > 0 else 0.0
        total = self.constant[rows] + params.lambda_energy * energy + params.lambda_time * level
        return np.where(solution.feasible, total, np.inf), solution.log_nu


def brute_force(problem: Problem, *, grid_points: int = 24, golden_steps: int = 36) -> BruteForceResult:
    """Enumerate bits; per combination search the level T (grid + golden section); take the best."""
    _check(problem, grid_points, golden_steps)
    params, combos = problem.params, _Combos(problem)
    count = combos.bits.shape[0]
    if not math.isfinite(params.t_max_s) and params.lambda_time == 0 and params.lambda_energy > 0:
        return BruteForceResult("unbounded", -math.inf, None, None, count)
    fleet = problem.fleet
    lowest = joint.min_level_s(
        combos.size, combos.fixed, combos.gain_n0, fleet.max_tx_power_w, params.total_bandwidth_hz
    )
    lowest = lowest * (1 + 1e-13)
    rows = np.nonzero(lowest <= params.t_max_s * (1 + 1e-10))[0]
    if rows.size == 0:
        return BruteForceResult("infeasible", math.inf, None, None, count)
    lowest = np.minimum(lowest[rows], params.t_max_s)
    level, value = _best_levels(combos, rows, lowest, grid_points, golden_steps)
    best = int(np.argmin(value))
    return _result(problem, combos, rows[best], level[best], count)


def _check(problem: Problem, grid_points: int, golden_steps: int) -> None:
    """Raise ModelError for problems or settings the brute force does not take."""
    problems = []
    n, q = len(problem.fleet), problem.params.bit_pairs[0].size
    if problem.params.subchannels > 0:
        problems.append("subchannels: the brute force covers continuous bandwidth only")
    if n > MAX_DEVICES or q**n > MAX_COMBINATIONS:
        limit = f"at most {MAX_DEVICES} devices and {MAX_COMBINATIONS} combinations"
        problems.append(f"{n} devices x {q} bit pairs: {limit}")
    if grid_points < 3 or golden_steps < 1:
        problems.append(f"grid_points >= 3 and golden_steps >= 1, got {grid_points} and {golden_steps}")
    if problems:
        raise ModelError("brute_force", problems)


def _best_levels(
    combos: _Combos, rows: np.ndarray, lowest: np.ndarray, grid_points: int, golden_steps: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per feasible combination the best level and its objective."""
    params = combos.problem.params
    if params.lambda_energy == 0 or (params.lambda_time == 0 and math.isfinite(params.t_max_s)):
        level = lowest if params.lambda_energy == 0 else np.full(rows.shape, params.t_max_s)
        return level, combos.value(rows, level)[0]
    highest = np.full(rows.shape, params.t_max_s)
    if not math.isfinite(params.t_max_s):
        energy_term = combos.value(rows, lowest)[0] - combos.constant[rows] - params.lambda_time * lowest
        highest = lowest + energy_term / params.lambda_time  # beyond it lT T alone exceeds the value at lowest
    fraction = np.linspace(0.0, 1.0, grid_points)
    grid = lowest[:, None] + (highest - lowest)[:, None] * fraction[None, :]
    values, log_nu = combos.value(np.broadcast_to(rows[:, None], grid.shape), grid)
    pick = np.argmin(values, axis=1)
    at = np.arange(rows.size)
    left, right = grid[at, np.maximum(pick - 1, 0)], grid[at, np.minimum(pick + 1, grid_points - 1)]
    level, value = _golden(combos, rows, left, right, golden_steps, log_nu[at, pick])
    better = value < values[at, pick]
    return np.where(better, level, grid[at, pick]), np.where(better, value, values[at, pick])


def _golden(
    combos: _Combos, rows: np.ndarray, left: np.ndarray, right: np.ndarray, steps: int, log_nu: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Batched golden-section search of the (convex) objective over [left, right] per combination."""
    inner_left = right - GOLDEN * (right - left)
    inner_right = left + GOLDEN * (right - left)
    value_left, log_nu = combos.value(rows, inner_left, log_nu)
    value_right, log_nu = combos.value(rows, inner_right, log_nu)
    for _ in range(steps):
        go_left = value_left <= value_right
        right = np.where(go_left, inner_right, right)
        left = np.where(go_left, left, inner_left)
        new_left, new_right = right - GOLDEN * (right - left), left + GOLDEN * (right - left)
        probe = np.where(go_left, new_left, new_right)
        value, log_nu = combos.value(rows, probe, log_nu)
        inner_left, inner_right, value_left, value_right = (
            np.where(go_left, new_left, inner_right), np.where(go_left, inner_left, new_right),
            np.where(go_left, value, value_right), np.where(go_left, value_left, value),
        )
    take_left = value_left <= value_right
    return np.where(take_left, inner_left, inner_right), np.where(take_left, value_left, value_right)


def _result(problem: Problem, combos: _Combos, row: int, level: float, count: int) -> BruteForceResult:
    """The allocation of the best combination at its best level, scored by the system model."""
    fleet, params = problem.fleet, problem.params
    solution = joint.solve_level(
        combos.size[row], level - combos.fixed[row], combos.gain_n0, fleet.max_tx_power_w, params.total_bandwidth_hz
    )
    power_w = np.minimum(solution.tx_power_w, fleet.max_tx_power_w)
    bits_down = combos.bits_down[row] if params.allowed_bits_down else None
    alloc = AllocationVectors(combos.bits[row], power_w, solution.bandwidth_hz, bits_down=bits_down)
    evaluation = evaluate(problem, alloc)
    return BruteForceResult("optimal", evaluation.objective, alloc, evaluation, count)
