"""A private mosquitto on a free loopback port, for tests, benchmarks and one-machine demos.

The broker writes its own ``mosquitto.conf`` (one listener on 127.0.0.1, anonymous, no
persistence, TCP_NODELAY) into a work directory, logs to ``mosquitto.log`` there, is stopped by
its PID (never by name) and can be restarted on the same port. It never listens beyond loopback.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)
HOST = "127.0.0.1"
FALLBACK_PATH = "/usr/sbin/mosquitto"  # Debian/Ubuntu install it outside a user's PATH
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
LOG_TAIL_BYTES = 2000


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


def config_text(port: int) -> str:
    """The broker's mosquitto.conf: one loopback listener, anonymous, in memory, TCP_NODELAY."""
    if not 0 < port < 65536:
        raise ValueError(f"port must be in 1..65535, got {port}")
    return f"listener {port} {HOST}\nallow_anonymous true\npersistence false\nset_tcp_nodelay true\n"


class MosquittoBroker:
    """A mosquitto on a loopback port of its own; ``with MosquittoBroker(dir) as b: ... b.url``."""

    def __init__(self, workdir: str | Path, *, executable: str | None = None) -> None:
        self.workdir = Path(workdir)
        self.executable = executable or find_mosquitto()
        if self.executable is None:
            raise FileNotFoundError("mosquitto not found on PATH or at /usr/sbin/mosquitto; "
                                    "install it (apt-get install mosquitto) or pass executable=")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.conf = self.workdir / "mosquitto.conf"
        self.conf.write_text(config_text(self.port))
        self.log_path = self.workdir / "mosquitto.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """``mqtt://127.0.0.1:PORT``."""
        return f"mqtt://{HOST}:{self.port}"

    @property
    def running(self) -> bool:
        """True while the broker process is alive."""
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        """Start mosquitto and wait until the port accepts connections; RuntimeError if it does not."""
        if self.running:
            return
        with open(self.log_path, "ab") as log_file:  # the child keeps its own descriptor
            self.proc = subprocess.Popen([self.executable, "-c", str(self.conf)], stdin=subprocess.DEVNULL,
                                         stdout=log_file, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited with status {self.proc.returncode} before listening on "
                                   f"{HOST}:{self.port} (config {self.conf}):\n{self.log_tail()}")
            if _accepts(self.port) and self.proc.poll() is None:
                log.info("mosquitto (pid %d) listening on %s", self.proc.pid, self.url)
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"mosquitto did not listen on {HOST}:{self.port} within {START_TIMEOUT_S:g} s "
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
            log.warning("mosquitto (pid %d) ignored SIGTERM for %g s; killing it", proc.pid, STOP_TIMEOUT_S)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(STOP_TIMEOUT_S)

    def restart(self) -> None:
        """Stop and start again on the same port (clients see a dropped connection)."""
        self.stop()
        self.start()

    def log_tail(self, max_bytes: int = LOG_TAIL_BYTES) -> str:
        """The end of mosquitto's output (stdout and stderr), for error messages."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - max_bytes))
                text = f.read().decode("utf-8", errors="replace").strip()
        except OSError as exc:
            return f"(no log: {exc.strerror or exc})"
        return text or "(mosquitto printed nothing)"

    def __enter__(self) -> "MosquittoBroker":
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _accepts(port: int) -> bool:
    """True if 127.0.0.1:port accepts a TCP connection now."""
    try:
        socket.create_connection((HOST, port), timeout=0.2).close()
        return True
    except OSError:
        return False
