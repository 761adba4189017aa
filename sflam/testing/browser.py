"""A minimal headless-Chromium driver over the DevTools protocol.

Tests and benchmarks use it to drive the dashboard page (``server_runtime/dashboard_page/``,
see docs/dashboard.md) as a browser would: open a URL, evaluate JavaScript in the page, wait
for a condition, take a screenshot. It needs a Chromium binary (:func:`find_chromium`) and the
``websockets`` package, nothing else (the tests fail, naming what to install, when no binary is found).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from websockets.exceptions import WebSocketException
from websockets.sync.client import ClientConnection, connect

CANDIDATES = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome")
STOP_GRACE_S = 5.0


class BrowserError(RuntimeError):
    """Chromium missing, failed to start, a DevTools error or a JS exception."""


def find_chromium() -> str | None:
    """$SFLAM_CHROMIUM, else the first of chromium-headless-shell, chromium, chromium-browser,
    google-chrome on PATH; None when there is none."""
    override = os.environ.get("SFLAM_CHROMIUM")
    if override:
        return override
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _group_gone(group: int, timeout_s: float) -> bool:
    """Wait until no process of the group is left (reaping the leader if it is our child)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.waitpid(-group, os.WNOHANG)
        except ChildProcessError:
            pass
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


class HeadlessBrowser:
    """One headless Chromium process with one page, driven over its DevTools websocket."""

    def __init__(self, binary: str | None = None, *, width: int = 1280, height: int = 900,
                 timeout_s: float = 30.0) -> None:
        self.binary = binary
        self.width = width
        self.height = height
        self.timeout_s = timeout_s
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: Path | None = None
        self._log: Any = None
        self._ws: ClientConnection | None = None
        self._next_id = 0
        self._events: deque[dict[str, Any]] = deque(maxlen=10_000)

    def __enter__(self) -> HeadlessBrowser:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- lifecycle -------------------------------------------------------------------------

    def _flags(self) -> list[str]:
        flags = ["--headless", "--disable-gpu"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            flags.append("--no-sandbox")
        return flags + [
            "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1",
            f"--user-data-dir={self._dir}", f"--window-size={self.width},{self.height}",
            "--no-first-run", "--no-default-browser-check", "--disable-extensions",
            "--disable-background-networking", "--hide-scrollbars", "about:blank",
        ]

    def start(self) -> None:
        """Launch Chromium and connect to its page target."""
        binary = self.binary or find_chromium()
        if binary is None:
            raise BrowserError("no Chromium found (set $SFLAM_CHROMIUM or install chromium)")
        self._dir = Path(tempfile.mkdtemp(prefix="sflam-browser-"))
        self._log = open(self._dir / "chromium.log", "wb")  # noqa: SIM115 - closed in close()
        try:
            # its own process group: the binary may be a wrapper script whose Chromium outlives it
            self._proc = subprocess.Popen([binary, *self._flags()], stdin=subprocess.DEVNULL,
                                          stdout=self._log, stderr=subprocess.STDOUT,
                                          start_new_session=True)
        except OSError as exc:
            self.close()
            raise BrowserError(f"cannot start {binary}: {exc}") from exc
        try:
            port = self._wait_port()
            self._ws = connect(self._page_ws_url(port), max_size=None, open_timeout=self.timeout_s)
        except (BrowserError, OSError, WebSocketException) as exc:
            tail = _log_tail(self._dir / "chromium.log")
            self.close()
            raise BrowserError(f"Chromium failed to start: {exc}\n{tail}") from exc

    def _wait_port(self) -> int:
        assert self._dir is not None and self._proc is not None
        marker = self._dir / "DevToolsActivePort"
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise BrowserError(f"Chromium exited with code {self._proc.returncode}")
            try:
                first = marker.read_text().splitlines()[0]
                return int(first)
            except (OSError, IndexError, ValueError):
                time.sleep(0.05)
        raise BrowserError(f"no DevToolsActivePort after {self.timeout_s} s")

    def _page_ws_url(self, port: int) -> str:
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list",
                                        timeout=self.timeout_s) as reply:
                targets = json.load(reply)
            pages = [t for t in targets if t.get("type") == "page" and t.get("webSocketDebuggerUrl")]
            if pages:
                return str(pages[0]["webSocketDebuggerUrl"])
            time.sleep(0.1)
        raise BrowserError("Chromium lists no page target")

    def close(self) -> None:
        """Close the socket, stop the process (kill after 5 s), remove the temp dir. Idempotent."""
        if self._ws is not None:
            try:
                self._ws.close()
            except (OSError, WebSocketException):
                pass
            self._ws = None
        if self._proc is not None:
            self._stop(self._proc)
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    @staticmethod
    def _stop(proc: subprocess.Popen[bytes]) -> None:
        """Terminate the process group Chromium runs in (wrapper, browser, renderers); kill it
        after STOP_GRACE_S."""
        group = proc.pid  # start_new_session: the group id is the leader's pid
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(group, sig)
            except ProcessLookupError:
                break
            if _group_gone(group, STOP_GRACE_S):
                break
        try:
            proc.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()

    # -- protocol --------------------------------------------------------------------------

    def _recv(self, deadline: float) -> dict[str, Any]:
        if self._ws is None:
            raise BrowserError("browser not started")
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        try:
            return dict(json.loads(self._ws.recv(timeout=left)))
        except TimeoutError:
            raise
        except (OSError, WebSocketException) as exc:
            raise BrowserError(f"DevTools connection lost: {exc}") from exc

    def send(self, method: str, params: dict[str, Any] | None = None,
             timeout_s: float | None = None) -> dict[str, Any]:
        """Send one DevTools command and return its result; events read meanwhile are kept."""
        if self._ws is None:
            raise BrowserError("browser not started")
        self._next_id += 1
        ident = self._next_id
        self._ws.send(json.dumps({"id": ident, "method": method, "params": params or {}}))
        wait_s = timeout_s or self.timeout_s
        message = self._read_until(lambda m: m.get("id") == ident, wait_s, f"no reply to {method} within {wait_s} s")
        if "error" in message:
            raise BrowserError(f"{method}: {message['error'].get('message', message['error'])}")
        return dict(message.get("result", {}))

    def _wait_event(self, method: str, timeout_s: float) -> dict[str, Any]:
        for index, event in enumerate(self._events):
            if event["method"] == method:
                del self._events[index]
                return event
        return self._read_until(lambda m: m.get("method") == method, timeout_s, f"no {method} within {timeout_s} s")

    def _read_until(self, wanted: Callable[[dict[str, Any]], bool], timeout_s: float, missing: str) -> dict[str, Any]:
        """The first message ``wanted`` takes within ``timeout_s``; other events read meanwhile are kept."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                message = self._recv(deadline)
            except TimeoutError:
                raise BrowserError(missing) from None
            if wanted(message):
                return message
            if "method" in message:
                self._events.append(message)

    # -- page ------------------------------------------------------------------------------

    def open(self, url: str) -> None:
        """Navigate the page to url and wait for its load event."""
        self.send("Page.enable")
        self._events = deque((e for e in self._events if e["method"] != "Page.loadEventFired"),
                             maxlen=self._events.maxlen)
        result = self.send("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise BrowserError(f"cannot open {url}: {result['errorText']}")
        self._wait_event("Page.loadEventFired", self.timeout_s)

    def evaluate(self, expression: str) -> Any:
        """Evaluate a JavaScript expression in the page (promises awaited); return its value."""
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True})
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text", "")
            raise BrowserError(f"JavaScript exception in {expression!r}: {text}")
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout_s: float = 30.0, interval_s: float = 0.1) -> Any:
        """Evaluate expression until it is truthy and return that value."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() >= deadline:
                raise BrowserError(f"timed out after {timeout_s} s waiting for {expression!r}")
            time.sleep(interval_s)

    def screenshot(self, path: str | os.PathLike[str], *, full_page: bool = False) -> None:
        """Write a PNG of the viewport (or of the whole document with full_page) to path."""
        if full_page:
            size = self.evaluate("[document.documentElement.scrollWidth, "
                                 "document.documentElement.scrollHeight]")
            self.send("Emulation.setDeviceMetricsOverride", {
                "width": max(int(size[0]), self.width), "height": max(int(size[1]), self.height),
                "deviceScaleFactor": 1, "mobile": False})
        try:
            shot = self.send("Page.captureScreenshot", {"format": "png"})
        finally:
            if full_page:
                self.send("Emulation.clearDeviceMetricsOverride")
        Path(path).write_bytes(base64.b64decode(shot["data"]))

    def events(self, method: str | None = None) -> list[dict[str, Any]]:
        """Return (and forget) the DevTools events read so far, optionally only one method's."""
        kept: list[dict[str, Any]] = []
        rest: deque[dict[str, Any]] = deque(maxlen=self._events.maxlen)
        for event in self._events:
            (kept if method is None or event["method"] == method else rest).append(event)
        self._events = rest
        return kept
