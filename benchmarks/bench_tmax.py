"""Device energy and objective against the latency cap T_max: the allocator alone, then the closed loop.

(1) Closed loop: three ``sflam simulate`` runs (bits auto, 20 rounds, same seed) with a small,
    medium and large ``t_max_s``, one at a time. The server's allocator solves every round for the
    selected devices, calibrated by what they measured; the table shows what it chose (bits, its
    status) and what the round cost: energy per round by the system model on the run's own
    scenario and as the devices reported it, round latency modeled and measured, accuracy.
(2) Allocator only: on the scenario.json the first simulation wrote (its devices, profiles,
    channels and shard sizes), for the devices every round of that run selected, the joint
    allocation (``allocator.bcd.solve``) and the fixed baseline (8 bits, max power, equal band;
    ``allocator.baselines.fixed``) over caps from 0.25 x the shortest to 4 x the longest fixed
    baseline round latency (infeasible to loose; plot_allocator.py's factors). Means over the rounds.

Draws docs/img/results_tmax.png.

    .venv/bin/python benchmarks/bench_tmax.py [--t-max-runs 2.5,5,20] [--rounds 20] [--quick] [--out DIR]
    .venv/bin/python benchmarks/bench_tmax.py --sweep-only [--scenario runs/.../scenario.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench_accuracy import (IMG_DIR, SimJob, SimResults, check_jobs, default_out, print_failures, pyplot, run_jobs,
                            save_figure)
from plot_allocator import JOINT, TMAX_FACTORS, with_t_max

MODEL = "vit_quick_patch4_16"
DEVICES, PER_ROUND, LOCAL_EPOCHS = 10, 5, 5  # the simulate defaults (the demo fleet)
QUICK_CAPS, QUICK_ROUNDS = (2.5, 20.0), 3


# ---------------------------------------------------------------------------------------------
# (1) the closed loop


def loop_name(t_max_s: float) -> str:
    return f"tmax-{t_max_s:g}"


def loop_jobs(caps: Sequence[float], rounds: int, seed: int) -> list[SimJob]:
    """One sflam simulation (bits auto) per cap."""
    return [SimJob(loop_name(c), {"scheme": "sflam", "bits": "auto", "t_max_s": c, "rounds": rounds, "seed": seed},
                   f"t_max={c:g} s") for c in caps]


def counted_records(run_dir: Path) -> list[dict[str, Any]]:
    """The counted round records of a run's metrics.jsonl."""
    from sflam.sim_report import read_records

    return [r for r in read_records(run_dir / "metrics.jsonl") if r.get("counted")]


