"""Fleet scale: `sflam simulate` on device hosts at several fleet sizes, side by side in one run.

Each size is a real run (mosquitto, the server daemon, device-host processes, every device its own
MQTT session) with the same per-round count, bits and shard sizes; only the number of idle devices
changes. Printed per size: the peak resident memory of all the run's processes summed (sampled
every 0.25 s by `sflam simulate`), of the device hosts alone (from their /proc status at the end
of the run), devices that announced themselves to the server, and the mean round wall time of
rounds 2..R. Then the two figures that say whether idle devices are cheap, as ratios of the
largest fleet to the smallest: marginal memory per idle device, and round time. With
``--repeats N`` the sizes run N times, interleaved (small, large, small, large, ...) so that a
drift of the machine hits both alike; the figures are then means with a 95 % t interval over the
repeats, and the round-time ratio is taken pair by pair.

    .venv/bin/python benchmarks/bench_fleet.py [--sizes 100 1000] [--per-round 50] [--rounds 3]
        [--repeats 1] [--no-emulate-link] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from seed_stats import t_interval

ROOT = Path(__file__).resolve().parents[1]


def run_size(devices: int, args: argparse.Namespace, work: Path) -> dict:
    """One simulate run of ``devices`` devices; its figures."""
    work.mkdir(parents=True, exist_ok=True)
    out = work / f"fleet-{devices}"
    cmd = [sys.executable, "-m", "sflam", "simulate", "--devices", str(devices), "--per-round", str(args.per_round),
           "--rounds", str(args.rounds), "--bits", "8", "--resample", args.resample, "--local-epochs", "1",
           "--out", str(out)]
    if args.hosts is not None:
        cmd += ["--hosts", str(args.hosts)]
    if not args.emulate_link:
        cmd.append("--no-emulate-link")
    t0 = time.monotonic()
    result = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=args.timeout_s)
    if result.returncode != 0:
        raise SystemExit(f"{devices} devices: simulate exited {result.returncode}:\n{result.stdout[-3000:]}"
                         f"{result.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    durations = [r["duration_s"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                 if r.get("event") == "round"][1:]
    return {"devices": devices, "hosts": summary["hosts"], "devices_connected": summary["devices_connected"],
            "rounds": summary["rounds"], "peak_rss_mib": summary["peak_rss_mib"],
            "host_rss_mib": _host_rss_mib(out), "round_s": statistics.mean(durations) if durations else float("nan"),
            "wall_s": round(time.monotonic() - t0, 1)}


def _host_rss_mib(out: Path) -> float:
    """The device hosts' high-water resident memory (VmHWM), as each logged it at exit."""
    total = 0.0
    for log in sorted((out / "logs").glob("host-*.log")):
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("sflam-host-summary "):
                total += json.loads(line.split(" ", 1)[1]).get("peak_rss_mib", 0.0)
    return round(total, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--per-round", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--resample", default="20-40")
    parser.add_argument("--hosts", type=int, help="device hosts (default: simulate's, one per core)")
    parser.add_argument("--timeout-s", type=float, default=1800.0)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--repeats", type=int, default=1, help="runs of every size, interleaved")
    parser.add_argument("--no-emulate-link", dest="emulate_link", action="store_false",
                        help="loopback-speed uplinks: the fleets' different channel draws (a larger fleet "
                             "selects among other devices) then do not enter the round-time ratio")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    sizes = sorted(args.sizes)
    runs: list[list[dict]] = []  # runs[i]: repeat i, one row per size
    with tempfile.TemporaryDirectory(prefix="sflam-fleet-") as tmp:
        for repeat in range(args.repeats):
            runs.append([run_size(n, args, Path(tmp) / f"r{repeat}") for n in sizes])
            print(f"repeat {repeat + 1}/{args.repeats}: " + ", ".join(
                f"{r['devices']} devices {r['round_s']:.2f} s/round {r['peak_rss_mib']:.0f} MiB" for r in runs[-1]),
                flush=True)
    print(f"sflam fleet benchmark: {args.per_round} devices per round, {args.rounds} rounds, q=8, "
          f"shards of {args.resample} digits images, links {'emulated' if args.emulate_link else 'not emulated'}, "
          f"one machine, {args.repeats} repeat(s); "
          f"figures are means [95 % interval] over the repeats")
    print(f"{'devices':>8} {'hosts':>5} {'connected':>9} {'rounds':>6} {'peak RSS all MiB':>22} "
          f"{'hosts RSS MiB':>22} {'round s':>18}")
    for column, n in enumerate(sizes):
        rows = [run[column] for run in runs]
        first = rows[0]
        print(f"{n:>8} {first['hosts']:>5} {min(r['devices_connected'] for r in rows)!s:>9} "
              f"{min(r['rounds'] for r in rows):>6} {_mean_ci([r['peak_rss_mib'] for r in rows], '.0f'):>22} "
              f"{_mean_ci([r['host_rss_mib'] for r in rows], '.0f'):>22} {_mean_ci([r['round_s'] for r in rows]):>18}")
    if len(sizes) > 1:
        small, large = sizes[0], sizes[-1]
        idle = large - small
        per_idle_all = [(run[-1]["peak_rss_mib"] - run[0]["peak_rss_mib"]) * 1024 / idle for run in runs]
        per_idle_hosts = [(run[-1]["host_rss_mib"] - run[0]["host_rss_mib"]) * 1024 / idle for run in runs]
        ratios = [run[-1]["round_s"] / run[0]["round_s"] for run in runs]
        print(f"marginal memory per idle device ({small} -> {large}): {_mean_ci(per_idle_all, '.0f')} KB "
              f"(all processes), {_mean_ci(per_idle_hosts, '.0f')} KB (device hosts)  goal <= 200 KB")
        print(f"round time {large} / {small} devices: {_mean_ci(ratios)}  (per repeat: "
              f"{', '.join(f'{r:.2f}' for r in ratios)})  goal <= 1.3")
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1) + "\n")
    return 0


def _mean_ci(values: list[float], fmt: str = ".2f") -> str:
    """``mean [low, high]``: the 95 % Student t interval over ``values`` (the mean alone for one)."""
    mean, half = t_interval(values)
    if half != half:
        return format(mean, fmt)
    return f"{mean:{fmt}} [{mean - half:{fmt}}, {mean + half:{fmt}}]"


if __name__ == "__main__":
    sys.exit(main())
