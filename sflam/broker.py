"""A private MQTT broker on a free loopback port, for tests, benchmarks and one-machine demos.

:class:`MosquittoBroker` writes its own ``mosquitto.conf`` (one listener on 127.0.0.1, anonymous,
no persistence, TCP_NODELAY) into a work directory and logs to ``mosquitto.log`` there.
:class:`AmqttBroker` is the fallback when mosquitto is not installed: amqtt 0.12's broker in a
Python subprocess of its own (one loopback listener, anonymous, in memory; asyncio sets TCP_NODELAY
on every connection), configured by ``amqtt.yaml`` and logging to ``amqtt.log``. amqtt speaks only
MQTT 3.1.1, so its URL says ``?protocol=3.1.1`` (read by :mod:`edge_runtime.mqtt`), and it keeps
no session of a disconnected anonymous client: QoS 1 messages sent while a client is away are lost
(mosquitto queues them for the session's expiry). Either broker is stopped by its PID (never by
name), can be restarted on the same port and never listens beyond loopback, except on the addresses of
``also_on``: the bridge of a run's own network namespaces (``sflam simulate --network netem``,
:mod:`sflam.netem`), same port. :func:`start_local_broker` picks one and starts it.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from importlib.util import find_spec
from pathlib import Path
from types import TracebackType
from typing import Self

log = logging.getLogger(__name__)
HOST = "127.0.0.1"
FALLBACK_PATH = "/usr/sbin/mosquitto"  # Debian/Ubuntu install it outside a user's PATH
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
LOG_TAIL_BYTES = 2000
BROKER_KINDS = ("auto", "mosquitto", "amqtt")
# amqtt's own script (amqtt.scripts.broker_script) keeps running, not listening, when a listener
# fails to bind, and falls back to 0.0.0.0:1883 on an unreadable config; this one exits instead.
AMQTT_RUNNER = """\
import asyncio, logging, signal, sys
import yaml
from amqtt.broker import Broker

async def serve(config):
    broker = Broker(config)
    await broker.start()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await broker.shutdown()

with open(sys.argv[1], encoding="utf-8") as f:
    config = yaml.safe_load(f)
if not isinstance(config, dict):
    sys.exit(f"{sys.argv[1]}: not a YAML mapping")
logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(levelname)s %(name)s: %(message)s")
logging.getLogger("transitions").setLevel(logging.WARNING)
asyncio.run(serve(config))
"""


def find_mosquitto() -> str | None:
    """The mosquitto executable on PATH, else /usr/sbin/mosquitto, else None."""
    found = shutil.which("mosquitto")
    if found:
        return found
    return FALLBACK_PATH if os.access(FALLBACK_PATH, os.X_OK) else None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _hosts(port: int, also_on: tuple[str, ...]) -> tuple[str, ...]:
    if not 0 < port < 65536:
        raise ValueError(f"port must be in 1..65535, got {port}")
    for host in also_on:
        if ipaddress.ip_address(host).is_unspecified:  # ValueError for a name: addresses only
            raise ValueError(f"also_on: {host} would listen on every interface; give the run's own addresses")
    return (HOST, *also_on)


def config_text(port: int, also_on: tuple[str, ...] = ()) -> str:
    """The broker's mosquitto.conf: a loopback listener (and one per ``also_on`` address), anonymous,
    in memory, TCP_NODELAY."""
    listeners = "".join(f"listener {port} {host}\n" for host in _hosts(port, also_on))
    return f"{listeners}allow_anonymous true\npersistence false\nset_tcp_nodelay true\n"


def amqtt_config_text(port: int, also_on: tuple[str, ...] = ()) -> str:
    """The amqtt broker's YAML config: a loopback TCP listener (and one per ``also_on`` address),
    anonymous, no $SYS or packet logging."""
    hosts = _hosts(port, also_on)
    listeners = "".join(f"  {'default' if k == 0 else f'also{k}'}:\n    type: tcp\n    bind: {host}:{port}\n"
                        for k, host in enumerate(hosts))
    return (f"listeners:\n{listeners}"
            "plugins:\n  amqtt.plugins.authentication.AnonymousAuthPlugin:\n    allow_anonymous: true\n")


def start_local_broker(workdir: str | Path, kind: str = "auto",
                       also_on: tuple[str, ...] = ()) -> MosquittoBroker | AmqttBroker:
    """A started private broker: ``"mosquitto"``, ``"amqtt"``, or ``"auto"`` (mosquitto when installed);
    ``also_on``: more addresses to listen on, same port (see the module docstring)."""
    if kind not in BROKER_KINDS:
        raise ValueError(f"broker kind must be one of {', '.join(BROKER_KINDS)}; got {kind!r}")
    if kind == "auto":
        found = find_mosquitto()
        if found is not None:
            log.info("local broker: mosquitto (%s)", found)
            kind = "mosquitto"
        else:
            log.info("local broker: embedded amqtt (mosquitto not found on PATH or at %s)", FALLBACK_PATH)
            kind = "amqtt"
    broker = MosquittoBroker(workdir, also_on=also_on) if kind == "mosquitto" else AmqttBroker(workdir, also_on=also_on)
    broker.start()
    return broker


class _LocalBroker:
    """A broker subprocess on a loopback port of its own, started and stopped by PID."""

    name = "broker"
    workdir: Path
    port: int
    conf: Path
    log_path: Path
    proc: subprocess.Popen | None

    def _command(self) -> list[str]:
        raise NotImplementedError

    @property
    def url(self) -> str:
        """``mqtt://127.0.0.1:PORT``."""
        return f"mqtt://{HOST}:{self.port}"

    def url_on(self, host: str) -> str:
        """The URL on one of ``also_on``'s addresses (same port, same query)."""
        return self.url.replace(f"//{HOST}:", f"//{host}:", 1)

    @property
    def running(self) -> bool:
        """True while the broker process is alive."""
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        """Start the broker and wait until the port accepts connections; RuntimeError if it does not."""
        if self.running:
            return
        with open(self.log_path, "ab") as log_file:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(self._command(), stdin=subprocess.DEVNULL,
                                         stdout=log_file, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with status {self.proc.returncode} before listening on "
                                   f"{HOST}:{self.port} (config {self.conf}):\n{self.log_tail()}")
            if _accepts(self.port) and self.proc.poll() is None:
                log.info("%s (pid %d) listening on %s", self.name, self.proc.pid, self.url)
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.name} did not listen on {HOST}:{self.port} within {START_TIMEOUT_S:g} s "
                           f"(config {self.conf}):\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM the broker by PID, wait, SIGKILL if it lingers; a no-op when not running."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log.warning("%s (pid %d) ignored SIGTERM for %g s; killing it", self.name, proc.pid, STOP_TIMEOUT_S)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(STOP_TIMEOUT_S)

    def restart(self) -> None:
        """Stop and start again on the same port (clients see a dropped connection)."""
        self.stop()
        self.start()

    def log_tail(self, max_bytes: int = LOG_TAIL_BYTES) -> str:
        """The end of the broker's output (stdout and stderr), for error messages."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - max_bytes))
                text = f.read().decode("utf-8", errors="replace").strip()
        except OSError as exc:
            return f"(no log: {exc.strerror or exc})"
        return text or f"({self.name} printed nothing)"

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class MosquittoBroker(_LocalBroker):
    """A mosquitto on a loopback port of its own; ``with MosquittoBroker(dir) as b: ... b.url``."""

    name = "mosquitto"

    def __init__(self, workdir: str | Path, *, executable: str | None = None,
                 conf: str | Path | None = None, port: int | None = None, also_on: tuple[str, ...] = ()) -> None:
        """``conf``/``port``: run that mosquitto.conf (e.g. a provisioned TLS one) listening on 127.0.0.1:port."""
        if (conf is None) != (port is None):
            raise ValueError("conf= and port= go together: port= is the port the given conf listens on")
        self.workdir = Path(workdir)
        self.executable = executable or find_mosquitto()
        if self.executable is None:
            raise FileNotFoundError("mosquitto not found on PATH or at /usr/sbin/mosquitto; "
                                    "install it (apt-get install mosquitto) or pass executable=")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port() if port is None else port
        self.conf = self.workdir / "mosquitto.conf" if conf is None else Path(conf)
        if conf is None:
            self.conf.write_text(config_text(self.port, also_on))
        self.log_path = self.workdir / "mosquitto.log"
        self.proc = None

    def _command(self) -> list[str]:
        return [self.executable, "-c", str(self.conf)]


class AmqttBroker(_LocalBroker):
    """amqtt's broker (MQTT 3.1.1) in a subprocess on a loopback port of its own; MosquittoBroker's API."""

    name = "amqtt"

    def __init__(self, workdir: str | Path, *, python: str | None = None, also_on: tuple[str, ...] = ()) -> None:
        self.python = python or sys.executable
        if python is None and find_spec("amqtt") is None:
            raise ModuleNotFoundError("amqtt is not installed in this Python; install mosquitto "
                                      "(apt-get install mosquitto) or amqtt (pip install amqtt)")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.conf = self.workdir / "amqtt.yaml"
        self.conf.write_text(amqtt_config_text(self.port, also_on))
        self.log_path = self.workdir / "amqtt.log"
        self.proc = None

    @property
    def url(self) -> str:
        """``mqtt://127.0.0.1:PORT?protocol=3.1.1``: amqtt speaks only MQTT 3.1.1 (see edge_runtime.mqtt)."""
        return f"mqtt://{HOST}:{self.port}?protocol=3.1.1"

    def _command(self) -> list[str]:
        return [self.python, "-c", AMQTT_RUNNER, str(self.conf)]


def _accepts(port: int) -> bool:
    """True if 127.0.0.1:port accepts a TCP connection now."""
    try:
        socket.create_connection((HOST, port), timeout=0.2).close()
        return True
    except OSError:
        return False
