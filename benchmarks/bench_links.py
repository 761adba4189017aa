"""The two link models side by side: round wall time, uplink airtime and the system model's round
latency, for the token bucket (``--network bucket``) and kernel links (``--network netem``).

Each configuration runs ``sflam simulate`` once per seed and link model, one run at a time (two
runs sharing the cores would contaminate each other's timings and the allocator's calibration),
and prints the mean and the 95 % Student t interval over the seeds of:

- ``wall``: a round's wall time (plan published until every selected device finished);
- ``airtime``: the largest uplink airtime of a round's devices (what their radios were busy);
- ``wall/air``: the first over the second, per round; below 1 means the round finished before its
  radios could have carried its bits (the token bucket's burst);
- ``model``: the system model's round latency for the allocation the server chose;
- ``up err``: kernel links only, the largest |measured airtime / modeled uplink time - 1|;
- ``publish``: kernel links only, the wall time of a device's activation publishes in a round
  (airtime plus a round trip and TCP's ramp-up per step).

Needs root for the kernel links. Run: ``python benchmarks/bench_links.py [--seeds 0,1,2]``.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from seed_stats import t_interval  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BASE = ("--devices", "4", "--per-round", "2")
CONFIGS = {  # name: (extra sflam simulate arguments, applies to the token bucket too)
    "q8": (("--bits", "8", "--rounds", "2"), True),
    "auto": (("--bits", "auto", "--rounds", "3"), True),
    "auto+150ms": (("--bits", "auto", "--rounds", "3", "--link-delay-ms", "150"), False),
}


def run_one(out: Path, args: tuple[str, ...]) -> dict:
    cmd = [sys.executable, "-m", "sflam", "simulate", *BASE, *args, "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return json.loads((out / "summary.json").read_text())


def figures(summary: dict, out: Path) -> dict[str, float]:
    from sflam import sim_report

    records = [r for r in sim_report.read_records(out / "metrics.jsonl") if r.counted]
    walls = [r.phases_s.train for r in records]
    airs = [max(r.devices[d].uplink_time_s for d in r.completed) for r in records]
    row = {"wall": float(np.mean(walls)), "airtime": float(np.mean(airs)),
           "wall/air": float(np.mean([w / a for w, a in zip(walls, airs)])),
           "model": float(summary["modeled"]["round_latency_s"] or math.nan)}
    links = summary.get("links")
    if links:
        rows = links["uplink"]["rows"]
        row["up err"] = float(links["uplink"]["max_relative_error"])
        row["publish"] = float(np.mean([r["publish_wall_s"] for r in rows if r["publish_wall_s"] is not None]))
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2", help="comma list (default 0,1,2)")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {', '.join(CONFIGS)}")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    names = [c for c in args.configs.split(",") if c]
    columns = ("wall", "airtime", "wall/air", "model", "up err", "publish")
    print(f"{'config':<12}{'link':<8}" + "".join(f"{c:>16}" for c in columns))
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-links-") as tmp:
        for name in names:
            extra, both = CONFIGS[name]
            for model in (("bucket", "netem") if both else ("netem",)):
                rows = []
                for seed in seeds:
                    out = Path(tmp) / f"{name}-{model}-{seed}"
                    rows.append(figures(run_one(out, (*extra, "--network", model, "--seed", str(seed))), out))
                cells = []
                for column in columns:
                    mean, half = t_interval([r.get(column, math.nan) for r in rows])
                    cells.append("-" if math.isnan(mean) else f"{mean:.3g} +- {half:.2g}")
                print(f"{name:<12}{model:<8}" + "".join(f"{c:>16}" for c in cells), flush=True)
    print(f"\n{len(seeds)} seeds per row; seconds except the ratios; {time.monotonic() - started:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
