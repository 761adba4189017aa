"""What the live fleet page costs (docs/dashboard.md), measured side by side in one run.

1. Round times with a page polling every 100 ms against none: ``--pairs`` pairs of the same short
   `sflam simulate` (the demo's: 10 device processes, 5 per round, 5 local epochs, bits auto; 4 rounds), one
   without ``--dashboard`` and one with it and a client fetching ``/api/fleet`` every 100 ms (plus
   ``?since=``, as the page does) for the whole run. The pair shares a seed; the order alternates.
   Per run: the mean ``phases_s.train`` of its rounds (plan published until every device finished)
   and the mean ``duration_s`` (the whole round); per pair the ratios polled / none; printed as
   mean and 95 % t interval over the pairs.
2. The page with 1,000 devices (30 rounds of 50, a round in flight) in headless Chromium: the time
   from navigation to the first complete render, over ``--loads`` fresh loads.
3. The daemon's side at 1,000 and 10,000 devices: one snapshot refresh (on the daemon's thread,
   at most every 0.5 s) and one encoding of ``/api/fleet`` (on an HTTP thread, once per snapshot).

``--screenshot PATH`` instead runs the demo (`sflam simulate`: 10 device processes, 5 per round,
bits auto) for 12 rounds with the page and saves a screenshot of it after 8 (docs/img/dashboard.png).

    .venv/bin/python benchmarks/bench_dashboard.py [--pairs 4] [--loads 5] [--screenshot PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from seed_stats import t_interval

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from server_runtime.dashboard import DashboardServer  # noqa: E402
from sflam.broker import free_port  # noqa: E402
from sflam.testing.browser import HeadlessBrowser  # noqa: E402
from sflam.testing.fleet_page import synthetic_registry, synthetic_view  # noqa: E402

RUN = ("--devices", "10", "--per-round", "5", "--rounds", "4", "--bits", "auto")  # the demo's 5 local epochs
POLL_S = 0.1


def simulate(out: Path, seed: int, *extra: str, run: tuple[str, ...] = RUN) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sflam", "simulate", *run, "--seed", str(seed), "--out", str(out),
                             *extra], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


class Poller(threading.Thread):
    """Fetches /api/fleet every POLL_S (and ?since= the last plan round, as the page does)."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.stop, self.fetched, self.bytes = url, threading.Event(), 0, 0

    def run(self) -> None:
        since = None
        while not self.stop.wait(POLL_S):
            query = "" if since is None else f"?since={since}"
            try:
                with urllib.request.urlopen(self.url + "api/fleet" + query, timeout=5) as response:
                    body = response.read()
            except OSError:
                continue  # not listening yet, or gone at the end
            self.fetched, self.bytes = self.fetched + 1, self.bytes + len(body)
            rounds = json.loads(body)["rounds"]
            since = rounds[-1]["plan_round"] if rounds else since


def round_seconds(out: Path) -> tuple[float, float]:
    """Mean train phase (plan to last device) and mean whole-round time of a run's rounds."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rounds = [r for r in records if r.get("event") == "round"]
    return statistics.fmean(r["phases_s"]["train"] for r in rounds), statistics.fmean(r["duration_s"] for r in rounds)


def one_run(work: Path, name: str, seed: int, polled: bool) -> tuple[tuple[float, float], int]:
    """A run's mean train phase and round time, and how many fetches its poller made (0: none)."""
    out, port = work / name, free_port()
    proc = simulate(out, seed, *(("--dashboard", str(port)) if polled else ()))
    poller = Poller(f"http://127.0.0.1:{port}/") if polled else None
    if poller is not None:
        poller.start()
    output, _ = proc.communicate(timeout=1800)
    if poller is not None:
        poller.stop.set()
        poller.join()
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{output[-3000:]}")
    return round_seconds(out), poller.fetched if poller is not None else 0


