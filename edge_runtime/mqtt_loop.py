"""One network thread for many MQTT links: how a device host keeps 1,000 sessions without 1,000 threads.

A :class:`LinkLoop` drives paho's external-loop API for every :class:`edge_runtime.mqtt.MqttLink`
given to it: one ``poll`` over their sockets (and a wake-up socket), ``loop_read`` on what is
readable, ``loop_write`` on what has packets queued, ``loop_misc`` once a second for keepalives.
Each link keeps everything that makes it a real client (its own connection, client id,
credentials, last will, persistent session, inbox); only the thread is shared. Connecting links
are spread over ``stagger_s`` so that a fleet does not stampede the broker, and a lost link
reconnects after exponential backoff with full jitter, as a link with its own thread does.
"""

from __future__ import annotations

import logging
import random
import select
import socket
import ssl
import threading
import time
from typing import TYPE_CHECKING

import paho.mqtt.client as paho

if TYPE_CHECKING:
    from edge_runtime.mqtt import MqttLink

log = logging.getLogger(__name__)
SELECT_TIMEOUT_S = 0.2  # poll timeout
MISC_EVERY_S = 1.0
MAX_CONNECTS_PER_PASS = 64  # connect attempts per pass, so reads and writes are never starved


class LinkLoop:
    """The shared network thread of many links (module docstring); ``close()`` stops it."""

    def __init__(self, *, stagger_s: float = 0.0, name: str = "mqtt-loop") -> None:
        self.stagger_s = stagger_s
        self._links: dict[int, MqttLink] = {}
        self._next_attempt: dict[int, float] = {}  # link id -> when to (re)connect; absent: connected
        self._delay: dict[int, float] = {}
        self._closing: set[int] = set()
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)  # never block a caller (or the loop itself) on a full buffer
        self._poller = select.poll()
        self._registered: dict[int, tuple[int, int]] = {}  # fd -> (link id, event mask) as registered
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def __len__(self) -> int:
        return len(self._links)

    def add(self, link: MqttLink) -> None:
        """Start connecting ``link`` (within ``stagger_s``) and keep it connected."""
        with self._lock:
            key = id(link)
            self._links[key] = link
            self._delay[key] = link.config.reconnect_min_s
            self._next_attempt[key] = time.monotonic() + random.uniform(0.0, self.stagger_s)
        self.wake()

    def remove(self, link: MqttLink) -> None:
        """Write what ``link`` queued (its DISCONNECT) and forget it."""
        with self._lock:
            self._closing.add(id(link))
        self.wake()

    def wake(self) -> None:
        """Interrupt the poll: a link has packets to write, or was added or removed."""
        if threading.current_thread() is self._thread:
            return  # the loop looks at every link before it polls again
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # a full wake-up buffer already wakes it

    def close(self) -> None:
        self._stop.set()
        self.wake()
        self._thread.join(10.0)
        self._wake_r.close()
        self._wake_w.close()

    # -- the thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        last_misc = 0.0
        while not self._stop.is_set():
            self._finish_closing()
            self._connect_due()
            self._serve_sockets()
            now = time.monotonic()
            if now - last_misc >= MISC_EVERY_S:
                last_misc = now
                for key, link in list(self._links.items()):
                    if key not in self._next_attempt and link.client.loop_misc() != paho.MQTT_ERR_SUCCESS:
                        self._lost(key, link)

    def _connect_due(self) -> None:
        now = time.monotonic()
        with self._lock:
            due = [k for k, at in self._next_attempt.items() if at <= now][:MAX_CONNECTS_PER_PASS]
        for key in due:
            link = self._links[key]
            if link.take_downgrade():
                pass  # rebuilt as MQTT 3.1.1: connect at once
            try:
                link.connect_once()
            except (OSError, ssl.SSLError) as exc:
                log.info("connect of %s failed: %s", link.config.client_id, exc)
                self._schedule(key)
                continue
            with self._lock:
                self._next_attempt.pop(key, None)

    def _schedule(self, key: int) -> None:
        """Reconnect after a jittered, doubling delay (reset once a connection succeeds)."""
        link = self._links[key]
        delay = self._delay[key]
        with self._lock:
            self._next_attempt[key] = time.monotonic() + random.uniform(link.config.reconnect_min_s, delay)
            self._delay[key] = min(link.config.reconnect_max_s, delay * 2)

    def _lost(self, key: int, link: MqttLink) -> None:
        link.mark_disconnected()
        if link.connections:
            self._delay[key] = link.config.reconnect_min_s
        self._schedule(key)

    def _serve_sockets(self) -> None:
        """One poll over every connected link's socket (poll, not select: no 1,024-descriptor cap)."""
        wanted: dict[int, tuple[int, int]] = {self._wake_r.fileno(): (-1, select.POLLIN)}
        for key, link in list(self._links.items()):
            sock = link.client.socket() if key not in self._next_attempt else None
            if sock is not None:
                wanted[sock.fileno()] = (key, select.POLLIN | (select.POLLOUT if link.client.want_write() else 0))
        for fd in set(self._registered) - set(wanted):
            self._poller.unregister(fd)
            del self._registered[fd]
        for fd, entry in wanted.items():
            if self._registered.get(fd) != entry:
                self._poller.register(fd, entry[1])  # registering again modifies the mask
                self._registered[fd] = entry
        try:
            events = self._poller.poll(SELECT_TIMEOUT_S * 1000)
        except OSError:
            events = []
        for fd, event in events:
            key = self._registered[fd][0]
            if key < 0:
                self._drain_wake()
            elif key in self._links and key not in self._next_attempt:
                self._serve_events(key, self._links[key], event)
        for key, link in list(self._links.items()):
            if key not in self._next_attempt and link.needs_reconnect():
                self._lost(key, link)

    def _serve_events(self, key: int, link: MqttLink, event: int) -> None:
        if event & (select.POLLIN | select.POLLERR | select.POLLHUP):
            if link.client.loop_read() != paho.MQTT_ERR_SUCCESS:
                self._lost(key, link)
                return
        if event & select.POLLOUT and link.client.loop_write() != paho.MQTT_ERR_SUCCESS:
            self._lost(key, link)

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _finish_closing(self) -> None:
        with self._lock:
            closing, self._closing = self._closing, set()
        for key in closing:
            link = self._links.pop(key, None)
            if link is None:
                continue
            if key not in self._next_attempt:
                link.client.loop_write()  # the DISCONNECT close() queued
            self._next_attempt.pop(key, None)
            self._delay.pop(key, None)
            link.mark_disconnected()
            link.closed.set()
