"""The figures of docs/allocator.md, drawn from the allocator itself (never typed-in numbers).

(a) ``allocator_tmax.png``: total device energy, objective and mean bit-width vs the latency cap
    t_max for the joint allocation and the ``fixed`` baseline, on one seeded 10-device scenario;
(b) ``allocator_baselines.png``: objective, energy and round latency of the joint allocation and
    of every baseline on that scenario at its default cap (log scale; infeasible bars hatched);
(c) ``allocator_solve_time.png``: full-solve wall time vs the number of devices (log-log), with
    the goals (1,000 devices < 1 s, 10,000 < 10 s).

Each figure's numbers are printed as a table too. PNGs at dpi 100 go to ``docs/img/``.

    .venv/bin/python benchmarks/plot_allocator.py [--out docs/img] [--seed 0] [--quick]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from allocator.baselines import all_baselines, fixed
from allocator.bcd import solve
from allocator.scenario import generate_scenario
from allocator.system import Evaluation, Problem, compute_energy_j

DEVICES = 10
TMAX_FACTORS = np.geomspace(0.25, 4.0, 17)  # x the fixed baseline's round latency
SOLVE_SIZES = (10, 30, 100, 300, 1000, 3000, 10000)
GOALS_S = {1000: 1.0, 10000: 10.0}
DPI = 100
JOINT = "joint (BCD)"


@dataclass(frozen=True)
class SweepPoint:
    """The joint solve and the fixed baseline at one latency cap."""

    t_max_s: float
    status: str
    joint: Evaluation
    mean_bits: float
    fixed: Evaluation


def with_t_max(problem: Problem, t_max_s: float) -> Problem:
    """``problem`` with another latency cap."""
    return replace(problem, params=replace(problem.params, t_max_s=t_max_s))


def sweep_t_max(problem: Problem) -> list[SweepPoint]:
    """Solve ``problem`` at every cap of TMAX_FACTORS x the fixed baseline's round latency."""
    fixed_latency = fixed(problem).evaluation.round_latency_s
    points = []
    for factor in TMAX_FACTORS:
        capped = with_t_max(problem, float(factor * fixed_latency))
        result = solve(capped)
        points.append(
            SweepPoint(
                capped.params.t_max_s,
                result.status,
                result.evaluation,
                float(np.mean(result.allocation.bits)),
                fixed(capped).evaluation,
            )
        )
    return points


def print_sweep(points: list[SweepPoint]) -> None:
    """Table (a): one row per cap."""
    print("(a) joint allocation vs fixed (8 bits, max power, equal bandwidth) over the latency cap;")
    print("    an infeasible joint row is the solver's fallback (fewest bits, max power, min-max-latency band)")
    header = (
        f"{'t_max s':>9} {'status':>10} {'joint E J':>11} {'joint obj':>11} {'mean q':>7} {'joint T s':>10}"
        f" {'fixed E J':>11} {'fixed obj':>11} {'fixed ok':>8}"
    )
    print(header)
    print("-" * len(header))
    for pt in points:
        print(
            f"{pt.t_max_s:>9.1f} {pt.status:>10} {np.sum(pt.joint.energy_j):>11.3f} {pt.joint.objective:>11.3f}"
            f" {pt.mean_bits:>7.2f} {pt.joint.round_latency_s:>10.1f} {np.sum(pt.fixed.energy_j):>11.3f}"
            f" {pt.fixed.objective:>11.3f} {'yes' if pt.fixed.feasible else 'no':>8}"
        )
    print()


def plot_sweep(problem: Problem, points: list[SweepPoint], path: Path) -> None:
    """Figure (a): energy, objective and mean bits vs t_max; infeasible points hollow; the compute-energy floor."""
    import matplotlib.pyplot as plt

    t = np.array([pt.t_max_s for pt in points])
    ok = np.array([pt.status != "infeasible" for pt in points])
    fixed_ok = np.array([pt.fixed.feasible for pt in points])
    series = {
        "total device energy [J]": (
            [np.sum(pt.joint.energy_j) for pt in points],
            [np.sum(pt.fixed.energy_j) for pt in points],
        ),
        "objective": ([pt.joint.objective for pt in points], [pt.fixed.objective for pt in points]),
        "mean bit-width q": ([pt.mean_bits for pt in points], [8.0] * len(points)),
    }
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4), constrained_layout=True)
    for ax, (label, (joint, base)) in zip(axes, series.items()):
        joint, base = np.array(joint), np.array(base)
        ax.plot(t[ok], joint[ok], "o-", color="C0", ms=4, label=JOINT)
        ax.plot(t[~ok], joint[~ok], "o", color="C0", mfc="none", ms=4, label="joint: infeasible (fallback)")
        ax.plot(t[fixed_ok], base[fixed_ok], "s-", color="C1", ms=3, label="fixed")
        ax.plot(t[~fixed_ok], base[~fixed_ok], "s--", color="C1", mfc="none", ms=3, label="fixed: infeasible")
        ax.set_xscale("log")
        ax.set_xlabel("latency cap t_max [s]")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    floor = float(np.sum(compute_energy_j(problem.fleet)))
    axes[0].axhline(floor, color="gray", ls=":", lw=1, label="compute energy (no block changes it)")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{DEVICES} devices, seeded scenario: energy and objective vs the latency cap", fontsize=10)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def compare_baselines(problem: Problem) -> dict[str, Evaluation]:
    """The joint solve and every baseline on ``problem``, by display name."""
    rows = {JOINT: solve(problem).evaluation}
    rows.update((name, b.evaluation) for name, b in all_baselines(problem).items())
    return rows


