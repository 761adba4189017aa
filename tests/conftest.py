"""Fixtures shared by the tests that need a real broker or a device bundle."""

from __future__ import annotations

from pathlib import Path

import pytest

from sflam.broker import MosquittoBroker
from sflam.fleet import local_fleet

FLEET_RUN = "srv"  # the run id of the `fleet` fixture (tests/test_server.config_text's)

Broker = MosquittoBroker  # the name the broker tests have always used


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
