"""The schemes side by side through ``sflam simulate``: sflam (bits auto), sflam q=8, sfl, sl and fl.

Every scheme is a whole simulation (private mosquitto, server daemon, one process per device,
emulated radios) with the same seed, data split, scenario and rounds, run one at a time. Prints
``sflam.sim_report.render_comparison`` of all of them, then each beside sfl (float32 split
federated learning): the system model's round latency and device energy per round, the uplink
bytes and the accuracy difference. Then the two acceptance figures of quantized activations:
|final accuracy(q=8) - final accuracy(sfl)| in points (goal <= 1 after the same rounds) and
bytes_up / bytes_up_fp32 of q=8 (about 0.25). Draws docs/img/results_schemes.png.

    .venv/bin/python benchmarks/bench_schemes.py [--rounds 60] [--schemes sflam-q8,sfl] [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench_accuracy import (IMG_DIR, TAIL, SimJob, SimResults, check_jobs, default_out, print_failures, pyplot,
                            run_jobs, save_figure, tail_mean)

SCHEMES: dict[str, dict[str, Any]] = {
    "sflam-auto": {"scheme": "sflam", "bits": "auto"},
    "sflam-q8": {"scheme": "sflam", "bits": 8},
    "sfl": {"scheme": "sfl"},
    "sl": {"scheme": "sl"},
    "fl": {"scheme": "fl"},
}
REFERENCE = "sfl"
QUICK_ROUNDS = 3
ACCURACY_GOAL_PTS = 1.0
BYTES_RATIO_EXPECTED = 0.25
LEVELS = (0.80, 0.85)  # "first round at or above" columns


def scheme_jobs(names: Sequence[str], rounds: int, seed: int) -> list[SimJob]:
    """One simulation per scheme, everything else at the simulate defaults."""
    return [SimJob(name, {**SCHEMES[name], "rounds": rounds, "seed": seed}, name) for name in names]


def first_round_at(summary: Mapping[str, Any], level: float) -> str:
    """The first round whose test accuracy reached ``level``, or '-'."""
    for rnd, acc in zip(summary["accuracy_rounds"], summary["accuracy_per_round"]):
        if acc >= level:
            return str(rnd)
    return "-"


def print_ratios(results: SimResults, names: Sequence[str]) -> None:
    """Each scheme beside sfl: modeled latency and energy per round, uplink bytes, accuracy."""
    ref = results.summaries.get(REFERENCE)
    if ref is None:
        print(f"(2) ratios skipped: no completed {REFERENCE} run")
        return
    rounds = ref["rounds"]
    print(f"(2) against {REFERENCE} (float32 activations, fixed allocation), same seed, {rounds} rounds; time and "
          "energy per round by the system model on the run's scenario")
    head = (f"{'scheme':<11}{'T/round':>9}{'E/round':>9}{'bytes up':>10}{'final pts':>11}{f'last-{TAIL} pts':>12}"
            f"{'best pts':>10}" + "".join(f"{f'1st >= {100 * v:.0f}%':>12}" for v in LEVELS))
    print(head)
    print("-" * len(head))
    for name in names:
        s = results.summaries.get(name)
        if s is None:
            print(f"{name:<11}{'failed':>9}")
            continue
        m, mr = s["modeled"], ref["modeled"]
        print(f"{name:<11}{m['round_latency_s'] / mr['round_latency_s']:>9.3f}{m['energy_j'] / mr['energy_j']:>9.3f}"
              f"{s['bytes_up'] / ref['bytes_up']:>10.4f}"
              f"{100 * (s['final_accuracy'] - ref['final_accuracy']):>+11.2f}"
              f"{100 * (tail_mean(s) - tail_mean(ref)):>+12.2f}"
              f"{100 * (s['best_accuracy'] - ref['best_accuracy']):>+10.2f}"
              + "".join(f"{first_round_at(s, v):>12}" for v in LEVELS))
    print()


def print_acceptance(results: SimResults) -> None:
    """The two q=8 figures: accuracy within a point of sfl, uplink about a quarter of float32."""
    q8, ref = results.summaries.get("sflam-q8"), results.summaries.get(REFERENCE)
    if q8 is None or ref is None:
        print("(3) acceptance figures skipped: they need completed sflam-q8 and sfl runs")
        return
    gap = 100 * abs(q8["final_accuracy"] - ref["final_accuracy"])
    tail_gap = 100 * abs(tail_mean(q8) - tail_mean(ref))
    ratio = q8["bytes_up"] / q8["bytes_up_fp32"]
    print(f"(3) acceptance after {q8['rounds']} rounds (q=8 {100 * q8['final_accuracy']:.2f}%, "
          f"sfl {100 * ref['final_accuracy']:.2f}%):")
    print(f"    |final accuracy(q=8) - final accuracy(sfl)| = {gap:.2f} points (goal <= {ACCURACY_GOAL_PTS:g}): "
          f"{'met' if gap <= ACCURACY_GOAL_PTS else 'MISSED'}; last-{TAIL} mean difference {tail_gap:.2f} points")
    print(f"    q=8 bytes_up / bytes_up_fp32 = {ratio:.4f} (about {BYTES_RATIO_EXPECTED:g} expected); "
          f"q=8 bytes_up / sfl bytes_up = {q8['bytes_up'] / ref['bytes_up']:.4f}")
    print()


def plot_schemes(results: SimResults, names: Sequence[str], path: Path) -> None:
    """Bars of modeled time and energy per round per scheme, and the accuracy curves."""
    plt = pyplot()
    done = [n for n in names if n in results.summaries]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8), constrained_layout=True)
    x = np.arange(len(done))
    panels = ((axes[0], "round_latency_s", "round latency [s] (system model)", "{:.3g} s"),
              (axes[1], "energy_j", "device energy per round [J] (system model)", "{:.3g} J"))
    for ax, key, label, fmt in panels:
        values = [results.summaries[n]["modeled"][key] for n in done]
        bars = ax.bar(x, values, color=[f"C{k}" for k in range(len(done))])
        ax.bar_label(bars, labels=[fmt.format(v) for v in values], fontsize=7)
        ax.set_xticks(x, done, rotation=20)
        ax.set(ylabel=label, yscale="log")
        ax.grid(alpha=0.3, axis="y", which="both")
    for k, n in enumerate(done):
        s = results.summaries[n]
        axes[2].plot(s["accuracy_rounds"], [100 * a for a in s["accuracy_per_round"]], color=f"C{k}", lw=1.3, label=n)
    axes[2].set(xlabel="round", ylabel="test accuracy [%]", title="accuracy per round")
    axes[2].grid(alpha=0.3)
    axes[2].legend(fontsize="small", loc="lower right")
    fig.suptitle("schemes on digits (vit_quick_patch4_16, 10 devices, 5 per round, same seed)", fontsize=10)
    save_figure(fig, path)


def parse_schemes(text: str) -> list[str]:
    """A comma list of scheme names from SCHEMES; ValueError names the unknown ones."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCHEMES]
    if unknown or not names:
        raise ValueError(f"unknown scheme(s) {unknown or text!r}; choose from {', '.join(SCHEMES)}")
    return names


