"""Fleet scale: `sflam simulate` on device hosts at several fleet sizes, side by side in one run.

Each size is a real run (mosquitto, the server daemon, device-host processes, every device its own
MQTT session) with the same per-round count, bits and shard sizes; only the number of idle devices
changes. Printed per size: the peak resident memory of all the run's processes summed (sampled
every 0.25 s by `sflam simulate`), of the device hosts alone (from their /proc status at the end
of the run), devices that announced themselves to the server, and the mean round wall time of
rounds 2..R. Then the two figures that say whether idle devices are cheap, as ratios of the
largest fleet to the smallest: marginal memory per idle device, and round time.

    .venv/bin/python benchmarks/bench_fleet.py [--sizes 100 1000] [--per-round 50] [--rounds 3] [--json FILE]
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

ROOT = Path(__file__).resolve().parents[1]


def run_size(devices: int, args: argparse.Namespace, work: Path) -> dict:
    """One simulate run of ``devices`` devices; its figures."""
    out = work / f"fleet-{devices}"
    cmd = [sys.executable, "-m", "sflam", "simulate", "--devices", str(devices), "--per-round", str(args.per_round),
           "--rounds", str(args.rounds), "--bits", "8", "--resample", args.resample, "--local-epochs", "1",
           "--out", str(out)]
    if args.hosts is not None:
        cmd += ["--hosts", str(args.hosts)]
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
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sflam-fleet-") as tmp:
        rows = [run_size(n, args, Path(tmp)) for n in sorted(args.sizes)]
    print(f"sflam fleet benchmark: {args.per_round} devices per round, {args.rounds} rounds, q=8, "
          f"shards of {args.resample} digits images, one machine")
    print(f"{'devices':>8} {'hosts':>5} {'connected':>9} {'rounds':>6} {'peak RSS all MiB':>16} "
          f"{'hosts RSS MiB':>13} {'round s':>8} {'wall s':>7}")
    for r in rows:
        print(f"{r['devices']:>8} {r['hosts']:>5} {r['devices_connected']!s:>9} {r['rounds']:>6} "
              f"{r['peak_rss_mib']:>16.1f} {r['host_rss_mib']:>13.1f} {r['round_s']:>8.2f} {r['wall_s']:>7.1f}")
    small, large = rows[0], rows[-1]
    if large["devices"] > small["devices"]:
        idle = large["devices"] - small["devices"]
        per_idle_all = (large["peak_rss_mib"] - small["peak_rss_mib"]) * 1024 / idle
        per_idle_hosts = (large["host_rss_mib"] - small["host_rss_mib"]) * 1024 / idle
        print(f"marginal memory per idle device ({small['devices']} -> {large['devices']}): "
              f"{per_idle_all:.0f} KB (all processes), {per_idle_hosts:.0f} KB (device hosts)  goal <= 200 KB")
        print(f"round time {large['devices']} / {small['devices']} devices: {large['round_s'] / small['round_s']:.2f}  "
              f"goal <= 1.3")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
