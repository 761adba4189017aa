"""The fleet page's server side: binds, tokens, the snapshot the page reads, the HTTP endpoint.

The page in a real browser is tests/test_dashboard_browser.py; these need no browser and no broker.
"""

from __future__ import annotations

import http.client
import json
import math
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_runtime import protocol as p
from server_runtime.coordinator import DeviceInfo, DeviceRegistry, DeviceRound, RoundState
from server_runtime.dashboard import (
    PAGE_FILES,
    SCRIPTS,
    DashboardError,
    DashboardServer,
    check_exposure,
    page_file,
    parse_bind,
    resolve_token,
)
from server_runtime.fleet_view import REFRESH_S, FleetView, _is_late, _RoundClock
from server_runtime.round_record import RoundRecord
from sflam.broker import free_port
from tests.test_metrics import sample_record, typed_record

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "k" * 24
RUN = {"run_id": "t", "mode": "v1", "preset": "p", "rounds": 5, "devices_per_round": 2, "bits": "auto",
       "deadline_s": 30.0, "started": 0.0}


# ---------------------------------------------------------------------------------------------
# binds and tokens


@pytest.mark.parametrize(("spec", "bind"), [
    ("8080", ("127.0.0.1", 8080)), ("0.0.0.0:9000", ("0.0.0.0", 9000)), ("[::1]:9001", ("::1", 9001)),
    ("localhost:1", ("localhost", 1)), (" 65535 ", ("127.0.0.1", 65535)),
])
def test_bind_specs_parse(spec: str, bind: tuple[str, int]) -> None:
    assert parse_bind(spec) == bind


@pytest.mark.parametrize("spec", ["", "web", "70000", "0", ":8080", "host:", "8080:host", "1.2.3.4:-1"])
def test_a_bad_bind_spec_says_what_is_expected(spec: str) -> None:
    with pytest.raises(DashboardError, match=r"--dashboard: expected \[ADDR:\]PORT with a port 1\.\.65535"):
        parse_bind(spec)


@pytest.mark.parametrize("addr", ["127.0.0.1", "127.9.9.9", "::1", "localhost"])
def test_loopback_needs_no_token(addr: str) -> None:
    check_exposure(addr, None)


@pytest.mark.parametrize("addr", ["0.0.0.0", "::", "192.0.2.10", "fleet-server.lan"])
def test_a_non_loopback_bind_without_a_token_is_refused(addr: str) -> None:
    with pytest.raises(DashboardError) as caught:
        check_exposure(addr, None)
    text = str(caught.value)
    assert f"listen on {addr}, which is not a loopback address, without a token" in text
    assert "--dashboard-token" in text and "SSH tunnel" in text
    check_exposure(addr, TOKEN)  # with one it may


def test_a_short_token_is_refused_even_on_loopback() -> None:
    with pytest.raises(DashboardError, match="the dashboard token has 6 characters; use at least 16"):
        check_exposure("127.0.0.1", "secret")


def test_the_token_comes_from_the_flag_then_the_environment_then_the_file(tmp_path: Path, monkeypatch) -> None:
    token_file = tmp_path / "dashboard.token"
    token_file.write_text("from-the-file-123456\n")
    monkeypatch.delenv("SFLAM_DASHBOARD_TOKEN", raising=False)
    assert resolve_token(None, None) is None
    assert resolve_token(None, str(token_file)) == "from-the-file-123456"
    monkeypatch.setenv("SFLAM_DASHBOARD_TOKEN", "from-the-environment")
    assert resolve_token(None, str(token_file)) == "from-the-environment"
    assert resolve_token("from-the-flag", str(token_file)) == "from-the-flag"
    monkeypatch.delenv("SFLAM_DASHBOARD_TOKEN")
    with pytest.raises(DashboardError, match="cannot read .*absent"):
        resolve_token(None, str(tmp_path / "absent"))
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(DashboardError, match="is empty"):
        resolve_token(None, str(tmp_path / "empty"))


# ---------------------------------------------------------------------------------------------
# the view


def _registry(*ids: str) -> DeviceRegistry:
    registry = DeviceRegistry()
    for k, device_id in enumerate(ids):
        registry.devices[device_id] = DeviceInfo(device_id, online=k != 2, profile="raspberry-pi-5", backend="onnx",
                                                 num_samples=100 + k, last_seen=1000.0 + k, announced=True)
    return registry


def _member(device_id: str, bits: int, steps: int = 0) -> DeviceRound:
    return DeviceRound(p.Allocation(device_id, bits, 8, 0.2, 1e6, False), steps=steps)


def _rows(view: FleetView) -> dict[str, dict]:
    return {row["id"]: row for row in view.snapshot.devices}


