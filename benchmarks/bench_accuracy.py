"""Accuracy per round against the activation bit-width and the data skew, through ``sflam simulate``.

For Dirichlet alpha in {0.1, 0.5, 1.0} x bits in {2, 4, 8, 32} (scheme sflam with fixed bits;
32 = float32 activations), same seed and rounds, every cell is a whole simulation (private
mosquitto, server daemon, one process per device, emulated radios), one at a time. Prints the
final and best accuracy of every cell, then per alpha each bit-width beside 32 bits (uplink bytes
ratio, accuracy difference in points) and draws docs/img/results_accuracy.png (a panel per alpha,
a curve per bit-width).

    .venv/bin/python benchmarks/bench_accuracy.py [--rounds 40] [--quick] [--out DIR]

This module also holds the helpers the other simulation benchmarks (bench_schemes.py,
bench_tmax.py) import: running a list of simulations in turn with progress, and saving figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
IMG_DIR = ROOT / "docs" / "img"
ALPHAS = (0.1, 0.5, 1.0)
BITS = (2, 4, 8, 32)
QUICK_ALPHAS = (0.5,)
QUICK_BITS = (2, 32)
QUICK_ROUNDS = 5
TAIL = 5  # rounds in the "last-k mean" accuracy, steadier than the last round alone


# ---------------------------------------------------------------------------------------------
# running simulations one at a time (shared with bench_schemes.py and bench_tmax.py)


@dataclass(frozen=True)
class SimJob:
    """One simulation: a directory name under --out and its ``build_options`` values."""

    name: str
    values: Mapping[str, Any]
    label: str = ""


@dataclass
class SimResults:
    """Summaries of the completed runs and the reason of each failed one, by job name."""

    summaries: dict[str, dict[str, Any]] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    wall_s: float = 0.0


def default_out(prefix: str) -> Path:
    """runs/<prefix>-<UTC time>: a fresh directory per invocation (runs/ is not in git)."""
    return ROOT / "runs" / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"


def check_jobs(jobs: Sequence[SimJob], out: Path, reuse: bool) -> list[str]:
    """Every problem with the jobs' options or their directories, before anything runs."""
    from sflam.simulate import SimulateError, build_options

    problems = []
    for job in jobs:
        try:
            build_options(job.values)
        except SimulateError as exc:
            problems += [f"{job.name}: {p}" for p in exc.problems]
        run_dir = out / job.name
        if not reuse and run_dir.exists() and any(run_dir.iterdir()):
            problems.append(f"{run_dir}: exists and is not empty (choose a new --out, or --reuse to keep "
                            "completed runs there)")
    return problems


def _reusable(run_dir: Path, values: Mapping[str, Any]) -> dict[str, Any] | None:
    """The summary of a completed run in ``run_dir`` made with the same options, else None."""
    path = run_dir / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text(encoding="utf-8"))
    options = summary.get("options", {})
    same = all(options.get(k) == (list(v) if isinstance(v, tuple) else v) for k, v in values.items())
    return summary if summary.get("status") == "completed" and same else None


def run_jobs(jobs: Sequence[SimJob], out: Path, *, reuse: bool = False) -> SimResults:
    """Run each job's simulation in turn into out/<name>, printing progress; failures are recorded."""
    from sflam.simulate import SimulateError, build_options, run_simulation

    import torch._logging

    torch._logging.set_logs(onnx=logging.ERROR)  # "torchvision is not installed ...", 12 lines per export
    results = SimResults()
    started = time.monotonic()
    for i, job in enumerate(jobs, 1):
        run_dir = out / job.name
        label = job.label or job.name
        summary = _reusable(run_dir, job.values) if reuse else None
        if summary is not None:
            results.summaries[job.name] = summary
            print(f"run {i}/{len(jobs)} {label}: reused the completed run in {run_dir}", flush=True)
            continue
        if reuse and run_dir.exists() and (run_dir / "options.json").is_file():
            shutil.rmtree(run_dir)  # an incomplete or different run of ours: start it again
        print(f"run {i}/{len(jobs)} {label}: started ({_clock(time.monotonic() - started)} elapsed)", flush=True)
        t0 = time.monotonic()
        try:
            summary = run_simulation(build_options(job.values), run_dir, quiet=True)
        except (SimulateError, ValueError, OSError, RuntimeError) as exc:
            results.failures[job.name] = f"{type(exc).__name__}: {exc}"
            print(f"run {i}/{len(jobs)} {label}: FAILED after {time.monotonic() - t0:.0f} s: "
                  f"{results.failures[job.name]}", flush=True)
            continue
        results.summaries[job.name] = summary
        elapsed = time.monotonic() - started
        left = elapsed / i * (len(jobs) - i)
        print(f"run {i}/{len(jobs)} {label}: final {_pct(summary['final_accuracy'])}, best "
              f"{_pct(summary['best_accuracy'])}, {summary['wall_s']:.0f} s ({_clock(elapsed)} elapsed, "
              f"about {_clock(left)} left)", flush=True)
    results.wall_s = time.monotonic() - started
    return results


def _clock(seconds: float) -> str:
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def tail_mean(summary: Mapping[str, Any], k: int = TAIL) -> float:
    """Mean accuracy of the last ``k`` evaluated rounds."""
    acc = summary["accuracy_per_round"][-k:]
    return float(np.mean(acc)) if acc else float("nan")


def print_failures(results: SimResults) -> None:
    """One line per failed run (its directory keeps the logs)."""
    for name, why in results.failures.items():
        print(f"FAILED {name}: {why}")


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> None:
    """Write ``fig`` as a PNG (dpi 110) and close it."""
    plt = pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} kB)")


