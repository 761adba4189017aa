"""One network thread for many MQTT links: how a device host keeps 1,000 sessions without 1,000 threads.

A :class:`LinkLoop` drives paho's external-loop API for every :class:`edge_runtime.mqtt.MqttLink`
given to it: one ``poll`` over their sockets (and a wake-up socket), ``loop_read`` on what is
readable, ``loop_write`` on what has packets queued, ``loop_misc`` once a second for keepalives.
A pass costs what happened since the last one, not the number of links: a link that queued a
packet names itself in :meth:`LinkLoop.wake`, a link that was read is looked at again, and only
once a second (with the keepalives) is every link's poll registration checked. A host's idle
devices therefore cost its busy ones no time per message.
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
        self._registered: dict[int, tuple[int, int]] = {}  # link id -> (fd, event mask) as registered
        self._fd_link: dict[int, int] = {self._wake_r.fileno(): -1}  # fd -> link id (-1: the wake-up socket)
        self._poller.register(self._wake_r.fileno(), select.POLLIN)
        self._dirty: set[int] = set()  # links whose registration may have changed since the last pass
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

    def wake(self, link: MqttLink | None = None) -> None:
        """Interrupt the poll: ``link`` has packets to write (or a link was added or removed)."""
        if link is not None:
            with self._lock:
                self._dirty.add(id(link))
        if threading.current_thread() is self._thread:
            return  # the loop looks at the links marked dirty before it polls again
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
            now = time.monotonic()
            if now - last_misc >= MISC_EVERY_S:
                last_misc = now
                for key, link in list(self._links.items()):
                    if key not in self._next_attempt and link.client.loop_misc() != paho.MQTT_ERR_SUCCESS:
                        self._lost(key, link)
                    elif key not in self._next_attempt and link.needs_reconnect():
                        self._lost(key, link)
                self._reconcile(set(self._links) | set(self._registered))  # keepalives queued PINGREQs
            self._serve_sockets()

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
                self._dirty.add(key)  # a new socket, with the CONNECT to write

    def _schedule(self, key: int) -> None:
        """Reconnect after a jittered, doubling delay (reset once a connection succeeds)."""
        link = self._links[key]
        delay = self._delay[key]
        with self._lock:
            self._next_attempt[key] = time.monotonic() + random.uniform(link.config.reconnect_min_s, delay)
            self._delay[key] = min(link.config.reconnect_max_s, delay * 2)

    def _lost(self, key: int, link: MqttLink) -> None:
        self._unregister(key)
        link.mark_disconnected()
        if link.connections:
            self._delay[key] = link.config.reconnect_min_s
        self._schedule(key)

    def _serve_sockets(self) -> None:
        """One poll over the registered sockets (poll, not select: no 1,024-descriptor cap), after
        bringing up to date the registrations of the links marked dirty."""
        with self._lock:
            dirty, self._dirty = self._dirty, set()
        self._reconcile(dirty)
        try:
            events = self._poller.poll(SELECT_TIMEOUT_S * 1000)
        except OSError:
            events = []
        served = set()
        for fd, event in events:
            key = self._fd_link.get(fd)
            if key is None:
                continue
            if key < 0:
                self._drain_wake()
            elif key in self._links and key not in self._next_attempt:
                self._serve_events(key, self._links[key], event)
                served.add(key)
        for key in served:  # a read may have queued acknowledgements, a write may have emptied the queue
            link = self._links.get(key)
            if link is not None and key not in self._next_attempt and link.needs_reconnect():
                self._lost(key, link)
        self._reconcile(served)

    def _reconcile(self, keys: set[int]) -> None:
        """Register each link of ``keys`` for what it waits for now: reads while connected, writes
        while paho has packets queued; unregister closed and forgotten ones."""
        for key in keys:
            link = self._links.get(key)
            sock = link.client.socket() if link is not None and key not in self._next_attempt else None
            if sock is None:
                self._unregister(key)
                continue
            entry = (sock.fileno(), select.POLLIN | (select.POLLOUT if link.client.want_write() else 0))
            if self._registered.get(key) == entry:
                continue
            self._unregister(key)
            self._poller.register(entry[0], entry[1])  # registering a known fd again modifies its mask
            self._registered[key] = entry
            self._fd_link[entry[0]] = key

    def _unregister(self, key: int) -> None:
        entry = self._registered.pop(key, None)
        if entry is not None and self._fd_link.get(entry[0]) == key:
            del self._fd_link[entry[0]]
            try:
                self._poller.unregister(entry[0])
            except (KeyError, ValueError):
                pass

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
            self._unregister(key)
            if link is None:
                continue
            if key not in self._next_attempt:
                link.client.loop_write()  # the DISCONNECT close() queued
            self._next_attempt.pop(key, None)
            self._delay.pop(key, None)
            link.mark_disconnected()
            link.closed.set()
