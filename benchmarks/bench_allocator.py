"""Allocator solve time against the goals of issue 7: N = 1,000 devices in < 1 s, 10,000 in < 10 s.

For seeded generated scenarios (``allocator.scenario.generate_scenario``, default t_max and
weights) of N = 10, 100, 1,000 and 10,000 devices, times a full ``allocator.bcd.solve`` (best
wall-clock of several runs) and prints its status, iterations and objective next to the fixed
baseline's; the same with a latency weight (N = 1,000 and 10,000), with gradient bits chosen per
device too (``allowed_bits_down`` 4-8 over a 20 Mbit/s downlink, N = 1,000 and 10,000) and with 2 N subchannels
(N = 10 to 300, swap matching). Then it times the bandwidth block alone with its two solvers side
by side (the KKT fast path and the cvxpy/Clarabel reference) for N = 10, 100 and 1,000 and prints
how far apart they are.

    .venv/bin/python benchmarks/bench_allocator.py [--quick] [--repeat N] [--seed S]
"""

from __future__ import annotations

import argparse
import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from allocator import bcd, blocks
from allocator.baselines import fixed
from allocator.scenario import generate_scenario
from allocator.system import AllocationVectors

SIZES = (10, 100, 1000, 10000)
LATENCY_WEIGHTED_SIZES = (1000, 10000)  # lambda_time = LAMBDA_TIME: the level searches run
LAMBDA_TIME = 0.05
GRADIENT_BITS = {"allowed_bits_down": (4, 5, 6, 7, 8), "downlink_rate_bps": 20e6}  # (q, g) pairs: 10 x 5
SUBCHANNEL_SIZES = (10, 30, 100, 300)  # with 2 N subchannels: swap matching instead of the bandwidth block
SLOW_SUBCHANNEL_DEVICES = 300  # timed once, not best of --repeat (about a minute)
GOALS_S = {1000: 1.0, 10000: 10.0}  # devices -> seconds a full solve may take
BANDWIDTH_SIZES = (10, 100, 1000)


@dataclass(frozen=True)
class SolveRow:
    """One full solve: its size, best wall time, the result's figures and the fixed baseline's."""

    setting: str
    devices: int
    best_s: float
    result: bcd.Result
    fixed_objective: float


def best_of(fn: Callable[[], object], repeat: int) -> tuple[float, object]:
    """The best wall-clock seconds of ``repeat`` calls of ``fn`` and the last call's value."""
    best, value = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - start)
    return best, value


def time_solve(setting: str, devices: int, seed: int, repeat: int, params: dict[str, object] | None = None) -> SolveRow:
    """Generate the seeded scenario of ``devices`` (SystemParams overrides ``params``) and time ``bcd.solve``."""
    problem = generate_scenario(devices, seed, params=params)
    best_s, result = best_of(lambda: bcd.solve(problem), repeat)
    return SolveRow(setting, devices, best_s, result, fixed(problem).evaluation.objective)


def solve_rows(seed: int, repeat: int, quick: bool) -> list[SolveRow]:
    """The default problem at every size, then with a latency weight, then with subchannels."""
    keep = lambda n: not quick or n <= 1000  # noqa: E731
    rows = [time_solve("default", n, seed, repeat) for n in SIZES if keep(n)]
    timed = {"lambda_time": LAMBDA_TIME}
    rows += [time_solve(f"lT={LAMBDA_TIME:g}", n, seed, repeat, timed) for n in LATENCY_WEIGHTED_SIZES if keep(n)]
    rows += [time_solve("q,g", n, seed, repeat, GRADIENT_BITS) for n in LATENCY_WEIGHTED_SIZES if keep(n)]
    for n in SUBCHANNEL_SIZES:
        if n < SLOW_SUBCHANNEL_DEVICES or not quick:
            runs = 1 if n >= SLOW_SUBCHANNEL_DEVICES else repeat
            rows.append(time_solve(f"M={2 * n}", n, seed, runs, {"subchannels": 2 * n}))
    return rows


def goal_mark(devices: int, seconds: float) -> str:
    """'met'/'MISSED' against the goal for this size, or '-' when there is none."""
    goal = GOALS_S.get(devices)
    if goal is None:
        return "-"
    return f"{'met' if seconds < goal else 'MISSED'} (< {goal:g} s)"


def print_solves(rows: list[SolveRow]) -> None:
    """One row per size: best wall time, the solver's own time, status, iterations, objective."""
    header = (
        f"{'setting':>9} {'N':>6} {'best s':>9} {'solver s':>9} {'status':>10} {'iters':>5} {'objective':>13}"
        f" {'fixed obj':>13} {'vs fixed':>9}  goal"
    )
    print(header)
    print("-" * (len(header) + 16))
    for row in rows:
        r = row.result
        gain = 100.0 * (row.fixed_objective - r.evaluation.objective) / row.fixed_objective
        print(
            f"{row.setting:>9} {row.devices:>6} {row.best_s:>9.4f} {r.solve_time_s:>9.4f} {r.status:>10}"
            f" {r.iterations:>5} {r.evaluation.objective:>13.6g} {row.fixed_objective:>13.6g} {gain:>8.1f}%"
            f"  {goal_mark(row.devices, row.best_s)}"
        )


