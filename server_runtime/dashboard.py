"""The live fleet page: a read-only HTTP server for the page and ``GET /api/fleet`` (docs/dashboard.md).

It binds 127.0.0.1 unless told otherwise; any other address needs a token, which a browser gives
once as ``/?token=...`` (kept in an HttpOnly cookie) and a script as ``Authorization: Bearer``.
Its threads read only the :class:`~server_runtime.fleet_view.FleetView`'s last snapshot, never
the daemon's state. The page (``dashboard_page/``) loads nothing from anywhere else, so it works
offline, and its Content-Security-Policy forbids it to.
"""

from __future__ import annotations

import hmac
import logging
import os
import socket
import ssl
import threading
from http import HTTPStatus
from http.cookies import CookieError, SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from edge_runtime.mqtt import is_loopback
from server_runtime.config import RunConfig
from server_runtime.fleet_view import FleetView, run_info
from server_runtime.metrics import read_round_records
from server_runtime.round_record import RoundRecordError

log = logging.getLogger(__name__)
DEFAULT_ADDR = "127.0.0.1"
TOKEN_ENV = "SFLAM_DASHBOARD_TOKEN"
MIN_TOKEN_CHARS = 16
COOKIE = "sflam_dashboard"
SCRIPTS = ("format.js", "svg.js", "table.js", "dashboard.js")  # in index.html's order
PAGE_FILES = {"/": ("index.html", "text/html; charset=utf-8"),
              "/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
              **{f"/{name}": (name, "text/javascript; charset=utf-8") for name in SCRIPTS}}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
                               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
REQUEST_TIMEOUT_S = 10.0  # a client that sends nothing for this long is dropped


class DashboardError(ValueError):
    """A dashboard address, port or token that cannot be used; the message says what to do."""


def parse_bind(spec: str, what: str = "--dashboard") -> tuple[str, int]:
    """``[ADDR:]PORT`` (``[::1]:8080`` for IPv6) as (address, port); the address defaults to 127.0.0.1."""
    text = spec.strip()
    addr, sep, port_text = text.rpartition(":")
    if not sep:
        addr = DEFAULT_ADDR
    elif addr.startswith("[") and addr.endswith("]"):
        addr = addr[1:-1]
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535 or (sep and not addr):
        raise DashboardError(f"{what}: expected [ADDR:]PORT with a port 1..65535 (8080, 127.0.0.1:8080, "
                             f"0.0.0.0:8080), got {spec!r}")
    return addr, int(port_text)


def check_exposure(addr: str, token: str | None) -> None:
    """Refuse a non-loopback bind without a token, and a token too short to guess-proof it."""
    if token is not None and len(token) < MIN_TOKEN_CHARS:
        raise DashboardError(f"the dashboard token has {len(token)} characters; use at least {MIN_TOKEN_CHARS} "
                             "(python3 -c 'import secrets; print(secrets.token_urlsafe(24))' makes one)")
    if token is None and not is_loopback(addr):
        raise DashboardError(
            f"the dashboard would listen on {addr}, which is not a loopback address, without a token: anyone who "
            f"reaches it would see the whole fleet. Give it a token (--dashboard-token, ${TOKEN_ENV} or "
            "metrics.dashboard_token_file), or bind 127.0.0.1 and reach it through an SSH tunnel")


def resolve_token(flag: str | None, token_file: str | None) -> str | None:
    """The token: the ``--dashboard-token`` flag, else $SFLAM_DASHBOARD_TOKEN, else the file's first line."""
    token = flag or os.environ.get(TOKEN_ENV) or None
    if token is None and token_file:
        try:
            token = Path(token_file).expanduser().read_text(encoding="utf-8").strip() or None
        except OSError as exc:
            raise DashboardError(f"metrics.dashboard_token_file: cannot read {token_file}: {exc.strerror}") from None
        if token is None:
            raise DashboardError(f"metrics.dashboard_token_file: {token_file} is empty")
    return token


def page_url(addr: str, port: int, tls: bool = False) -> str:
    """The page's address on ``addr:port``."""
    return f"{'https' if tls else 'http'}://{f'[{addr}]' if ':' in addr else addr}:{port}/"


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    """A TLS 1.2+ server context for the page's certificate and key; DashboardError when they do not load."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise DashboardError(f"the dashboard cannot use the certificate {cert} with the key {key}: {exc}") from None
    return context


def page_file(name: str) -> bytes:
    """One of the page's files, from the installed package."""
    return (resources.files("server_runtime") / "dashboard_page" / name).read_bytes()


def start_dashboard(config: RunConfig, token: str | None, *, resume: bool = False) -> DashboardServer | None:
    """The run's fleet page when ``metrics.dashboard_port`` is set (else None); ``token``: the
    ``--dashboard-token`` flag (:func:`resolve_token` looks further). A resumed run shows its earlier rounds."""
    metrics = config.metrics
    if not metrics.dashboard_port:
        return None
    records = []
    if resume and config.metrics_path.is_file():
        try:
            records = read_round_records(config.metrics_path, strict=False)
        except RoundRecordError as exc:
            log.warning("the fleet page starts without the earlier rounds: %s", exc)
    view = FleetView(run_info(config), records)
    tls = (metrics.dashboard_tls_cert, metrics.dashboard_tls_key) if metrics.dashboard_tls_cert else None
    return DashboardServer(view, metrics.dashboard_addr, metrics.dashboard_port,
                           resolve_token(token, metrics.dashboard_token_file), tls=tls)