def test_rows_follow_the_round_in_flight_and_the_records() -> None:
    # Prepare: two rounds of dev-a and dev-b (dev-b failed the second), then dev-a and dev-c in flight
    view = FleetView(RUN, [typed_record(1), typed_record(2, failed={"dev-b": "deadline"}, completed=["dev-a"])])
    registry = _registry("dev-a", "dev-b", "dev-c")
    state = RoundState(3, 3, {"dev-a": _member("dev-a", 4, steps=3), "dev-c": _member("dev-c", 2)},
                       time.monotonic() + 60, 0.01)
    # Execute
    view.refresh(registry, state, round=2, plan_round=3, needed=2)
    rows = _rows(view)
    # Assert: live state from the round, totals from the records
    assert [r["id"] for r in view.snapshot.devices] == ["dev-a", "dev-b", "dev-c"]
    assert (rows["dev-a"]["round_state"], rows["dev-a"]["bits"], rows["dev-a"]["steps"]) == ("training", 4, 3)
    assert (rows["dev-c"]["round_state"], rows["dev-c"]["bits"], rows["dev-c"]["status"]) == ("selected", 2, "offline")
    assert rows["dev-a"]["energy_j"] == pytest.approx(3.0) and rows["dev-a"]["round_energy_j"] == 1.5
    assert (rows["dev-b"]["round_state"], rows["dev-b"]["failure"]) == ("idle", "deadline")
    assert (rows["dev-b"]["rounds_done"], rows["dev-b"]["rounds_failed"], rows["dev-b"]["bits"]) == (1, 1, 4)
    run = view.snapshot.run
    assert (run["phase"], run["round"], run["plan_round"], run["online"], run["needed"]) == ("training", 2, 3, 2, 2)
    assert run["counters"] == {"rejected_stale": 2, "duplicate": 1}
    # a device that finished or failed in flight
    state.devices["dev-a"].update = object()
    state.devices["dev-c"].failure = "offline (link lost)"
    view.refresh(registry, state, round=2, plan_round=3, needed=2)
    rows = _rows(view)
    assert (rows["dev-a"]["round_state"], rows["dev-c"]["round_state"]) == ("done", "failed")
    assert rows["dev-c"]["failure"] == "offline (link lost)"
    assert view.refresh(registry, None, round=3, plan_round=3, needed=2).run["phase"] == "waiting"


def test_last_seen_moves_with_every_accepted_step() -> None:
    registry, view = _registry("dev-a"), FleetView(RUN)
    registry.seen("dev-a")
    registry.seen("dev-unknown")  # not announced: nothing to update, nothing added
    row = view.refresh(registry, None, round=0, plan_round=0, needed=1).devices[0]
    assert time.time() - row["last_seen"] < 60 and list(registry.devices) == ["dev-a"]


def test_a_device_is_late_past_the_deadline_or_well_behind_half_the_round() -> None:
    clock = _RoundClock(plan_round=1, started=0.0, deadline_s=60.0)
    assert not _is_late(clock, now=61.0 - 2, selected=4)
    assert _is_late(clock, now=61.0, selected=4)
    clock.finished_after_s = {"a": 10.0, "b": 10.0}  # half of 4 finished at 10 s
    assert not _is_late(clock, now=14.9, selected=4)
    assert _is_late(clock, now=15.1, selected=4)
    assert not _is_late(clock, now=15.1, selected=5)  # 2 of 5 is not half yet


def test_refresh_is_rate_limited_and_a_round_record_makes_it_due() -> None:
    view = FleetView(RUN)
    registry = _registry("dev-a")
    first = view.refresh(registry, None, round=0, plan_round=0, needed=1)
    assert not view.due() and view.due(time.monotonic() + REFRESH_S + 0.01)
    view.add_round(typed_record(1))
    assert view.due()
    second = view.refresh(registry, None, round=1, plan_round=1, needed=1)
    assert second.number == first.number + 1 and second.records == 1


def test_the_endpoint_json_has_the_documented_keys_and_since_filters_rounds() -> None:
    view = FleetView(RUN, [typed_record(r) for r in (1, 2, 3)])
    view.refresh(_registry("dev-a", "dev-b"), None, round=3, plan_round=3, needed=2)
    data = json.loads(view.encoded())
    assert set(data) == {"schema", "generated", "snapshot", "run", "devices", "rounds"}
    assert set(data["devices"][0]) >= {"id", "profile", "status", "last_seen", "round_state", "bits", "tx_power_w",
                                       "bandwidth_hz", "energy_j", "failure"}
    assert data["rounds"] == [sample_record(r) for r in (1, 2, 3)]  # the metrics.jsonl lines
    assert [r["plan_round"] for r in json.loads(view.encoded(since=1))["rounds"]] == [2, 3]
    assert json.loads(view.encoded(since=3))["rounds"] == []
    assert len(json.loads(view.encoded(since=-5))["rounds"]) == 3


