"""sflam.broker.MosquittoBroker: a real mosquitto on loopback, started, restarted and stopped by PID."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from sflam.broker import MosquittoBroker, find_mosquitto

pytestmark = [pytest.mark.broker,
              pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")]


def accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def test_config_listens_on_loopback_only(tmp_path: Path) -> None:
    broker = MosquittoBroker(tmp_path)
    lines = broker.conf.read_text().splitlines()
    assert lines[0] == f"listener {broker.port} 127.0.0.1"
    assert {"allow_anonymous true", "persistence false", "set_tcp_nodelay true"} <= set(lines)
    assert broker.url == f"mqtt://127.0.0.1:{broker.port}"


def test_start_and_stop(tmp_path: Path) -> None:
    # Prepare
    broker = MosquittoBroker(tmp_path)
    # Execute
    with broker:
        pid, up = broker.proc.pid, accepts(broker.port)
    # Assert: listening while inside, gone (process and port) after
    assert up
    assert broker.proc is None and not broker.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not accepts(broker.port)


def test_restart_keeps_the_port(tmp_path: Path) -> None:
    with MosquittoBroker(tmp_path) as broker:
        port, first_pid = broker.port, broker.proc.pid
        broker.restart()
        assert broker.port == port and broker.proc.pid != first_pid
        assert accepts(port)
        assert broker.url == f"mqtt://127.0.0.1:{port}"


def test_a_bad_config_raises_with_mosquittos_words(tmp_path: Path) -> None:
    # Prepare: a config line mosquitto does not know
    broker = MosquittoBroker(tmp_path)
    broker.conf.write_text(broker.conf.read_text() + "no_such_option_xyz true\n")
    # Execute
    with pytest.raises(RuntimeError) as caught:
        broker.start()
    # Assert: the message names the cause mosquitto printed, and nothing is left running
    message = str(caught.value)
    assert "exited" in message and "no_such_option_xyz" in message, message
    assert not broker.running and not accepts(broker.port)


def test_a_missing_executable_is_named(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        MosquittoBroker(tmp_path, executable=str(tmp_path / "no-mosquitto")).start()