class DashboardServer:
    """The page and its JSON on ``addr:port``, served from threads of their own."""

    def __init__(self, view: FleetView, addr: str, port: int, token: str | None = None,
                 tls: tuple[str, str] | None = None) -> None:
        """Bind now; ``tls``: (certificate, key) PEM files to serve HTTPS. DashboardError when the
        bind is unsafe, the port taken or the certificate unusable."""
        check_exposure(addr, token)
        self.view, self.token, self.tls = view, token, tls is not None
        self.pages = {path: (page_file(name), kind) for path, (name, kind) in PAGE_FILES.items()}
        context = tls_context(*tls) if tls is not None else None
        if context is None and not is_loopback(addr):
            log.warning("the fleet page's token crosses the network in the clear: set metrics.dashboard_tls_cert "
                        "and dashboard_tls_key (a provisioned fleet's broker/server.crt and server.key will do)")
        server_class = _IPv6Server if ":" in addr else _Server
        try:
            self._server = server_class((addr, port), _Handler)
        except OSError as exc:
            raise DashboardError(f"the dashboard cannot listen on {addr}:{port}: {exc.strerror}") from None
        self._server.tls_context = context
        self._server.dashboard = self  # type: ignore[attr-defined]
        self.addr, self.port = addr, self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="dashboard", daemon=True)
        self._thread.start()
        log.info("fleet page on %s", self.url)

    @property
    def url(self) -> str:
        """The page's address (a token's first visit adds ``?token=...``)."""
        return page_url(self.addr, self.port, self.tls)

    def allows(self, bearer: str | None, cookie: str | None) -> bool:
        """Whether a request carries the token (always, when there is none)."""
        if self.token is None:
            return True
        return any(given is not None and hmac.compare_digest(given.encode(), self.token.encode())
                   for given in (bearer, cookie))

    def close(self) -> None:
        """Stop serving and free the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5.0)


class _Server(ThreadingHTTPServer):
    """One thread per connection; with a TLS context, the handshake runs in that thread, never the
    accepting one (a client that stalls it only holds its own thread, for ``REQUEST_TIMEOUT_S``)."""

    daemon_threads = True
    tls_context: ssl.SSLContext | None = None

    def get_request(self) -> tuple[socket.socket, object]:
        sock, address = super().get_request()
        if self.tls_context is not None:
            sock = self.tls_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, address

    def handle_error(self, request: object, client_address: object) -> None:
        log.debug("dashboard: a request from %s failed (a TLS handshake, a client gone)", client_address,
                  exc_info=True)


class _IPv6Server(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    """GET and HEAD only: the page's files, ``/api/fleet``, ``/?token=`` (sets the cookie)."""

    timeout = REQUEST_TIMEOUT_S
    server_version = "sflam-dashboard"
    sys_version = ""

    @property
    def dashboard(self) -> DashboardServer:
        return self.server.dashboard  # type: ignore[attr-defined]

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        if url.path == "/" and "token" in query and self.dashboard.token is not None:
            return self._login(query["token"][0])
        if not self.dashboard.allows(self._bearer(), self._cookie()):
            return self._send(HTTPStatus.UNAUTHORIZED, b"this dashboard needs its token: open /?token=YOUR_TOKEN "
                              b"once (or send Authorization: Bearer YOUR_TOKEN)\n", "text/plain; charset=utf-8")
        if url.path == "/api/fleet":
            return self._fleet(query.get("since", [None])[0])
        if url.path in self.dashboard.pages:
            body, kind = self.dashboard.pages[url.path]
            return self._send(HTTPStatus.OK, body, kind)
        return self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain; charset=utf-8")

    def do_HEAD(self) -> None:  # noqa: N802
        self._head_only = True
        self.do_GET()

    def _refuse(self) -> None:
        self._send(HTTPStatus.METHOD_NOT_ALLOWED, b"read-only: GET and HEAD only\n", "text/plain; charset=utf-8",
                   {"Allow": "GET, HEAD"})

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _refuse  # noqa: N815

    def _fleet(self, since: str | None) -> None:
        if since is not None and not since.lstrip("-").isdigit():
            return self._send(HTTPStatus.BAD_REQUEST, b'{"error":"since must be an integer plan round"}\n',
                              "application/json")
        self._send(HTTPStatus.OK, self.dashboard.view.encoded(int(since) if since is not None else None),
                   "application/json")

    def _login(self, given: str) -> None:
        if not self.dashboard.allows(given, None):
            return self._send(HTTPStatus.UNAUTHORIZED, b"wrong token\n", "text/plain; charset=utf-8")
        cookie = f"{COOKIE}={self.dashboard.token}; HttpOnly; SameSite=Strict; Path=/" + ("; Secure" if self.dashboard.tls else "")
        self._send(HTTPStatus.SEE_OTHER, b"", "text/plain", {"Location": "/", "Set-Cookie": cookie})

    def _bearer(self) -> str | None:
        scheme, _, value = (self.headers.get("Authorization") or "").partition(" ")
        return value.strip() if scheme.lower() == "bearer" else None

    def _cookie(self) -> str | None:
        try:
            morsel = SimpleCookie(self.headers.get("Cookie") or "").get(COOKIE)
        except CookieError:
            return None
        return morsel.value if morsel is not None else None

    def _send(self, status: HTTPStatus, body: bytes, kind: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in {**SECURITY_HEADERS, "Content-Type": kind, "Content-Length": str(len(body)),
                            **(headers or {})}.items():
            self.send_header(name, value)
        self.end_headers()
        if not getattr(self, "_head_only", False):
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (http.server's signature)
        log.debug("dashboard %s: " + format, self.address_string(), *args)