def print_baselines(problem: Problem, rows: dict[str, Evaluation]) -> None:
    """Table (b): one row per method."""
    print(f"(b) joint allocation vs the baselines, {DEVICES} devices, t_max = {problem.params.t_max_s:.1f} s")
    header = f"{'method':<14} {'objective':>12} {'energy J':>12} {'latency s':>11} {'feasible':>8}"
    print(header)
    print("-" * len(header))
    for name, ev in rows.items():
        print(
            f"{name:<14} {ev.objective:>12.4f} {np.sum(ev.energy_j):>12.4f} {ev.round_latency_s:>11.1f}"
            f" {'yes' if ev.feasible else 'no':>8}"
        )
    print()


def plot_baselines(problem: Problem, rows: dict[str, Evaluation], path: Path) -> None:
    """Figure (b): three log-scale bar panels; infeasible methods hatched; t_max on the latency panel."""
    import matplotlib.pyplot as plt

    names = list(rows)
    panels = {
        "objective": [ev.objective for ev in rows.values()],
        "total device energy [J]": [float(np.sum(ev.energy_j)) for ev in rows.values()],
        "round latency [s]": [ev.round_latency_s for ev in rows.values()],
    }
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4), constrained_layout=True)
    x = np.arange(len(names))
    for ax, (label, values) in zip(axes, panels.items()):
        bars = ax.bar(x, values, color=[f"C{k}" for k in range(len(names))])
        for bar, ev in zip(bars, rows.values()):
            if not ev.feasible:
                bar.set_hatch("//")
                bar.set_alpha(0.6)
        ax.bar_label(bars, labels=[f"{v:.0f}" for v in values], fontsize=7)
        ax.set_yscale("log")
        ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(label)
        ax.grid(True, axis="y", which="both", alpha=0.3)
    axes[2].axhline(problem.params.t_max_s, color="k", ls="--", lw=1, label="t_max")
    axes[2].legend(fontsize=7)
    fig.suptitle(f"{DEVICES} devices at the default cap; hatched: violates t_max", fontsize=10)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def time_solves(seed: int, sizes: tuple[int, ...]) -> list[tuple[int, float, str, int]]:
    """(devices, best wall seconds of up to 3 solves, status, iterations) per size."""
    rows = []
    for n in sizes:
        problem = generate_scenario(n, seed)
        best, result = float("inf"), None
        for _ in range(3 if n <= 1000 else 1):
            start = time.perf_counter()
            result = solve(problem)
            best = min(best, time.perf_counter() - start)
        rows.append((n, best, result.status, result.iterations))
    return rows


def print_solve_times(rows: list[tuple[int, float, str, int]]) -> None:
    """Table (c)."""
    print("(c) full solve wall time (best of 3, one run for N > 1000)")
    print(f"{'N':>6} {'seconds':>9} {'status':>10} {'iters':>5}  goal")
    for n, seconds, status, iterations in rows:
        goal = GOALS_S.get(n)
        mark = "-" if goal is None else f"{'met' if seconds < goal else 'MISSED'} (< {goal:g} s)"
        print(f"{n:>6} {seconds:>9.4f} {status:>10} {iterations:>5}  {mark}")
    print()


def plot_solve_times(rows: list[tuple[int, float, str, int]], path: Path) -> None:
    """Figure (c): log-log wall time vs N, the goals as red markers."""
    import matplotlib.pyplot as plt

    n = np.array([r[0] for r in rows], dtype=float)
    s = np.array([r[1] for r in rows])
    fig, ax = plt.subplots(figsize=(5, 3.6), constrained_layout=True)
    ax.loglog(n, s, "o-", label="bcd.solve (measured)")
    ax.loglog(n, s[0] * n / n[0], ":", color="gray", label="linear in N (reference)")
    goals = [(k, v) for k, v in GOALS_S.items()]
    ax.plot([g[0] for g in goals], [g[1] for g in goals], "rv", ms=8, label="goal (must be below)")
    ax.set_xlabel("devices N")
    ax.set_ylabel("solve time [s]")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("allocator solve time vs fleet size", fontsize=10)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """Parse options, compute the three figures' numbers, print them and write the PNGs."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/img"), help="folder of the PNGs (default docs/img)")
    parser.add_argument("--seed", type=int, default=0, help="scenario seed (default 0)")
    parser.add_argument("--quick", action="store_true", help="solve-time curve up to 1,000 devices only")
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    args.out.mkdir(parents=True, exist_ok=True)
    problem = generate_scenario(DEVICES, args.seed)

    points = sweep_t_max(problem)
    print_sweep(points)
    plot_sweep(problem, points, args.out / "allocator_tmax.png")

    rows = compare_baselines(problem)
    print_baselines(problem, rows)
    plot_baselines(problem, rows, args.out / "allocator_baselines.png")

    sizes = tuple(n for n in SOLVE_SIZES if not args.quick or n <= 1000)
    times = time_solves(args.seed, sizes)
    print_solve_times(times)
    plot_solve_times(times, args.out / "allocator_solve_time.png")
    for name in ("allocator_tmax.png", "allocator_baselines.png", "allocator_solve_time.png"):
        print(f"wrote {args.out / name} ({(args.out / name).stat().st_size / 1024:.0f} kB)")


if __name__ == "__main__":
    main()