@dataclass(frozen=True)
class BandwidthRow:
    """The bandwidth block at one size by both solvers: times, objectives and the largest B gap."""

    devices: int
    kkt_s: float
    cvxpy_first_s: float  # builds the parametrized program (cached per size) and solves
    cvxpy_resolve_s: float  # new parameter values, same program
    kkt_objective: float
    cvxpy_objective: float
    max_rel_bandwidth_gap: float


def time_bandwidth_block(devices: int, seed: int, repeat: int) -> BandwidthRow:
    """Time ``blocks.bandwidth_block`` with the KKT and the cvxpy solver on the fixed baseline's (q, p)."""
    problem = generate_scenario(devices, seed)
    # 8 bits, max power, equal band: feasible under the default cap
    start: AllocationVectors = fixed(problem).allocation
    kkt_s, kkt = best_of(lambda: blocks.bandwidth_block(problem, start, "kkt"), repeat)
    first_s, _ = best_of(lambda: blocks.bandwidth_block(problem, start, "cvxpy"), 1)
    resolve_s, ref = best_of(lambda: blocks.bandwidth_block(problem, start, "cvxpy"), repeat)
    for name, result in (("kkt", kkt), ("cvxpy", ref)):
        if result.status != "optimal":
            raise RuntimeError(f"bandwidth block ({name}) at N = {devices}: {result.status} {result.message}")
    gap = np.abs(kkt.allocation.bandwidth_hz - ref.allocation.bandwidth_hz) / ref.allocation.bandwidth_hz
    return BandwidthRow(devices, kkt_s, first_s, resolve_s, kkt.objective, ref.objective, float(np.max(gap)))


def print_bandwidth(rows: list[BandwidthRow]) -> None:
    """One row per size: the two solvers side by side."""
    header = (
        f"{'N':>6} {'KKT ms':>9} {'cvxpy 1st ms':>13} {'cvxpy ms':>9} {'cvxpy/KKT':>10}"
        f" {'rel. obj. gap':>14} {'max rel. B gap':>15}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        obj_gap = abs(row.kkt_objective - row.cvxpy_objective) / abs(row.cvxpy_objective)
        print(
            f"{row.devices:>6} {row.kkt_s * 1e3:>9.3f} {row.cvxpy_first_s * 1e3:>13.1f}"
            f" {row.cvxpy_resolve_s * 1e3:>9.1f} {row.cvxpy_resolve_s / row.kkt_s:>10.0f} {obj_gap:>14.2e}"
            f" {row.max_rel_bandwidth_gap:>15.2e}"
        )


def main(argv: list[str] | None = None) -> None:
    """Parse options, time the full solves and the bandwidth block, print both tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="stop at N = 1,000 (and 100 with subchannels)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per figure, best kept (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="scenario seed (default 0)")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")
    bcd.solve(generate_scenario(3, args.seed))  # warm-up: scipy's and cvxpy's imports are not solver time
    importlib.import_module("cvxpy")

    print(f"full solve: allocator.bcd.solve (bandwidth_solver='auto' = KKT), seeded scenarios (seed {args.seed}),")
    print(f"default t_max (1.5 x the fixed baseline's round latency) and weights; best of {args.repeat} runs")
    print("'solver s': the last run's Result.solve_time_s; 'vs fixed': objective below the fixed baseline")
    print("(8 bits, max power, equal bandwidth)\n")
    print(f"settings: default (lambda_time = 0, continuous band); lT={LAMBDA_TIME:g}: lambda_time = {LAMBDA_TIME:g};")
    print("q,g: gradient bits chosen per device too (allowed_bits_down 4-8, downlink 20 Mbit/s);")
    print(f"M=2N: 2 N equal subchannels (swap matching; N = {SLOW_SUBCHANNEL_DEVICES} timed once, not with --quick)\n")
    print_solves(solve_rows(args.seed, args.repeat, args.quick))

    print("\nbandwidth block alone (blocks.bandwidth_block) at the fixed baseline's bits and powers:")
    print("KKT solver vs cvxpy/Clarabel; 'cvxpy 1st' includes building the DPP program, which is cached per N;")
    print("gaps relative to cvxpy's objective and, per device, its bandwidth\n")
    print_bandwidth([time_bandwidth_block(n, args.seed, args.repeat) for n in BANDWIDTH_SIZES])


if __name__ == "__main__":
    main()