def loop_row(summary: Mapping[str, Any], records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """What the allocator chose and what the rounds cost, from a run's summary and records."""
    bits = [f["allocation"]["bits_up"] for r in records for f in r["devices"].values()]
    statuses = Counter((r.get("allocator") or {}).get("status", "none") for r in records)
    predicted = [r["allocator"]["predicted_round_latency_s"] for r in records if r.get("allocator")]
    return {
        "t_max_s": summary["options"]["t_max_s"], "rounds": summary["rounds"], "statuses": statuses,
        "mean_bits": float(np.mean(bits)) if bits else float("nan"),
        "predicted_s": float(np.mean(predicted)) if predicted else float("nan"),
        "modeled_s": summary["modeled"]["round_latency_s"], "measured_s": summary["mean_round_latency_s"],
        "modeled_j": summary["modeled"]["energy_j"], "reported_j": float(np.mean(summary["per_round"]["energy_j"])),
        "final": summary["final_accuracy"], "best": summary["best_accuracy"],
    }


def print_loop(rows: Sequence[Mapping[str, Any]]) -> None:
    """Table (1): a row per closed-loop run."""
    print("(1) closed loop, bits auto: per round, the allocator's choice and the cost (means over the rounds)")
    head = (f"{'t_max s':>8}{'rounds':>7}{'allocator status':>26}{'mean q':>7}{'T plan s':>9}{'T model s':>10}"
            f"{'T meas s':>9}{'E model J':>10}{'E rep J':>9}{'final':>8}{'best':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        status = ", ".join(f"{k} {v}" for k, v in sorted(r["statuses"].items()))
        print(f"{r['t_max_s']:>8g}{r['rounds']:>7}{status:>26}{r['mean_bits']:>7.2f}{r['predicted_s']:>9.2f}"
              f"{r['modeled_s']:>10.2f}{r['measured_s']:>9.2f}{r['modeled_j']:>10.4f}{r['reported_j']:>9.4f}"
              f"{100 * r['final']:>7.2f}%{100 * r['best']:>7.2f}%")
    print("    T plan: the server allocator's predicted round latency (calibrated by measured compute and server "
          "time on this host);\n    T model / E model: the system model on scenario.json (profile compute, emulated "
          "radios) with the chosen allocation;\n    T meas: the daemon's measured train phase; E rep: the devices' "
          "reported energy (estimated from their profile)")
    print()


# ---------------------------------------------------------------------------------------------
# (2) the allocator sweep


@dataclass(frozen=True)
class CapPoint:
    """Means over the rounds' problems at one cap: joint solve and fixed baseline."""

    t_max_s: float
    joint_feasible: int
    joint_energy_j: float
    joint_objective: float
    joint_bits: float
    joint_latency_s: float
    fixed_feasible: int
    fixed_energy_j: float
    fixed_objective: float
    problems: int
    compute_energy_j: float  # the mean round's compute energy: no allocation goes below it


def round_problems(scenario: Path, selections: Sequence[Sequence[str]]) -> list[Any]:
    """The scenario restricted to each round's selected devices (identical selections once)."""
    from allocator.scenario import load_scenario
    from sflam.sim_report import subset

    problem = load_scenario(scenario)
    unique = list(dict.fromkeys(tuple(s) for s in selections))
    return [subset(problem, ids) for ids in unique]


def fleet_chunks(scenario: Path, per_round: int) -> list[list[str]]:
    """Without a run to copy selections from: the fleet in consecutive groups of ``per_round``."""
    from allocator.scenario import load_scenario

    ids = list(load_scenario(scenario).fleet.ids)
    return [ids[k:k + per_round] for k in range(0, len(ids) - per_round + 1, per_round)]


def sweep(problems: Sequence[Any]) -> list[CapPoint]:
    """Joint BCD and fixed baseline on every problem at each cap, geometric from TMAX_FACTORS[0] x the
    shortest fixed-baseline round latency (infeasible) to TMAX_FACTORS[-1] x the longest (loose)."""
    from allocator.baselines import fixed
    from allocator.bcd import solve
    from allocator.system import compute_energy_j

    floor = float(np.mean([np.sum(compute_energy_j(p.fleet)) for p in problems]))
    base = [fixed(p).evaluation.round_latency_s for p in problems]
    caps = np.geomspace(TMAX_FACTORS[0] * min(base), TMAX_FACTORS[-1] * max(base), len(TMAX_FACTORS))
    points = []
    for cap in map(float, caps):
        joint = [solve(with_t_max(p, cap)) for p in problems]
        fix = [fixed(with_t_max(p, cap)).evaluation for p in problems]
        points.append(CapPoint(
            cap, sum(j.status != "infeasible" for j in joint),
            float(np.mean([np.sum(j.evaluation.energy_j) for j in joint])),
            float(np.mean([j.evaluation.objective for j in joint])),
            float(np.mean([np.mean(j.allocation.bits) for j in joint])),
            float(np.mean([j.evaluation.round_latency_s for j in joint])),
            sum(f.feasible for f in fix), float(np.mean([np.sum(f.energy_j) for f in fix])),
            float(np.mean([f.objective for f in fix])), len(problems), floor))
    return points


def print_sweep(points: Sequence[CapPoint], source: str) -> None:
    """Table (2): a row per cap."""
    n = points[0].problems if points else 0
    print(f"(2) allocator only, {source}: joint BCD vs fixed (8 bits, max power, equal band), means over {n} round "
          "problems;\n    'ok' counts the feasible ones (an infeasible joint solve returns its fallback: fewest bits, "
          f"max power);\n    compute energy alone (a floor no allocation changes): {points[0].compute_energy_j:.4f} J per round")
    head = (f"{'T_max s':>8}{'joint ok':>9}{'E joint J':>10}{'obj joint':>10}{'mean q':>7}{'T joint s':>10}"
            f"{'fixed ok':>9}{'E fixed J':>10}{'obj fixed':>10}{'E joint/fixed':>14}")
    print(head)
    print("-" * len(head))
    for p in points:
        ratio = f"{p.joint_energy_j / p.fixed_energy_j:.3f}" if p.joint_feasible == p.fixed_feasible == n else "-"
        print(f"{p.t_max_s:>8.3f}{f'{p.joint_feasible}/{n}':>9}{p.joint_energy_j:>10.4f}{p.joint_objective:>10.4f}"
              f"{p.joint_bits:>7.2f}{p.joint_latency_s:>10.3f}{f'{p.fixed_feasible}/{n}':>9}{p.fixed_energy_j:>10.4f}"
              f"{p.fixed_objective:>10.4f}{ratio:>14}")
    print()


# ---------------------------------------------------------------------------------------------
# figure and main


def plot_tmax(points: Sequence[CapPoint], loop: Sequence[Mapping[str, Any]], results: SimResults | None,
              path: Path) -> None:
    """Energy, objective and mean bits vs T_max (sweep lines, closed-loop markers); closed-loop accuracy."""
    plt = pyplot()
    panels = 4 if loop else 3
    fig, axes = plt.subplots(1, panels, figsize=(4.1 * panels, 3.6), constrained_layout=True)
    t = np.array([p.t_max_s for p in points])
    n = points[0].problems
    ok = np.array([p.joint_feasible == n for p in points])
    fixed_ok = np.array([p.fixed_feasible == n for p in points])
    series = ((axes[0], "device energy per round [J]", "joint_energy_j", "fixed_energy_j"),
              (axes[1], "objective", "joint_objective", "fixed_objective"),
              (axes[2], "mean bit-width q", "joint_bits", None))
    for ax, label, joint_key, fixed_key in series:
        joint = np.array([getattr(p, joint_key) for p in points])
        ax.plot(t[ok], joint[ok], "o-", color="C0", ms=4, label=JOINT)
        ax.plot(t[~ok], joint[~ok], "o", color="C0", mfc="none", ms=4, label="joint: some round infeasible")
        if fixed_key:
            base = np.array([getattr(p, fixed_key) for p in points])
            ax.plot(t[fixed_ok], base[fixed_ok], "s-", color="C1", ms=3, label="fixed 8 bits")
            ax.plot(t[~fixed_ok], base[~fixed_ok], "s", color="C1", mfc="none", ms=3, label="fixed: infeasible")
        ax.set(xscale="log", xlabel="T_max [s]", ylabel=label)
        ax.grid(alpha=0.3, which="both")
    axes[0].axhline(points[0].compute_energy_j, color="gray", ls=":", lw=1, label="compute energy (floor)")
    if loop:
        caps = [r["t_max_s"] for r in loop]
        axes[0].plot(caps, [r["modeled_j"] for r in loop], "D", color="C2", ms=7, label="closed loop (model)")
        axes[0].plot(caps, [r["reported_j"] for r in loop], "^", color="C3", ms=7, label="closed loop (reported)")
        axes[2].plot(caps, [r["mean_bits"] for r in loop], "D", color="C2", ms=7, label="closed loop")
        for k, r in enumerate(loop):
            s = results.summaries[loop_name(r["t_max_s"])]
            axes[3].plot(s["accuracy_rounds"], [100 * a for a in s["accuracy_per_round"]], color=f"C{k + 4}",
                         label=f"t_max = {r['t_max_s']:g} s")
        axes[3].set(xlabel="round", ylabel="test accuracy [%]", title="closed loop: accuracy")
        axes[3].grid(alpha=0.3)
        axes[3].legend(fontsize="small")
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=7)
    axes[2].legend(fontsize=7)
    fig.suptitle("rounds of 5 devices of the demo fleet (vit_quick_patch4_16, 5 local epochs): energy and objective "
                 "vs T_max", fontsize=10)
    save_figure(fig, path)


def parse_caps(text: str) -> list[float]:
    """A comma list of positive seconds; ValueError says what is wrong."""
    try:
        caps = [float(c) for c in text.split(",") if c.strip()]
    except ValueError as exc:
        raise ValueError(f"expected comma-separated seconds, got {text!r}") from exc
    if not caps or any(not np.isfinite(c) or c <= 0 for c in caps):
        raise ValueError(f"expected positive seconds, got {text!r}")
    return caps


def sweep_source(args: argparse.Namespace, out: Path, results: SimResults | None) -> tuple[Path, list, str]:
    """(scenario.json, round selections, a description) for the sweep."""
    if results is not None and results.summaries:
        name = next(iter(results.summaries))
        scenario = out / name / "scenario.json"
        selections = [r["selected"] for r in counted_records(out / name)]
        return scenario, selections, f"the scenario and round selections of the {name} run"
    if args.scenario is not None:
        return args.scenario, fleet_chunks(args.scenario, args.per_round), f"{args.scenario} in rounds of {args.per_round}"
    from allocator.scenario import dump_scenario, generate_scenario

    out.mkdir(parents=True, exist_ok=True)
    scenario = out / "generated-scenario.json"
    dump_scenario(generate_scenario(DEVICES, args.seed, model=MODEL, local_epochs=LOCAL_EPOCHS), scenario)
    return scenario, fleet_chunks(scenario, args.per_round), (f"generate_scenario({DEVICES}, {args.seed}) in rounds "
                                                              f"of {args.per_round}")


def main(argv: list[str] | None = None) -> int:
    """Parse the options, run the closed loop, sweep the allocator, print the tables, draw the figure."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--t-max-runs", default="2.5,5,20", help="closed-loop caps in seconds (comma list)")
    parser.add_argument("--rounds", type=int, default=20, help="rounds of every closed-loop simulation")
    parser.add_argument("--seed", type=int, default=0, help="seed of every simulation (and a generated scenario)")
    parser.add_argument("--quick", action="store_true", help=f"caps {QUICK_CAPS}, {QUICK_ROUNDS} rounds (a smoke run)")
    parser.add_argument("--sweep-only", action="store_true", help="no simulations: the allocator sweep alone")
    parser.add_argument("--scenario", type=Path, default=None,
                        help="with --sweep-only: a scenario.json to sweep (default: the generated demo fleet)")
    parser.add_argument("--per-round", type=int, default=PER_ROUND, help="with --sweep-only: devices per round")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder of the run directories (default: runs/bench-tmax-<UTC time>)")
    parser.add_argument("--reuse", action="store_true",
                        help="keep completed runs with the same options found in --out instead of refusing it")
    parser.add_argument("--img", type=Path, default=IMG_DIR, help="folder of results_tmax.png")
    args = parser.parse_args(argv)
    try:
        caps = list(QUICK_CAPS) if args.quick else parse_caps(args.t_max_runs)
    except ValueError as exc:
        parser.error(f"--t-max-runs: {exc}")
    if args.rounds < 1 or args.per_round < 1:
        parser.error("--rounds and --per-round must be >= 1")
    if args.scenario is not None and not args.sweep_only:
        parser.error("--scenario goes with --sweep-only (the closed loop sweeps its own scenario)")
    if args.scenario is not None and not args.scenario.is_file():
        parser.error(f"--scenario: no such file {args.scenario}")
    rounds = QUICK_ROUNDS if args.quick else args.rounds
    out = args.out or default_out("bench-tmax")
    results, loop = None, []
    if not args.sweep_only:
        jobs = loop_jobs(caps, rounds, args.seed)
        problems = check_jobs(jobs, out, args.reuse)
        if problems:
            parser.error("\n  " + "\n  ".join(problems))
        print(f"closed loop: {len(jobs)} simulations of {rounds} rounds, bits auto, t_max {caps} s (seed "
              f"{args.seed}), one at a time, in {out}", flush=True)
        results = run_jobs(jobs, out, reuse=args.reuse)
        print(f"\nall runs done in {results.wall_s / 60:.1f} min\n")
        loop = [loop_row(results.summaries[loop_name(c)], counted_records(out / loop_name(c)))
                for c in caps if loop_name(c) in results.summaries]
        print_loop(loop)
    scenario, selections, source = sweep_source(args, out, results)
    points = sweep(round_problems(scenario, selections))
    print_sweep(points, source)
    if results is not None:
        print_failures(results)
    plot_tmax(points, loop, results, args.img / "results_tmax.png")
    return 1 if results is not None and results.failures else 0


if __name__ == "__main__":
    sys.exit(main())
