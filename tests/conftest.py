"""Fixtures shared by the tests that need a real broker or a device bundle, and the skip policy.

Skip policy: every dependency and tool the suite needs is installed by ``make test`` (the pinned
extras, mosquitto, sshd), so a skipped test means a missing piece, not an optional one. Only
tests marked ``cuda`` may skip (on a machine without a GPU); any other skip fails the run, after
the summary lists it. ``--allow-skips`` turns that failure into a warning for a partial set-up.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sflam.broker import MosquittoBroker
from sflam.testing.local_fleet import local_fleet
from sflam_common.limits import raise_open_file_limit

ALLOWED_SKIP_MARK = "cuda"
FLEET_RUN = "srv"  # the run id of the `fleet` fixture (tests/test_server.config_text's)

Broker = MosquittoBroker  # the name the broker tests have always used


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--allow-skips", action="store_true",
                     help="do not fail the run when tests other than the CUDA ones are skipped")


class SkipPolicy:
    """Counts skips; fails the session when one is not a ``cuda`` test (see the module docstring)."""

    def __init__(self) -> None:
        self.allowed: list[str] = []
        self.refused: list[tuple[str, str]] = []

    @pytest.hookimpl
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.skipped and not hasattr(report, "wasxfail"):
            self._count(report, ALLOWED_SKIP_MARK in report.keywords)

    @pytest.hookimpl
    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.skipped:  # a whole module skipped at import (importorskip, allow_module_level)
            self._count(report, False)

    def _count(self, report: pytest.TestReport | pytest.CollectReport, allowed: bool) -> None:
        if allowed:
            self.allowed.append(report.nodeid)
        else:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            self.refused.append((report.nodeid, reason))

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.refused and not session.config.getoption("allow_skips") and session.exitstatus == 0:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    @pytest.hookimpl
    def pytest_terminal_summary(self, terminalreporter, config: pytest.Config) -> None:
        total = len(self.allowed) + len(self.refused)
        terminalreporter.write_line(f"skipped: {total} ({len(self.allowed)} CUDA-only, {len(self.refused)} not allowed)")
        for nodeid, reason in self.refused:
            terminalreporter.write_line(f"  not allowed to skip: {nodeid}: {reason}", red=True)
        if self.refused and not config.getoption("allow_skips"):
            terminalreporter.write_line("failing the run: only tests marked `cuda` may skip (--allow-skips to permit)",
                                        red=True)


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(SkipPolicy(), "sflam-skip-policy")
    raise_open_file_limit()  # brokers and device hosts the tests start inherit it: a socket per session


@pytest.fixture()
def broker(tmp_path: Path):
    """A fresh mosquitto for one test."""
    with MosquittoBroker(tmp_path / "mosquitto") as b:
        yield b


@pytest.fixture()
def fleet(tmp_path: Path):
    """Two provisioned devices (dev-0, dev-1) and a mosquitto running the provisioned TLS config."""
    with local_fleet(tmp_path, devices=2, run_id=FLEET_RUN) as running:
        yield running


@pytest.fixture(scope="session")
def quick_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A device bundle of vit_quick_patch4_16 (ONNX, batch 4) for the device-loop tests."""
    from export.bundle import export_bundle

    out = tmp_path_factory.mktemp("bundle") / "b"
    export_bundle("vit_quick_patch4_16", "raspberry-pi-5", out, batch=4, formats=("onnx",))
    return out


@pytest.fixture(scope="session")
def quick_tflite_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TFLite (fp32, fixed batch 4) bundle of vit_quick_patch4_16: what the LiteRT backend runs."""
    from export.bundle import export_bundle

    out = tmp_path_factory.mktemp("bundle-tflite") / "b"
    export_bundle("vit_quick_patch4_16", "raspberry-pi-5", out, batch=4, formats=("tflite",))
    return out
