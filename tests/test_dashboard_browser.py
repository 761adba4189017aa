"""The fleet page in a real headless Chromium: a live `sflam simulate --dashboard`, and 1,000 devices.

The browser is Debian's chromium-headless-shell (`make test` installs it as root); the page is
driven over the DevTools protocol (sflam/testing/browser.py) and checked by DOM query.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from server_runtime.dashboard import DashboardServer
from sflam.broker import free_port
from sflam.testing.browser import HeadlessBrowser, find_chromium
from sflam.testing.fleet_page import synthetic_view

ROOT = Path(__file__).resolve().parents[1]
ROWS = "document.querySelectorAll('#devices tbody tr[data-device-id]')"
RENDERED = "document.body.dataset.rendered === '1'"


def _points(chart: str) -> str:
    return f"Number(document.querySelector('svg.chart[data-chart=\"{chart}\"]').dataset.points)"


@pytest.fixture
def browser() -> Iterator[HeadlessBrowser]:
    binary = find_chromium()
    if binary is None:
        pytest.fail("no headless Chromium: `make test` installs chromium-headless-shell as root "
                    "(scripts/ensure-chromium.sh), or set SFLAM_CHROMIUM")
    with HeadlessBrowser(binary, width=1280, height=900, timeout_s=60.0) as chrome:
        yield chrome


def _fleet(url: str) -> dict | None:
    """GET /api/fleet, or None while the server is not listening yet."""
    try:
        with urllib.request.urlopen(url + "api/fleet", timeout=5) as response:
            return json.load(response)
    except OSError:
        return None


def _wait_for_fleet(url: str, proc: subprocess.Popen, ready, timeout_s: float = 300.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[0][-4000:]
        data = _fleet(url)
        if data is not None and ready(data):
            return data
        time.sleep(0.5)
    raise AssertionError(f"/api/fleet never showed what the test waits for: {data!r:.600}")


@pytest.mark.broker
@pytest.mark.slow
def test_a_live_simulation_shows_its_devices_and_rounds(tmp_path: Path, browser: HeadlessBrowser) -> None:
    # Prepare: 4 device processes, all 4 every round, 6 short rounds, the page on a free port
    port, out = free_port(), tmp_path / "run"
    url = f"http://127.0.0.1:{port}/"
    proc = subprocess.Popen(
        [sys.executable, "-m", "sflam", "simulate", "--devices", "4", "--per-round", "4", "--rounds", "6",
         "--local-epochs", "1", "--batch-size", "16", "--bits", "auto", "--out", str(out), "--dashboard", str(port)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    try:
        # Execute + Assert: the endpoint has the 4 devices, then records arrive
        first = _wait_for_fleet(url, proc, lambda d: len(d["devices"]) == 4 and d["rounds"])
        assert {d["status"] for d in first["devices"]} == {"online"}
        assert all(d["profile"] != "unknown" and d["bits"] is not None for d in first["devices"])
        record = first["rounds"][0]
        assert record["event"] == "round" and set(record["devices"]) == {d["id"] for d in first["devices"]}
        assert record["allocator"]["fixed_round_latency_s"] > 0 and record["allocator"]["predicted_energy_j"] > 0
        # the page, by DOM query
        browser.open(url)
        browser.wait_for(RENDERED, timeout_s=60)
        assert browser.evaluate(f"{ROWS}.length") == 4
        assert browser.evaluate(f"[...{ROWS}].map(r => r.dataset.deviceId).sort()") == \
            sorted(d["id"] for d in first["devices"])
        shown = browser.evaluate(_points("loss"))
        assert shown >= len(first["rounds"])  # test and train loss of every round so far
        for chart in ("accuracy", "bytes", "energy", "latency", "allocation"):
            assert browser.evaluate(_points(chart)) > 0, chart
        # it updates live: a later round reaches the chart without a reload
        browser.wait_for(f"{_points('loss')} > {shown}", timeout_s=300)
        browser.screenshot(tmp_path / "page.png")
        output, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=60)
    assert proc.returncode == 0, output[-4000:]
    assert f"fleet page: {url}" in output
    assert (tmp_path / "page.png").stat().st_size > 10_000


def test_a_thousand_devices_page_sort_and_filter(browser: HeadlessBrowser) -> None:
    # Prepare: 1,000 devices, 30 rounds of 50, a round in flight, through the real FleetView
    server = DashboardServer(synthetic_view(devices=1000, rounds=30, per_round=50), "127.0.0.1", 0)
    try:
        # Execute
        browser.open(server.url)
        browser.wait_for(RENDERED, timeout_s=60)
        # Assert: a page of 50 rows out of 1,000
        assert browser.evaluate(f"{ROWS}.length") == 50
        assert browser.evaluate("document.getElementById('device-count').textContent").startswith("1000 devices")
        assert browser.evaluate("document.getElementById('page-info').textContent") == "page 1 of 20"
        print(f"first render of 1,000 devices: {browser.evaluate('window.sflamFirstRenderMs'):.0f} ms")
        # sorting by energy, then the other way
        energy = {d["id"]: d["energy_j"] for d in json.loads(server.view.encoded())["devices"]}
        header = "document.querySelector('#devices th[data-key=\"energy_j\"]')"
        first_ids = f"[...{ROWS}].map(r => r.dataset.deviceId)"
        browser.evaluate(f"{header}.click()")
        browser.wait_for(f"{header}.getAttribute('aria-sort') === 'ascending'")
        ascending = browser.evaluate(first_ids)
        browser.evaluate(f"{header}.click()")
        browser.wait_for(f"{header}.getAttribute('aria-sort') === 'descending'")
        descending = browser.evaluate(first_ids)
        ranked = sorted(energy, key=lambda d: energy[d])
        assert [energy[d] for d in ascending] == [energy[d] for d in ranked[:50]]
        assert [energy[d] for d in descending] == [energy[d] for d in ranked[::-1][:50]]
        # the next page, then a filter
        browser.evaluate("document.getElementById('page-next').click()")
        browser.wait_for("document.getElementById('page-info').textContent === 'page 2 of 20'")
        browser.evaluate("const f = document.getElementById('device-filter'); f.value = 'dev-00999'; "
                         "f.dispatchEvent(new Event('input'))")
        browser.wait_for(f"{ROWS}.length === 1")
        assert browser.evaluate(f"{ROWS}[0].dataset.deviceId") == "dev-00999"
        assert browser.evaluate("document.getElementById('device-count').textContent").startswith("1 of 1000")
    finally:
        server.close()
