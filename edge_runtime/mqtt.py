"""A small typed layer over paho-mqtt 2 (MQTT 5, or 3.1.1): connect, subscribe, publish frames, receive.

What the protocol asks of a client (docs/protocol.md 1.3) lives here: TCP_NODELAY on the
socket, a retained last will, a persistent session (Clean Start 0 + session expiry), QoS 1
everywhere, frames chunked with :func:`edge_runtime.protocol.split`, and reconnection with
exponential backoff plus jitter. Every wait has a timeout; every failure is a ``TransportError``.
Incoming publishes land in a bounded :class:`edge_runtime.inbox.Inbox` (per-source queues served
round-robin, limits and expiry, every drop counted) that the caller drains with :meth:`MqttLink.get`.

Protocol version, chosen by the broker URL so that it reaches every process that is given it:
``mqtt://host:port?protocol=3.1.1`` speaks MQTT 3.1.1 only (the embedded amqtt broker, whose
:attr:`sflam.broker.AmqttBroker.url` says so: amqtt 0.12 never answers an MQTT 5 CONNECT that
carries properties, so no fallback could detect it); ``?protocol=5`` speaks MQTT 5 only; no query
speaks MQTT 5 and, when a broker answers CONNACK "unsupported protocol version" (a 3.1.1-only
broker that reads the protocol level first), reconnects at once with 3.1.1 and keeps it. Under
3.1.1 the persistent session is Clean Session 0 without an expiry (3.1.1 has none); QoS 1,
retained messages, the retained last will, chunking and TCP_NODELAY are the same.

Credentials and a CA file are refused with a plaintext ``mqtt://`` URL to any host but loopback
(:func:`plaintext_problem`): the CONNECT would carry the password in the clear, and the CA file
would be ignored. ``insecure_plaintext`` opts in, for a network the user trusts.
"""

from __future__ import annotations

import ipaddress
import logging
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_runtime.inbox import Inbox, InboxLimits, Incoming
from edge_runtime.mqtt_loop import LinkLoop
from edge_runtime.protocol import Message, SigningKey, split
from edge_runtime.protocol.topics import QOS

log = logging.getLogger(__name__)
DEFAULT_MAX_FRAME_BYTES = 256 * 1024
# TLS 1.2 suites offered (TLS 1.3 ones are all AEAD): ECDHE with AES-GCM or ChaCha20-Poly1305, no CBC;
# a provisioned broker allows the same (sflam.fleet_broker)
TLS12_CIPHERS = ("ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:"
                 "ECDHE-RSA-AES128-GCM-SHA256:ECDHE-RSA-AES256-GCM-SHA384:ECDHE-RSA-CHACHA20-POLY1305")
PROTOCOLS = {"5": paho.MQTTv5, "3.1.1": paho.MQTTv311}
UNSUPPORTED_PROTOCOL_VERSION = 0x84  # MQTT 5 CONNACK reason; paho maps a 3.1.1 broker's return code 1 to it
_SCHEMES = {"mqtt": (1883, False), "tcp": (1883, False), "mqtts": (8883, True), "ssl": (8883, True)}
INSECURE_OPT_IN = "pass --insecure-plaintext (sflam device) or set broker.insecure_plaintext = true (run.toml)"


class TransportError(RuntimeError):
    """The broker cannot be reached, or a wait on it timed out."""


class PlaintextSecretsError(ValueError):
    """Credentials or a CA file given with a plaintext ``mqtt://`` URL to a host that is not loopback."""


@dataclass(frozen=True)
class BrokerAddress:
    """Where the broker is: ``mqtt://host[:port]`` or ``mqtts://host[:port]`` (TLS), ``?protocol=5|3.1.1``."""

    host: str
    port: int
    tls: bool
    protocol: str | None = None  # None: MQTT 5, falling back to 3.1.1 when the broker refuses 5

    @classmethod
    def parse(cls, url: str) -> "BrokerAddress":
        """Parse a broker URL; ValueError naming what is wrong."""
        parts = urlsplit(url)
        if parts.scheme not in _SCHEMES:
            raise ValueError(f"broker URL must start with mqtt:// or mqtts://, got {url!r}")
        if not parts.hostname:
            raise ValueError(f"broker URL has no host: {url!r}")
        if parts.path not in ("", "/") or parts.fragment or parts.username:
            raise ValueError(f"broker URL takes only scheme://host[:port][?protocol=5|3.1.1], got {url!r}")
        try:
            port = parts.port or _SCHEMES[parts.scheme][0]
        except ValueError as exc:
            raise ValueError(f"broker URL {url!r}: {exc}") from None
        return cls(parts.hostname, port, _SCHEMES[parts.scheme][1], _protocol_from_query(url, parts.query))