# ---------------------------------------------------------------------------------------------
# the accuracy grid


def cell_name(alpha: float, bits: int) -> str:
    return f"acc-a{alpha:g}-q{bits}"


def accuracy_jobs(alphas: Sequence[float], bits: Sequence[int], rounds: int, seed: int) -> list[SimJob]:
    """One sflam simulation per (alpha, bits)."""
    return [SimJob(cell_name(a, q), {"alpha": a, "bits": q, "scheme": "sflam", "rounds": rounds, "seed": seed},
                   f"alpha={a:g} bits={q}")
            for a in alphas for q in bits]


def print_cells(results: SimResults, alphas: Sequence[float], bits: Sequence[int]) -> None:
    """Final / best accuracy per cell, a row per alpha and a column per bit-width."""
    print(f"(1) test accuracy after the last round, final / best over the rounds (last-{TAIL} mean in brackets)")
    width = 28
    print(f"{'alpha':>6}" + "".join(f"{f'q={q}':>{width}}" for q in bits))
    for a in alphas:
        cells = []
        for q in bits:
            s = results.summaries.get(cell_name(a, q))
            cells.append("failed" if s is None else
                         f"{_pct(s['final_accuracy'])} / {_pct(s['best_accuracy'])} ({100 * tail_mean(s):.1f})")
        print(f"{a:>6g}" + "".join(f"{c:>{width}}" for c in cells))
    print()


def print_against_fp32(results: SimResults, alphas: Sequence[float], bits: Sequence[int]) -> None:
    """Per alpha, each bit-width beside 32 bits: uplink bytes ratio and accuracy differences."""
    if 32 not in bits:
        print("(2) skipped: no 32-bit reference in --bits")
        return
    print(f"(2) against 32 bits at the same alpha: bytes_up / bytes_up(32), final accuracy difference and "
          f"last-{TAIL} mean difference in points")
    others = [q for q in bits if q != 32]
    print(f"{'alpha':>6}" + "".join(f"{f'q={q}: up ratio':>16}{'final pts':>10}{f'last-{TAIL} pts':>12}" for q in others))
    for a in alphas:
        ref = results.summaries.get(cell_name(a, 32))
        row = f"{a:>6g}"
        for q in others:
            s = results.summaries.get(cell_name(a, q))
            if s is None or ref is None:
                row += f"{'-':>16}{'-':>10}{'-':>12}"
                continue
            row += (f"{s['bytes_up'] / ref['bytes_up']:>16.4f}"
                    f"{100 * (s['final_accuracy'] - ref['final_accuracy']):>+10.2f}"
                    f"{100 * (tail_mean(s) - tail_mean(ref)):>+12.2f}")
        print(row)
    print()


def plot_accuracy(results: SimResults, alphas: Sequence[float], bits: Sequence[int], path: Path) -> None:
    """A panel per alpha, a curve per bit-width: test accuracy against the round."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(alphas), figsize=(4.3 * len(alphas), 3.5), sharey=True, squeeze=False,
                             constrained_layout=True)
    for ax, a in zip(axes[0], alphas):
        for k, q in enumerate(bits):
            s = results.summaries.get(cell_name(a, q))
            if s is not None:
                ax.plot(s["accuracy_rounds"], [100 * v for v in s["accuracy_per_round"]], color=f"C{k}",
                        lw=1.4, label="float32 (q=32)" if q == 32 else f"q={q}")
        ax.set(title=f"Dirichlet alpha = {a:g}", xlabel="round")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy [%]")
    axes[0][-1].legend(fontsize="small", loc="lower right")
    fig.suptitle("sflam on digits (vit_quick_patch4_16, 10 devices, 5 per round): accuracy per round", fontsize=10)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    """Parse the options, run the grid, print the tables and draw the figure."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--rounds", type=int, default=40, help="rounds per simulation")
    parser.add_argument("--seed", type=int, default=0, help="seed of every simulation")
    parser.add_argument("--quick", action="store_true",
                        help=f"alpha {QUICK_ALPHAS} x bits {QUICK_BITS}, {QUICK_ROUNDS} rounds (a smoke run)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder of the run directories (default: runs/bench-accuracy-<UTC time>)")
    parser.add_argument("--reuse", action="store_true",
                        help="keep completed runs with the same options found in --out instead of refusing it")
    parser.add_argument("--img", type=Path, default=IMG_DIR, help="folder of results_accuracy.png")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    alphas, bits, rounds = (QUICK_ALPHAS, QUICK_BITS, QUICK_ROUNDS) if args.quick else (ALPHAS, BITS, args.rounds)
    out = args.out or default_out("bench-accuracy")
    jobs = accuracy_jobs(alphas, bits, rounds, args.seed)
    problems = check_jobs(jobs, out, args.reuse)
    if problems:
        parser.error("\n  " + "\n  ".join(problems))
    print(f"accuracy grid: {len(jobs)} simulations of {rounds} rounds (alpha {list(alphas)} x bits {list(bits)}, "
          f"seed {args.seed}), one at a time, in {out}", flush=True)
    results = run_jobs(jobs, out, reuse=args.reuse)
    print(f"\nall runs done in {_clock(results.wall_s)} (min:s)\n")
    print_cells(results, alphas, bits)
    print_against_fp32(results, alphas, bits)
    print_failures(results)
    if results.summaries:
        plot_accuracy(results, alphas, bits, args.img / "results_accuracy.png")
    return 1 if results.failures else 0


if __name__ == "__main__":
    sys.exit(main())