def main(argv: list[str] | None = None) -> int:
    """Parse the options, run the schemes, print the tables and draw the figure."""
    from sflam.sim_report import render_comparison

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--rounds", type=int, default=60, help="rounds of every scheme")
    parser.add_argument("--seed", type=int, default=0, help="seed of every simulation")
    parser.add_argument("--schemes", default=",".join(SCHEMES), help="comma list of the schemes to run")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_ROUNDS} rounds (a smoke run)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder of the run directories (default: runs/bench-schemes-<UTC time>)")
    parser.add_argument("--reuse", action="store_true",
                        help="keep completed runs with the same options found in --out instead of refusing it")
    parser.add_argument("--img", type=Path, default=IMG_DIR, help="folder of results_schemes.png")
    args = parser.parse_args(argv)
    try:
        names = parse_schemes(args.schemes)
    except ValueError as exc:
        parser.error(f"--schemes: {exc}")
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    rounds = QUICK_ROUNDS if args.quick else args.rounds
    out = args.out or default_out("bench-schemes")
    jobs = scheme_jobs(names, rounds, args.seed)
    problems = check_jobs(jobs, out, args.reuse)
    if problems:
        parser.error("\n  " + "\n  ".join(problems))
    print(f"schemes {', '.join(names)}: {len(jobs)} simulations of {rounds} rounds (seed {args.seed}), "
          f"one at a time, in {out}", flush=True)
    results = run_jobs(jobs, out, reuse=args.reuse)
    print(f"\nall runs done in {results.wall_s / 60:.1f} min\n")
    done = [n for n in names if n in results.summaries]
    if done:
        print("(1) sflam.sim_report.render_comparison, columns: " + ", ".join(done))
        print(render_comparison([results.summaries[n] for n in done]))
        print()
    print_ratios(results, names)
    print_acceptance(results)
    print_failures(results)
    if done:
        plot_schemes(results, names, args.img / "results_schemes.png")
    return 1 if results.failures else 0


if __name__ == "__main__":
    sys.exit(main())
