"""The SFLAM paper's figure types at small scale (digits, the quickstart ViT), through `sflam simulate`.

    python benchmarks/experiments.py accuracy   # accuracy per round: alpha {0.1, 0.5, 1.0} x bits {2, 4, 8, 32}
    python benchmarks/experiments.py tmax       # energy and objective against T_max (allocator + closed loop)
    python benchmarks/experiments.py schemes    # time and energy per round: sflam vs sfl / sl / fl
    python benchmarks/experiments.py all

Every run is a real `sflam simulate` (broker, server and device processes) in its own directory
under --out; up to --jobs run at once (emulated radio airtime is mostly sleeping, so runs overlap
well on 2 cores; accuracy does not depend on it, the measured wall times do). Tables print
side-by-side ratios from this run; figures go to --img (docs/img by default). Nothing printed is
stored: every number comes from the runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# ---------------------------------------------------------------------------------------------
# running simulations


def run_all(jobs: list[tuple[str, list[str]]], out: Path, parallel: int) -> dict[str, dict[str, Any]]:
    """Run ``sflam simulate`` for each (name, args) into out/name; returns name -> summary."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = time.monotonic()
    done: list[str] = []

    def one(job: tuple[str, list[str]]) -> tuple[str, dict[str, Any]]:
        name, args = job
        run_dir = out / name
        summary_path = run_dir / "summary.json"
        if summary_path.is_file() and json.loads(summary_path.read_text()).get("status") == "completed":
            summary = json.loads(summary_path.read_text())  # --out reused: a completed run is kept
        else:
            if run_dir.exists():
                subprocess.run(["rm", "-rf", str(run_dir)], check=True)
            log = out / f"{name}.log"
            with open(log, "w") as handle:
                code = subprocess.call([sys.executable, "-m", "sflam", "simulate", *args, "--out", str(run_dir)],
                                       cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)
            if code != 0:
                raise RuntimeError(f"{name}: sflam simulate exited {code}; see {log}")
            summary = json.loads(summary_path.read_text())
        done.append(name)
        print(f"  [{len(done)}/{len(jobs)}] {name}: final accuracy {summary['final_accuracy']:.2%}, "
              f"{summary['wall_s']:.0f} s ({time.monotonic() - started:.0f} s elapsed)", flush=True)
        return name, summary

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        return dict(pool.map(one, jobs))


def _best(summary: dict) -> str:
    """The test accuracy of the round the validation set picks ("-" without a validation set)."""
    best = summary.get("best_on_validation")
    return f"{best['test_accuracy']:.2%}" if best else "-"


def tail_mean(summary: dict[str, Any], k: int = 5) -> float:
    """Mean accuracy over the last k evaluated rounds (less noisy than the last one)."""
    acc = summary["accuracy_per_round"][-k:]
    return float(np.mean(acc)) if acc else float("nan")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ---------------------------------------------------------------------------------------------
# accuracy per round over alpha x bits


def accuracy(args: argparse.Namespace) -> None:
    alphas = [float(a) for a in args.alphas.split(",")]
    bits = [int(b) for b in args.bits.split(",")]
    jobs = []
    for alpha in alphas:
        for q in bits:
            scheme = ["--scheme", "sfl"] if q == 32 else ["--bits", str(q)]
            jobs.append((f"acc-a{alpha:g}-q{q}", ["--alpha", str(alpha), *scheme, "--rounds", str(args.rounds),
                                                   "--seed", str(args.seed)]))
    print(f"accuracy: {len(jobs)} runs of {args.rounds} rounds (alpha {alphas} x bits {bits}), {args.jobs} at a time")
    results = run_all(jobs, args.out, args.jobs)
    print(f"\n{'alpha':>6} {'bits':>5} {'final acc':>10} {'last-5 mean':>12} {'best (val)':>10} {'vs fp32 (pts)':>14}"
          f" {'bytes up MB':>12} {'up / fp32 run':>14}")
    for alpha in alphas:
        ref = results[f"acc-a{alpha:g}-q32"] if 32 in bits else None
        for q in bits:
            s = results[f"acc-a{alpha:g}-q{q}"]
            diff = f"{100 * (tail_mean(s) - tail_mean(ref)):+.1f}" if ref else "-"
            ratio = f"{s['bytes_up'] / ref['bytes_up']:.3f}" if ref else "-"
            print(f"{alpha:>6g} {q:>5} {s['final_accuracy']:>10.2%} {tail_mean(s):>12.2%} {_best(s):>10}"
                  f" {diff:>14} {s['bytes_up'] / 1e6:>12.1f} {ratio:>14}")
    plt = _plt()
    fig, axes = plt.subplots(1, len(alphas), figsize=(4.2 * len(alphas), 3.4), sharey=True)
    for ax, alpha in zip(np.atleast_1d(axes), alphas):
        for q in bits:
            s = results[f"acc-a{alpha:g}-q{q}"]
            ax.plot(s["accuracy_rounds"], [100 * a for a in s["accuracy_per_round"]],
                    label="fp32" if q == 32 else f"q={q}")
        ax.set(title=f"Dirichlet alpha = {alpha:g}", xlabel="round")
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("test accuracy [%]")
    np.atleast_1d(axes)[-1].legend()
    _save(fig, args.img / "results_accuracy.png")