def test_a_diverged_loss_is_null_in_the_json_not_nan() -> None:
    view = FleetView(RUN, [RoundRecord.from_dict(sample_record(1, test_loss=math.nan, train_loss=math.inf))])
    text = view.encoded().decode()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text)["rounds"][0]["test_loss"] is None


def test_a_round_record_is_seen_only_after_the_next_refresh() -> None:
    view = FleetView(RUN)
    view.refresh(_registry("dev-a"), None, round=0, plan_round=1, needed=1)
    view.add_round(typed_record(1))
    assert json.loads(view.encoded())["rounds"] == []  # the snapshot is what was published
    view.refresh(_registry("dev-a"), None, round=1, plan_round=1, needed=1)
    assert len(json.loads(view.encoded())["rounds"]) == 1


# ---------------------------------------------------------------------------------------------
# the HTTP endpoint


@pytest.fixture
def served() -> Iterator[DashboardServer]:
    view = FleetView(RUN, [typed_record(1)])
    view.refresh(_registry("dev-a", "dev-b"), None, round=1, plan_round=1, needed=2)
    server = DashboardServer(view, "127.0.0.1", 0)
    yield server
    server.close()


def _get(url: str, headers: dict[str, str] | None = None, method: str = "GET") -> tuple[int, dict, bytes]:
    request = urllib.request.Request(url, headers=headers or {}, method=method)
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # noqa: ANN002, ANN003
        return None


def test_the_page_and_its_json_are_served_read_only(served: DashboardServer) -> None:
    status, headers, body = _get(served.url + "api/fleet")
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert [d["id"] for d in json.loads(body)["devices"]] == ["dev-a", "dev-b"]
    for path, (name, kind) in PAGE_FILES.items():
        status, headers, body = _get(served.url.rstrip("/") + path)
        assert (status, headers["Content-Type"], body) == (200, kind, page_file(name))
        assert "default-src 'self'" in headers["Content-Security-Policy"]
        assert headers["X-Content-Type-Options"] == "nosniff"
    assert _get(served.url + "api/fleet?since=two")[0] == 400
    assert _get(served.url + "etc/passwd")[0] == 404
    status, headers, _ = _get(served.url + "api/fleet", method="POST")
    assert status == 405 and headers["Allow"] == "GET, HEAD"
    status, headers, body = _get(served.url + "api/fleet", method="HEAD")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0


def test_with_a_token_nothing_is_served_without_it() -> None:
    view = FleetView(RUN)
    server = DashboardServer(view, "127.0.0.1", 0, token=TOKEN)
    try:
        status, _, body = _get(server.url + "api/fleet")
        assert status == 401 and b"open /?token=YOUR_TOKEN" in body
        assert _get(server.url, {"Authorization": "Bearer " + "x" * 24})[0] == 401
        assert _get(server.url + "api/fleet", {"Authorization": f"Bearer {TOKEN}"})[0] == 200
        assert _get(server.url + "?token=wrong-token-but-long")[0] == 401
        status, headers, _ = _get(server.url + f"?token={TOKEN}")
        assert status == 303 and headers["Location"] == "/"
        cookie = headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
        assert _get(server.url + "api/fleet", {"Cookie": cookie.split(";")[0]})[0] == 200
    finally:
        server.close()


def test_a_resumed_run_shows_its_earlier_rounds(tmp_path: Path) -> None:
    # Prepare: a metrics log of two rounds, as a run left it
    from server_runtime.config import RunConfig
    from server_runtime.dashboard import start_dashboard
    from server_runtime.metrics import MetricsLog

    jsonl = tmp_path / "metrics.jsonl"
    with MetricsLog(jsonl) as log:
        log.write(sample_record(1))
        log.write(sample_record(2))
    config = RunConfig.from_dict({"metrics": {"jsonl": str(jsonl), "dashboard_port": free_port()}})
    assert start_dashboard(RunConfig(), None) is None  # off unless a port is set
    # Execute
    fresh, resumed = start_dashboard(config, None), None
    fresh.close()
    resumed = start_dashboard(config, None, resume=True)
    try:
        # Assert
        data = json.loads(_get(resumed.url + "api/fleet")[2])
        assert [r["plan_round"] for r in data["rounds"]] == [1, 2]
        assert data["run"]["rounds"] == config.training.rounds
    finally:
        resumed.close()
    assert json.loads(fresh.view.encoded())["rounds"] == []