@dataclass(frozen=True)
class LinkConfig:
    """How to talk to the broker; times in seconds."""

    client_id: str
    will_topic: str | None = None
    will_payload: bytes = b""
    ca_file: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)  # from a file (read_password_file), never argv
    insecure_plaintext: bool = False  # allow credentials over mqtt:// to a host that is not loopback
    keepalive_s: int = 30
    session_expiry_s: int = 600
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    timeout_s: float = 10.0
    reconnect_min_s: float = 0.2
    reconnect_max_s: float = 30.0
    inbox: InboxLimits = field(default_factory=InboxLimits)


class MqttLink:
    """One MQTT connection with automatic reconnection; thread-safe to publish from one thread.

    It runs its own network thread, or shares a :class:`edge_runtime.mqtt_loop.LinkLoop` with other
    links (a device host's devices): the session is the same either way.
    """

    def __init__(self, url: str, config: LinkConfig, loop: LinkLoop | None = None) -> None:
        self.address = BrokerAddress.parse(url)
        self.config = config
        _check_plaintext(self.address, config)  # before any connect: a refused password never leaves
        self.protocol = self.address.protocol or "5"  # the version spoken now
        self._downgrade = False  # set when MQTT 5 was refused and the URL did not pin it
        self.inbox = Inbox(config.inbox)
        self.bytes_sent = 0
        self.bytes_received = 0
        self.connections = 0  # successful CONNACKs so far: a change means "reconnected"
        self._filters: list[str] = []
        self._on_connect_hooks: list[Callable[[], None]] = []
        self._on_message_hooks: list[Callable[[], None]] = []
        self._before_connect_hooks: list[Callable[[], None]] = []
        self._connected = threading.Event()
        self._stop = threading.Event()
        self.loop = loop
        self.closed = threading.Event()  # set by a shared loop once it has let go of this link
        self._lock = threading.Lock()
        self._subacks = threading.Condition()
        self._acked: set[int] = set()  # SUBACKed message ids not yet collected by subscribe()
        self._client = self._make_client()

    def _make_client(self) -> paho.Client:
        cfg = self.config
        session = {} if self.protocol == "5" else {"clean_session": False}  # 5: clean_start at connect
        client = paho.Client(
            paho.CallbackAPIVersion.VERSION2, client_id=cfg.client_id, protocol=PROTOCOLS[self.protocol],
            reconnect_on_failure=False,  # our own loop reconnects, with jitter
            **session,
        )
        if cfg.username is not None:
            client.username_pw_set(cfg.username, cfg.password)
        elif cfg.password is not None:
            raise ValueError("an MQTT password needs a username")
        if self.address.tls:
            client.tls_set(ca_certs=cfg.ca_file, cert_reqs=ssl.CERT_REQUIRED, ciphers=TLS12_CIPHERS)
        if cfg.will_topic is not None:
            client.will_set(cfg.will_topic, cfg.will_payload, qos=QOS, retain=True)
        client.on_socket_open = _set_nodelay
        client.on_socket_register_write = _network_thread_writes
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        return client

    # -- lifecycle ---------------------------------------------------------------------------

    def on_connect(self, hook: Callable[[], None]) -> None:
        """Call ``hook`` (from the network thread) after every successful (re)connect."""
        self._on_connect_hooks.append(hook)

    def on_message(self, hook: Callable[[], None]) -> None:
        """Call ``hook`` (from the network thread) after each publish lands in the inbox."""
        self._on_message_hooks.append(hook)

    def before_connect(self, hook: Callable[[], None]) -> None:
        """Call ``hook`` (from the network thread) before every connect attempt (e.g. to :meth:`set_will`)."""
        self._before_connect_hooks.append(hook)

    def set_will(self, payload: bytes) -> None:
        """Replace the last will's payload; it takes effect at the next connect (call it from a
        :meth:`before_connect` hook so that every connection registers its own)."""
        if self.config.will_topic is None:
            raise ValueError("this link has no will topic")
        self._client.will_set(self.config.will_topic, payload, qos=QOS, retain=True)

    def start(self, timeout_s: float | None = None, *, wait: bool = True) -> None:
        """Connect and keep connected in the background; TransportError if the first connect times
        out (``wait=False``: return at once, the connection comes when it comes)."""
        if self.loop is not None:
            self.loop.add(self)
        else:
            self._thread = threading.Thread(target=self._run, name=f"mqtt-{self.config.client_id}", daemon=True)
            self._thread.start()
        if wait:
            self.wait_connected(timeout_s)

    def wait_connected(self, timeout_s: float | None = None) -> None:
        """Block until connected; TransportError after ``timeout_s``."""
        if not self._connected.wait(self.config.timeout_s if timeout_s is None else timeout_s):
            raise TransportError(f"no connection to {self.address.host}:{self.address.port}")

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def close(self, final: tuple[str, bytes] | None = None, *, wait: bool = True) -> None:
        """Optionally publish ``final`` (topic, payload; retained), then disconnect cleanly.

        ``wait=False`` (a link on a shared loop): queue ``final`` and the DISCONNECT, which the loop
        writes in that order, and return at once; ``closed`` is set once they are written. A host
        closes thousands of links this way in one pass of its loop instead of one pass each.
        """
        if final is not None and self.connected:
            try:
                if wait or self.loop is None:
                    self.publish(final[0], final[1], retain=True)
                else:
                    self.publish_nowait(final[0], final[1], retain=True)
            except TransportError as exc:
                log.warning("final publish failed: %s", exc)
        self._client.disconnect()  # queued; the network thread writes it before it stops
        self._stop.set()
        if self.loop is not None:
            self.loop.remove(self)
            if wait:
                self.closed.wait(self.config.timeout_s)
        elif hasattr(self, "_thread"):
            self._thread.join(self.config.timeout_s)

    def _run(self) -> None:
        """Connect, serve, and on loss reconnect after exponential backoff with full jitter."""
        delay = self.config.reconnect_min_s
        while not self._stop.is_set():
            try:
                self._connect_once()
            except (OSError, ssl.SSLError) as exc:
                log.info("connect to %s:%s failed: %s", self.address.host, self.address.port, exc)
            else:
                while not self._stop.is_set() and not self._downgrade:
                    rc = self._client.loop(timeout=0.2)
                    if rc != paho.MQTT_ERR_SUCCESS:
                        break
                if self._stop.is_set():
                    self._client.loop_write()  # what close() queued (DISCONNECT) before setting _stop
                if self.connections:
                    delay = self.config.reconnect_min_s
            self._connected.clear()
            if self._stop.is_set():
                break
            if self._downgrade:
                self._fall_back_to_311()
                continue
            pause = random.uniform(self.config.reconnect_min_s, delay)
            log.info("reconnecting in %.2f s", pause)
            self._stop.wait(pause)
            delay = min(self.config.reconnect_max_s, delay * 2)

    # -- what a shared LinkLoop calls (its thread) ----------------------------------------------

    @property
    def client(self) -> paho.Client:
        return self._client

    def connect_once(self) -> None:
        """One connect attempt (the CONNECT is queued for the loop to write)."""
        self._connect_once()

    def take_downgrade(self) -> bool:
        """Rebuild the client as MQTT 3.1.1 if the broker refused MQTT 5; True if it did."""
        if not self._downgrade:
            return False
        self._fall_back_to_311()
        return True

    def needs_reconnect(self) -> bool:
        """The broker refused MQTT 5 on this connection: reconnect with 3.1.1."""
        return self._downgrade

    def mark_disconnected(self) -> None:
        self._connected.clear()

    def _wake(self) -> None:
        """A packet was queued from another thread: have the shared loop write it now."""
        if self.loop is not None:
            self.loop.wake(self)

    def _connect_once(self) -> None:
        for hook in self._before_connect_hooks:
            hook()
        if self.protocol == "3.1.1":
            self._client.connect(self.address.host, self.address.port, keepalive=self.config.keepalive_s)
            return
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.config.session_expiry_s
        self._client.connect(
            self.address.host, self.address.port, keepalive=self.config.keepalive_s,
            clean_start=False, properties=props,
        )

    def _fall_back_to_311(self) -> None:
        """Drop the refused MQTT 5 client and build a 3.1.1 one (network thread, while disconnected)."""
        old = self._client
        sock = old.socket()
        if sock is not None:
            sock.close()
        self.protocol, self._downgrade = "3.1.1", False
        self._client = self._make_client()
        log.warning("%s:%s refused MQTT 5; speaking MQTT 3.1.1 from now on", self.address.host, self.address.port)

    # -- paho callbacks (network thread) -----------------------------------------------------

    def _on_connect(self, client: paho.Client, userdata: object, flags: object, reason: object, props: object) -> None:
        if getattr(reason, "is_failure", False):
            if (getattr(reason, "value", None) == UNSUPPORTED_PROTOCOL_VERSION
                    and self.address.protocol is None and self.protocol == "5"):
                self._downgrade = True  # _run rebuilds the client as 3.1.1 and reconnects at once
                return
            log.warning("broker refused the connection: %s", reason)
            return
        for topic in self._filters:
            client.subscribe(topic, qos=QOS)
        self.connections += 1
        self._connected.set()
        log.info("connected to %s:%s (connection %d)", self.address.host, self.address.port, self.connections)
        for hook in self._on_connect_hooks:
            hook()

    def _on_disconnect(self, client: paho.Client, userdata: object, flags: object, reason: object, props: object) -> None:
        self._connected.clear()
        log.info("disconnected: %s", reason)

    def _on_message(self, client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        with self._lock:
            self.bytes_received += len(msg.payload)
        self.inbox.put(Incoming(msg.topic, bytes(msg.payload), bool(msg.retain)))
        for hook in self._on_message_hooks:
            hook()

    def _on_subscribe(self, client: paho.Client, userdata: object, mid: int, reasons: object, props: object) -> None:
        with self._subacks:
            self._acked.add(mid)
            self._subacks.notify_all()

    # -- use ---------------------------------------------------------------------------------

    def subscribe(self, filters: Iterable[str], *, timeout_s: float | None = None) -> None:
        """Subscribe (QoS 1) now and after every reconnect. With ``timeout_s``, return only once the
        broker acknowledged the subscription (messages published afterwards will arrive);
        TransportError when it did not within ``timeout_s`` or the link is down."""
        filters = list(filters)
        self._filters.extend(filters)
        if not filters or not self.connected:
            self._wake()
            if timeout_s is not None and filters:
                raise TransportError(f"cannot subscribe to {filters[0]}: not connected")
            return
        _, mid = self._client.subscribe([(topic, QOS) for topic in filters])
        self._wake()
        if timeout_s is None:
            return
        with self._subacks:
            if not self._subacks.wait_for(lambda: mid in self._acked, timeout_s):
                raise TransportError(f"the broker did not acknowledge the subscription to {filters[0]} "
                                     f"within {timeout_s:g} s")
            self._acked.discard(mid)

    def unsubscribe(self, filters: Iterable[str]) -> None:
        """Stop receiving ``filters`` (and do not subscribe to them again after a reconnect)."""
        filters = [topic for topic in filters if topic in self._filters]
        for topic in filters:
            self._filters.remove(topic)
        if filters and self.connected:
            self._client.unsubscribe(filters)
            self._wake()

    def publish_nowait(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Queue a QoS 1 publish without waiting (safe inside an on_connect hook)."""
        self._client.publish(topic, payload, qos=QOS, retain=retain)
        self._wake()
        with self._lock:
            self.bytes_sent += len(payload)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False, timeout_s: float | None = None) -> None:
        """Publish one frame at QoS 1 and wait for its PUBACK; TransportError on timeout or loss."""
        self._publish_all(topic, [payload], retain=retain, timeout_s=timeout_s)

    def send(self, topic: str, message: Message, *, retain: bool = False, timeout_s: float | None = None,
             pace: Callable[[int], object] | None = None, signer: SigningKey | None = None) -> int:
        """Encode (chunked to ``max_frame_bytes``, signed by ``signer`` when given) and publish
        ``message``; returns bytes sent.

        Every frame is handed to the client before any PUBACK is awaited (a chunked message
        costs one round trip, not one per chunk). ``pace(nbytes)``, when given, is called
        before each frame and may block (link emulation).
        """
        frames = split(message, self.config.max_frame_bytes, signer)
        self._publish_all(topic, frames, retain=retain, timeout_s=timeout_s, pace=pace)
        return sum(len(f) for f in frames)

    def _publish_all(self, topic: str, frames: list[bytes], *, retain: bool, timeout_s: float | None,
                     pace: Callable[[int], object] | None = None) -> None:
        """Publish ``frames`` at QoS 1, then wait until all are PUBACKed; TransportError on timeout or loss."""
        timeout_s = self.config.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        self.wait_connected(timeout_s)
        generation = self.connections
        pending = []
        for frame in frames:
            if pace is not None:
                pace(len(frame))
            pending.append(self._client.publish(topic, frame, qos=QOS, retain=retain))
            self._wake()
        for info in pending:
            while not info.is_published():
                if self.connections != generation or not self.connected:
                    raise TransportError(f"connection lost while publishing to {topic}")
                if time.monotonic() > deadline:
                    raise TransportError(f"no PUBACK for {topic} within {timeout_s:.1f} s")
                try:
                    info.wait_for_publish(0.02)  # wakes on the PUBACK, re-checks the link otherwise
                except (RuntimeError, ValueError) as exc:
                    raise TransportError(f"publish to {topic} failed: {exc}") from None
        with self._lock:
            self.bytes_sent += sum(len(f) for f in frames)

    def get(self, timeout_s: float) -> Incoming | None:
        """The next received publish, or None after ``timeout_s``."""
        return self.inbox.get(timeout_s)


def _protocol_from_query(url: str, query: str) -> str | None:
    """The ``protocol`` of a broker URL's query (``5`` or ``3.1.1``), None without a query."""
    if not query:
        return None
    key, _, value = query.partition("=")
    if key != "protocol" or value not in PROTOCOLS:
        raise ValueError(f"broker URL query must be protocol=5 or protocol=3.1.1, got {url!r}")
    return value


def is_loopback(host: str) -> bool:
    """``localhost``, 127.0.0.0/8 or ::1 (an IPv4-mapped loopback too): a broker on this machine."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def plaintext_problem(address: BrokerAddress, given: Iterable[str], *, insecure: bool = False,
                      opt_in: str = INSECURE_OPT_IN) -> str | None:
    """Why the credentials or CA file named in ``given`` must not be used with ``address``; None when
    they may (TLS, a loopback host, nothing given, or the ``insecure`` opt-in)."""
    given = list(given)
    if address.tls or insecure or not given or is_loopback(address.host):
        return None
    return (f"{' and '.join(given)} given for the plaintext broker URL mqtt://{address.host}:{address.port}: "
            "MQTT without TLS sends the username and password in the clear, and ignores a CA file; "
            f"use mqtts:// (TLS), or {opt_in} on a network you trust")


def _check_plaintext(address: BrokerAddress, config: LinkConfig) -> None:
    """PlaintextSecretsError per :func:`plaintext_problem`; a warning for a CA file that mqtt:// ignores."""
    given = [name for name in ("username", "password", "ca_file") if getattr(config, name) is not None]
    problem = plaintext_problem(address, given, insecure=config.insecure_plaintext)
    if problem is not None:
        raise PlaintextSecretsError(problem)
    if config.ca_file is not None and not address.tls:
        log.warning("ca_file %s is ignored: mqtt://%s:%s does not use TLS (mqtts:// does)",
                    config.ca_file, address.host, address.port)


def read_password_file(path: str | Path) -> str:
    """The first line of ``path`` (without its line break); ValueError when missing or empty."""
    try:
        with open(path, encoding="utf-8") as f:
            line = f.readline().rstrip("\r\n")
    except OSError as exc:
        raise ValueError(f"cannot read the MQTT password file {path}: {exc.strerror or exc}") from None
    if not line:
        raise ValueError(f"the MQTT password file {path} has an empty first line")
    return line


def _network_thread_writes(client: paho.Client, userdata: object, sock: object) -> None:
    """paho's write hook: leave queued packets to the network thread (``MqttLink._run``).

    Without a hook paho writes a publish from the caller's thread while the network thread may be
    reading; two threads in one TLS connection corrupt its records (the broker drops the client:
    "decryption failed or bad record mac"). paho's socket pair wakes the loop, which writes them.
    """


def _set_nodelay(client: paho.Client, userdata: object, sock: object) -> None:
    """Disable Nagle (docs/protocol.md 1.3): a QoS 1 exchange stalls 40-90 ms without it."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # type: ignore[union-attr]
    except (OSError, AttributeError) as exc:
        log.warning("could not set TCP_NODELAY: %s", exc)