# ---------------------------------------------------------------------------------------------
# energy and objective against T_max


def tmax(args: argparse.Namespace) -> None:
    import dataclasses

    from allocator.baselines import fixed
    from allocator.bcd import solve
    from allocator.scenario import generate_scenario

    # the demo fleet's scenario: 10 devices, its profiles and channels; 5 of them in a round
    problem = generate_scenario(5, args.seed, model="vit_quick_patch4_16", local_epochs=5)
    base = fixed(problem).evaluation
    caps = base.round_latency_s * np.geomspace(0.2, 4.0, 14)
    rows = []
    for cap in caps:
        p = dataclasses.replace(problem, params=dataclasses.replace(problem.params, t_max_s=float(cap)))
        r, f = solve(p), fixed(p).evaluation
        rows.append((cap, r.status, float(np.sum(r.evaluation.energy_j)), r.evaluation.objective,
                     float(np.mean(r.allocation.bits)), f.feasible, float(np.sum(f.energy_j)), f.objective))
    print(f"allocator on the demo fleet (5 devices per round, vit_quick, 5 local epochs; fixed round latency "
          f"{base.round_latency_s:.3f} s)")
    print(f"{'T_max s':>8} {'status':>11} {'E joint J':>10} {'obj joint':>10} {'mean q':>7} {'fixed ok':>9}"
          f" {'E fixed J':>10} {'obj fixed':>10} {'E joint/fixed':>14}")
    for cap, status, e, o, q, fok, fe, fo in rows:
        ratio = f"{e / fe:.3f}" if status != "infeasible" and fok else "-"
        print(f"{cap:>8.3f} {status:>11} {e:>10.4f} {o:>10.4f} {q:>7.2f} {'yes' if fok else 'no':>9}"
              f" {fe:>10.4f} {fo:>10.4f} {ratio:>14}")
    # closed loop: the same fleet trained with three caps
    caps_run = [float(c) for c in args.tmax_runs.split(",")]
    jobs = [(f"tmax-{c:g}", ["--t-max", str(c), "--rounds", str(args.tmax_rounds), "--seed", str(args.seed)])
            for c in caps_run]
    print(f"\nclosed loop: {len(jobs)} simulations of {args.tmax_rounds} rounds, bits auto, t_max {caps_run} s")
    results = run_all(jobs, args.out, args.jobs)
    print(f"\n{'t_max s':>8} {'model E/round J':>16} {'reported E/round J':>19} {'model T/round s':>16}"
          f" {'mean bits':>10} {'final acc':>10}")
    for c in caps_run:
        s = results[f"tmax-{c:g}"]
        from server_runtime.metrics import read_round_records

        records = read_round_records(args.out / f"tmax-{c:g}" / "metrics.jsonl")
        mean_bits = np.mean([f.allocation.bits_up for r in records for f in r.devices.values()])
        print(f"{c:>8g} {s['modeled']['energy_j']:>16.4f} {s['device_energy_j'] / s['rounds']:>19.4f}"
              f" {s['modeled']['round_latency_s']:>16.3f} {mean_bits:>10.2f} {s['final_accuracy']:>10.2%}")
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    ok = [r for r in rows if r[1] != "infeasible"]
    axes[0].plot([r[0] for r in ok], [r[2] for r in ok], marker="o", label="joint (BCD)")
    fixed_ok = [r for r in rows if r[5]]
    axes[0].plot([r[0] for r in fixed_ok], [r[6] for r in fixed_ok], marker="s", label="fixed 8 bits")
    axes[0].set(xscale="log", xlabel="T_max [s]", ylabel="device energy per round [J]", title="energy vs T_max")
    axes[1].plot([r[0] for r in ok], [r[3] for r in ok], marker="o", label="joint (BCD)")
    axes[1].plot([r[0] for r in fixed_ok], [r[7] for r in fixed_ok], marker="s", label="fixed 8 bits")
    axes[1].set(xscale="log", xlabel="T_max [s]", ylabel="objective", title="objective vs T_max")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    _save(fig, args.img / "results_tmax.png")