def poll_overhead(pairs: int) -> None:
    print(f"== round times, a page polling every {POLL_S * 1000:.0f} ms vs none "
          f"({pairs} pairs of `sflam simulate {' '.join(RUN)}`)")
    train_ratios, round_ratios = [], []
    with tempfile.TemporaryDirectory(prefix="bench-dashboard-") as tmp:
        for pair in range(pairs):
            order = (False, True) if pair % 2 == 0 else (True, False)
            times = {}
            for polled in order:
                times[polled], fetched = one_run(Path(tmp), f"p{pair}-{'polled' if polled else 'none'}", pair, polled)
                if polled:
                    polls = fetched
            (train_none, round_none), (train_polled, round_polled) = times[False], times[True]
            train_ratios.append(train_polled / train_none)
            round_ratios.append(round_polled / round_none)
            print(f"pair {pair} (seed {pair}): train phase none {train_none:.2f} s, polled {train_polled:.2f} s; "
                  f"round none {round_none:.2f} s, polled {round_polled:.2f} s ({polls} fetches)")
    for name, ratios in (("train phase", train_ratios), ("round", round_ratios)):
        mean, half = t_interval(ratios)
        print(f"{name}, polled / none: {mean:.3f} +- {half:.3f} (95 % t, {pairs} pairs)")


def render_times(loads: int) -> None:
    print(f"== the page with 1,000 devices in headless Chromium ({loads} loads)")
    server = DashboardServer(synthetic_view(devices=1000, rounds=30, per_round=50), "127.0.0.1", 0)
    try:
        with HeadlessBrowser(width=1280, height=900) as browser:
            times = []
            for _ in range(loads):
                browser.open(server.url)
                browser.wait_for("document.body.dataset.rendered === '1'")
                times.append(browser.evaluate("window.sflamFirstRenderMs"))
            rows = browser.evaluate("document.querySelectorAll('#devices tbody tr[data-device-id]').length")
    finally:
        server.close()
    print(f"first complete render: median {statistics.median(times):.0f} ms, max {max(times):.0f} ms "
          f"(goal 2000 ms); {rows} rows on the first page")


def daemon_side() -> None:
    print("== the daemon's side")
    for devices in (1000, 10_000):
        view, registry = synthetic_view(devices=devices, rounds=30, per_round=50), synthetic_registry(devices)
        started = time.perf_counter()
        for _ in range(10):
            view.refresh(registry, None, round=30, plan_round=31, needed=50)
        refresh_ms = (time.perf_counter() - started) * 100
        started = time.perf_counter()
        body = view.encoded()
        encode_ms = (time.perf_counter() - started) * 1000
        print(f"{devices:>6} devices: refresh {refresh_ms:.1f} ms, encode {encode_ms:.1f} ms "
              f"({len(body) / 1e6:.2f} MB with 30 rounds; a page polling ?since= gets the devices only)")


def screenshot(path: Path) -> None:
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="bench-dashboard-") as tmp:
        proc = simulate(Path(tmp) / "run", 0, "--rounds", "12", "--dashboard", str(port), run=())
        url = f"http://127.0.0.1:{port}/"
        try:
            while True:
                if proc.poll() is not None:
                    raise SystemExit(f"the run ended first:\n{proc.communicate()[0][-3000:]}")
                try:
                    with urllib.request.urlopen(url + "api/fleet", timeout=5) as response:
                        if len(json.load(response)["rounds"]) >= 8:
                            break
                except OSError:
                    pass
                time.sleep(0.5)
            with HeadlessBrowser(width=1280, height=900) as browser:
                browser.open(url)
                browser.wait_for("document.body.dataset.rendered === '1'")
                time.sleep(1.5)  # a poll after the first render, as a person would see it
                browser.screenshot(path, full_page=True)
        finally:
            proc.terminate()
            proc.communicate(timeout=120)
    print(f"screenshot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--loads", type=int, default=5)
    parser.add_argument("--screenshot", type=Path, metavar="PATH")
    args = parser.parse_args()
    if args.screenshot:
        return screenshot(args.screenshot)
    daemon_side()
    render_times(args.loads)
    poll_overhead(args.pairs)


if __name__ == "__main__":
    main()