def test_https_with_the_fleets_certificate(tmp_path: Path) -> None:
    # Prepare: a CA and a server certificate for 127.0.0.1, as `sflam fleet provision` makes them
    import ssl

    from sflam.fleet_pki import issue_certificates

    pki = issue_certificates(["127.0.0.1"], days=1)
    for name, pem in (("ca.crt", pki.ca_cert), ("server.crt", pki.server_cert), ("server.key", pki.server_key)):
        (tmp_path / name).write_bytes(pem)
    server = DashboardServer(FleetView(RUN), "127.0.0.1", 0, token=TOKEN,
                             tls=(str(tmp_path / "server.crt"), str(tmp_path / "server.key")))
    trusted = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
    try:
        # Execute + Assert: plain HTTP gets nothing; HTTPS needs the token; the cookie is Secure
        assert server.url.startswith("https://127.0.0.1:")
        with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):
            urllib.request.urlopen(server.url.replace("https", "http") + "api/fleet", timeout=10).read()
        opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=trusted), _NoRedirect)
        with pytest.raises(urllib.error.HTTPError) as refused:
            opener.open(server.url + "api/fleet", timeout=10)
        assert refused.value.code == 401
        request = urllib.request.Request(server.url + "api/fleet", headers={"Authorization": f"Bearer {TOKEN}"})
        with opener.open(request, timeout=10) as response:
            assert response.status == 200 and json.load(response)["schema"] == 1
        with pytest.raises(urllib.error.HTTPError) as login:
            opener.open(server.url + f"?token={TOKEN}", timeout=10)
        assert login.value.code == 303 and "; Secure" in login.value.headers["Set-Cookie"]
    finally:
        server.close()
    with pytest.raises(DashboardError, match="cannot use the certificate"):
        DashboardServer(FleetView(RUN), "127.0.0.1", 0, tls=(str(tmp_path / "ca.crt"), str(tmp_path / "server.key")))


def test_a_taken_port_is_a_clear_error(served: DashboardServer) -> None:
    with pytest.raises(DashboardError, match=f"cannot listen on 127.0.0.1:{served.port}"):
        DashboardServer(served.view, "127.0.0.1", served.port)


def test_the_page_loads_nothing_from_elsewhere() -> None:
    for name, _ in PAGE_FILES.values():
        text = page_file(name).decode("utf-8")
        urls = set(re.findall(r"(?:https?:)?//[\w.-]+\.[a-z]{2,}[^\s\"')]*", text))
        assert urls <= {"http://www.w3.org/2000/svg"}, f"{name} refers to {urls}"
        assert "@import" not in text
    html = page_file("index.html").decode("utf-8")
    assert re.findall(r"<script\b[^>]*>", html) == [f'<script src="{name}" defer>' for name in SCRIPTS]
    assert "style=" not in html and "<style" not in html and "on" + "click=" not in html


# ---------------------------------------------------------------------------------------------
# the command lines


def _sflam(*args: str, **env_vars: str) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", **env_vars}
    return subprocess.run([sys.executable, "-m", "sflam", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def test_server_refuses_a_non_loopback_dashboard_without_a_token() -> None:
    result = _sflam("server", "--config", "examples/run.toml", "--dashboard", "0.0.0.0:8080", "--check")
    assert result.returncode == 2
    assert "sflam server: error: the dashboard would listen on 0.0.0.0, which is not a loopback address" \
        in result.stderr
    ok = _sflam("server", "--config", "examples/run.toml", "--dashboard", "0.0.0.0:8080", "--dashboard-token",
                TOKEN, "--check")
    assert ok.returncode == 0, ok.stderr
    metrics = json.loads(ok.stdout)["metrics"]
    assert (metrics["dashboard_addr"], metrics["dashboard_port"]) == ("0.0.0.0", 8080)
    bad = _sflam("server", "--config", "examples/run.toml", "--dashboard", "web", "--check")
    assert bad.returncode == 2 and "--dashboard: expected [ADDR:]PORT" in bad.stderr


def test_only_trainer_rank_0_checks_the_page_it_serves() -> None:
    # the other ranks of a launch read the same run.toml but never serve the page (nor get the flag)
    spec = ("server", "--config", "examples/run.toml", "--dashboard", "0.0.0.0:8080", "--check")
    assert _sflam(*spec, RANK="0", WORLD_SIZE="2").returncode == 2
    assert _sflam(*spec, RANK="1", WORLD_SIZE="2").returncode == 0


def test_simulate_refuses_a_non_loopback_dashboard_before_any_work(tmp_path: Path) -> None:
    result = _sflam("simulate", "--dashboard", "0.0.0.0:8080", "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    assert "which is not a loopback address, without a token" in result.stderr
    assert not (tmp_path / "run").exists()