# ---------------------------------------------------------------------------------------------
# the schemes side by side


SCHEMES = [("sflam-auto", ["--scheme", "sflam"]), ("sflam-q8", ["--scheme", "sflam", "--bits", "8"]),
           ("sfl", ["--scheme", "sfl"]), ("sl", ["--scheme", "sl"]), ("fl", ["--scheme", "fl"])]


def schemes(args: argparse.Namespace) -> None:
    from sflam.sim_report import render_comparison

    jobs = [(f"scheme-{name}", [*flags, "--rounds", str(args.rounds), "--seed", str(args.seed)])
            for name, flags in SCHEMES if name.split("-")[0] in args.schemes.split(",") or name in args.schemes.split(",")]
    print(f"schemes: {len(jobs)} runs of {args.rounds} rounds, {args.jobs} at a time")
    results = run_all(jobs, args.out, args.jobs)
    names = [name for name, _ in jobs]
    print("\n" + render_comparison([results[n] for n in names]))
    ref = results.get("scheme-sfl")
    if ref:
        print("\nagainst sfl (fp32 SFL, fixed allocation), same seed and rounds:")
        print(f"{'scheme':<12} {'model T/round':>14} {'model E/round':>14} {'bytes up':>9} {'final acc pts':>14}"
              f" {'last-5 pts':>11}")
        for n in names:
            s = results[n]
            print(f"{n.removeprefix('scheme-'):<12} {s['modeled']['round_latency_s'] / ref['modeled']['round_latency_s']:>14.3f}"
                  f" {s['modeled']['energy_j'] / ref['modeled']['energy_j']:>14.3f}"
                  f" {s['bytes_up'] / ref['bytes_up']:>9.3f}"
                  f" {100 * (s['final_accuracy'] - ref['final_accuracy']):>+14.2f}"
                  f" {100 * (tail_mean(s) - tail_mean(ref)):>+11.2f}")
    q8 = results.get("scheme-sflam-q8")
    if q8 and ref:
        gap = 100 * abs(q8["final_accuracy"] - ref["final_accuracy"])
        print(f"\nq=8 vs sfl after {args.rounds} rounds: |final accuracy difference| = {gap:.2f} points "
              f"(goal <= 1: {'met' if gap <= 1 else 'missed'}); last-5 mean difference "
              f"{100 * abs(tail_mean(q8) - tail_mean(ref)):.2f} points")
        print(f"q=8 bytes_up / bytes_up_fp32 = {q8['bytes_up'] / q8['bytes_up_fp32']:.3f} (about 0.25 expected), "
              f"q=8 bytes_up / sfl bytes_up = {q8['bytes_up'] / ref['bytes_up']:.3f}")
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    labels = [n.removeprefix("scheme-") for n in names]
    axes[0].bar(labels, [results[n]["modeled"]["round_latency_s"] for n in names])
    axes[0].set(ylabel="s per round (system model)", title="round latency", yscale="log")
    axes[1].bar(labels, [results[n]["modeled"]["energy_j"] for n in names])
    axes[1].set(ylabel="J per round (system model)", title="device energy", yscale="log")
    for n, label in zip(names, labels):
        s = results[n]
        axes[2].plot(s["accuracy_rounds"], [100 * a for a in s["accuracy_per_round"]], label=label)
    axes[2].set(xlabel="round", ylabel="test accuracy [%]", title="accuracy per round")
    axes[2].legend(fontsize="small")
    for ax in axes:
        ax.grid(alpha=0.3, axis="y")
    _save(fig, args.img / "results_schemes.png")


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", choices=("accuracy", "tmax", "schemes", "all"))
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "experiments", help="run directories")
    parser.add_argument("--img", type=Path, default=ROOT / "docs" / "img", help="where the PNGs go")
    parser.add_argument("--jobs", type=int, default=3, help="simulations at once (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=40, help="rounds per run (default 40)")
    parser.add_argument("--alphas", default="0.1,0.5,1.0")
    parser.add_argument("--bits", default="2,4,8,32")
    parser.add_argument("--schemes", default="sflam,sfl,sl,fl")
    parser.add_argument("--tmax-runs", default="2,5,20", help="closed-loop caps in seconds")
    parser.add_argument("--tmax-rounds", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="2 rounds per run, one alpha, bits 2 and 32")
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.rounds < 1:
        parser.error("--jobs and --rounds must be >= 1")
    if args.quick:
        args.rounds, args.alphas, args.bits, args.tmax_rounds, args.tmax_runs = 2, "0.5", "2,32", 2, "2,20"
    for name in (("accuracy", "tmax", "schemes") if args.experiment == "all" else (args.experiment,)):
        print(f"== {name}")
        globals()[name](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
