"""One supervisor for the child processes a run starts: servers, devices, brokers' neighbours.

``sflam simulate``, the benchmarks and the test harness start ``sflam server`` and ``sflam
device`` processes the same way, through :class:`ProcessGroup`:

- each child writes stdout and stderr to ``<logs>/<name>.log`` (no pipe to fill up and block it);
- each runs in a session of its own, so a Ctrl-C at the terminal reaches only the supervisor,
  which then stops the children in order;
- each is stopped by PID with one policy: SIGTERM (``sflam server`` and ``sflam device`` treat it
  like Ctrl-C: they finish cleanly and print their summary line), then SIGKILL after a grace
  period. SIGINT is not used: a shell that starts a job in the background leaves SIGINT ignored,
  and an ignored signal is inherited;
- each starts in the supervisor's working directory (not the package's), and sees this package
  first on ``PYTHONPATH``, so a source checkout runs without being installed. Callers pass
  absolute paths in commands anyway.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)

PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # the folder that holds the sflam package
STOP_TIMEOUT_S = 30.0
POLL_S = 0.25
LOG_TAIL_LINES = 25
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


class ProcessError(RuntimeError):
    """A child that exited or hung where it should have been running or ready."""


def sflam_command(*args: str) -> list[str]:
    """``python -m sflam ARGS`` with this interpreter."""
    return [sys.executable, "-m", "sflam", *args]


def child_env(threads: int | None = None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This environment, with the package first on PYTHONPATH, unbuffered output and, when
    ``threads`` is given, that many threads per numeric library."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("PYTHONUNBUFFERED", "1")
    if threads is not None:
        env.update({name: str(threads) for name in THREAD_VARIABLES})
    env.update(extra or {})
    return env


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last lines of a log file, for error messages."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        return f"(no log: {exc})"
    return "\n".join(text.strip().splitlines()[-lines:]) or "(empty)"


class ProcessGroup:
    """Named child processes, each logging to a file, all stopped by PID (module docstring).

    ``with ProcessGroup(logs) as group:`` stops whatever still runs when the block ends.
    """

    def __init__(self, logs: Path, *, cwd: Path | None = None, stop_timeout_s: float = STOP_TIMEOUT_S) -> None:
        self.logs = Path(logs).resolve()
        self.logs.mkdir(parents=True, exist_ok=True)
        self.cwd = Path.cwd() if cwd is None else Path(cwd)
        self.stop_timeout_s = stop_timeout_s
        self.procs: dict[str, subprocess.Popen] = {}
        self._files: dict[str, IO[bytes]] = {}

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def log_path(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def start(self, name: str, cmd: Sequence[str], env: Mapping[str, str] | None = None) -> subprocess.Popen:
        """Start ``cmd`` as ``name`` (unique in the group); ``env`` defaults to :func:`child_env`."""
        if name in self.procs:
            raise ValueError(f"a process named {name!r} is already in this group")
        handle = open(self.log_path(name), "wb")
        self._files[name] = handle
        proc = subprocess.Popen(list(cmd), cwd=self.cwd, env=dict(env or child_env()), stdin=subprocess.DEVNULL,
                                stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        return proc

    def wait_for_log(self, name: str, text: str, timeout_s: float) -> None:
        """Until ``text`` appears in ``name``'s log; ProcessError if it exits or time runs out first."""
        self.wait_until(lambda: text.encode() in self.log_path(name).read_bytes(), timeout_s,
                        f"{name} to log {text!r}", watch=(name,))

    def wait_until(self, ready: Callable[[], bool], timeout_s: float, what: str,
                   watch: Sequence[str] | None = None) -> None:
        """Poll ``ready`` until true; ProcessError when a watched child (default: all) exits first
        or after ``timeout_s``, with the log tail of the child concerned."""
        deadline = time.monotonic() + timeout_s
        while not ready():
            ended = [n for n in (self.procs if watch is None else watch) if self.procs[n].poll() is not None]
            if ended:
                name = ended[0]
                raise ProcessError(f"{name} exited with status {self.procs[name].returncode} while waiting for "
                                   f"{what}; its log ends:\n{self.tail(name)}")
            if time.monotonic() > deadline:
                raise ProcessError(f"timed out after {timeout_s:g} s waiting for {what}")
            time.sleep(POLL_S)

    def exited(self, names: Sequence[str] | None = None) -> dict[str, int]:
        """Exit statuses of the children (of ``names``) that have ended."""
        codes = {n: self.procs[n].poll() for n in (self.procs if names is None else names)}
        return {n: code for n, code in codes.items() if code is not None}

    def tail(self, name: str, lines: int = LOG_TAIL_LINES) -> str:
        return log_tail(self.log_path(name), lines)

    def output(self, name: str) -> str:
        """Everything ``name`` has written so far."""
        return self.log_path(name).read_text(encoding="utf-8", errors="replace")

    def stop(self, names: Sequence[str] | None = None, timeout_s: float | None = None) -> dict[str, int]:
        """SIGTERM the running children (of ``names``), wait, SIGKILL what lingers; their exit statuses."""
        chosen = list(self.procs if names is None else names)
        for name in chosen:
            proc = self.procs[name]
            if proc.poll() is None:
                try:
                    os.kill(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + (self.stop_timeout_s if timeout_s is None else timeout_s)
        for name in chosen:
            proc = self.procs[name]
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %d) ignored SIGTERM; killing it", name, proc.pid)
                proc.kill()
                proc.wait(10)
            handle = self._files.pop(name, None)
            if handle is not None:
                handle.close()
        return {name: self.procs[name].returncode for name in chosen}
