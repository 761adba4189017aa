"""A device revoked while the server runs: ``sflam fleet revoke`` rewrites fleet.json, the running
server reloads its key list by itself, and the device's validly signed frames are refused from then
on (the broker, SIGHUPed, also refuses its login: tests/test_fleet.py)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from edge_runtime import protocol as p
from server_runtime.config import parse_config
from server_runtime.daemon import DaemonError, ServerDaemon
from sflam.testing.local_fleet import local_fleet
from test_server import config_text, wait_for

pytestmark = pytest.mark.broker
RUN = "rev"


def _hello(device: str, at: float) -> p.Hello:
    return p.Hello(p.Envelope(RUN, 0, device, 0, at), "raspberry-pi-5", "numpy", "0.1.0", 10)


def test_a_revoked_device_is_refused_by_the_running_server(tmp_path: Path) -> None:
    # Prepare: a signed fleet, a server waiting for its two devices, and a publisher (the
    # "postman") whom the ACL lets write any topic, so that only the signature check can refuse
    acl = [f"topic readwrite {p.Topics(RUN).prefix}/#"]
    with local_fleet(tmp_path, devices=2, run_id=RUN, extra_users={"postman": acl}) as fleet:
        cfg = parse_config(config_text(fleet.url, tmp_path / "ckpt", training__devices_per_round=2,
                                       round__wait_for_devices_s=120.0, broker__run_id=RUN,
                                       **fleet.server_overrides()))
        daemon = ServerDaemon(cfg)
        errors: list[BaseException] = []
        runner = threading.Thread(target=lambda: _run(daemon, errors), daemon=True)
        runner.start()
        dev1 = p.SigningKey.from_file("dev-1", fleet.signing_key("dev-1"))
        postman = fleet.link("postman")
        try:
            topic = p.Topics(RUN).up("dev-1")
            counters = daemon.receiver.counters
            # Execute: dev-1's signed Hello is accepted ...
            wait_for(lambda: daemon.link.connected, 30, "the server's connection")
            time.sleep(0.5)  # its subscriptions
            postman.publish(topic, p.encode(_hello("dev-1", time.time()), dev1))
            wait_for(lambda: counters["accepted.Hello"] == 1, 30, "dev-1's Hello")
            # ... dev-1 is revoked, and a newer Hello with its (still valid) key is not
            fleet.revoke("dev-1")
            time.sleep(p.Keyring.RELOAD_EVERY_S + 0.2)
            postman.publish(topic, p.encode(_hello("dev-1", time.time()), dev1))
            wait_for(lambda: counters["rejected.SignatureError"] == 1, 30, "the refusal")
        finally:
            postman.close()
            daemon.stop()
            runner.join(30)
    # Assert
    assert counters["accepted.Hello"] == 1
    assert daemon.receiver.keys.reloads == 1 and "dev-1" not in daemon.receiver.keys
    assert "dev-0" in daemon.receiver.keys
    assert not errors, errors


def _run(daemon: ServerDaemon, errors: list[BaseException]) -> None:
    try:
        daemon.run()
    except DaemonError as exc:  # "stopped while waiting for devices" is how this test ends it
        if "stopped" not in str(exc):
            errors.append(exc)
    except BaseException as exc:
        errors.append(exc)
