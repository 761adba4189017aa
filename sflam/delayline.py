"""Per-device delay, jitter and loss for ``sflam simulate --network netem``: kernel packet queues
(NFQUEUE) whose verdicts this process hands out late.

A kernel without ``sch_netem`` (this project's CI machine has none) still has netfilter queues, so
the delay of a kernel-shaped link (docs/simulate.md, "Kernel links") is made that way: iptables
rules (written by :mod:`sflam.netem`) park each packet of a device's link in a queue at the
*receiving* end's input hook, and this daemon accepts it ``delay +- jitter`` after it arrived,
or drops it with probability ``loss``:

- the downlink: in each device's namespace, everything that comes in on its link goes to the
  namespace's queue 0 (one netlink socket per namespace, opened inside it);
- the uplink: in the broker's namespace, everything that comes in on the run's bridge goes to the
  run's queue (its number is the run's tag), and the packet's source address (the first 20 bytes,
  the IPv4 header, are copied up) says which device sent it.

Queuing at the receiver, never at the sender's output, matters: a packet parked at the sender
still counts against its socket's TCP small queues, which would throttle TCP to a couple of
packets per delay. Packets never leave the kernel: TCP on both ends sees the real round-trip
time and the real losses and does its own retransmissions.

Per device and direction, packets leave in the order they came (a radio link does not reorder):
a packet is released at max(arrival + delay + U(-jitter, jitter), the previous one's release).

``python -m sflam.delayline --links FILE`` (FILE: JSON ``{"seed": S, "uplink_queue": Q, "links":
{"<namespace>": {"address": "10.x.y.z", "delay_ms": .., "jitter_ms": .., "loss": ..}}}``) binds
every queue, prints ``delayline: ready`` and serves until SIGTERM or SIGINT, then prints its
``delayline-summary`` (packets accepted and dropped per device and direction). The protocol is
``linux/netfilter/nfnetlink_queue.h``; standard library only.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import heapq
import json
import os
import random
import select
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET, NFQNL_MSG_VERDICT, NFQNL_MSG_CONFIG = 0, 1, 2
NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN = 1, 2, 3
NFQNL_CFG_CMD_BIND, NFQNL_CFG_CMD_UNBIND = 1, 2
NFQNL_COPY_META, NFQNL_COPY_PACKET = 1, 2
IPV4_HEADER_BYTES = 20  # the uplink queue reads the source address (bytes 12-16)
NFQA_PACKET_HDR, NFQA_VERDICT_HDR, NFQA_PAYLOAD = 1, 2, 10
NF_DROP, NF_ACCEPT = 0, 1
NF_INET_LOCAL_IN, NF_INET_LOCAL_OUT = 1, 3
NLM_F_REQUEST, NLM_F_ACK = 1, 4
NLMSG_ERROR = 2
CLONE_NEWNET = 0x40000000
QUEUE_MAXLEN = 65536  # packets parked at once; beyond it the kernel drops (as a full radio buffer)
RECV_BYTES = 1 << 20
UP, DOWN = "up", "down"


class DelayLineError(RuntimeError):
    """The kernel refused the queue (no NFQUEUE support, the queue bound by another process, not root)."""


@dataclass(frozen=True)
class LinkImpairment:
    """One device's one-way delay, jitter (uniform, milliseconds) and loss probability, per direction."""

    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss: float = 0.0

    def __post_init__(self) -> None:
        for name in ("delay_ms", "jitter_ms"):
            value = getattr(self, name)
            if not (0.0 <= value < 60_000.0):
                raise ValueError(f"{name} must be in [0, 60000) ms, got {value!r}")
        if self.jitter_ms > self.delay_ms:
            raise ValueError(f"jitter_ms ({self.jitter_ms}) must not exceed delay_ms ({self.delay_ms})")
        if not (0.0 <= self.loss < 1.0):
            raise ValueError(f"loss must be a probability in [0, 1), got {self.loss!r}")

    @property
    def active(self) -> bool:
        return self.delay_ms > 0 or self.loss > 0


def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def _message(msg: int, queue: int, attrs: bytes, flags: int = NLM_F_REQUEST, seq: int = 0) -> bytes:
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(queue)) + attrs
    return struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_QUEUE << 8) | msg, flags, seq, 0) + body


def config_messages(queue: int, copy_bytes: int = 0) -> list[bytes]:
    """Bind ``queue`` to this socket, copy the first ``copy_bytes`` of each packet (0: metadata
    only), allow QUEUE_MAXLEN parked packets."""
    bind = _attr(NFQA_CFG_CMD, struct.pack("=BxH", NFQNL_CFG_CMD_BIND, socket.htons(socket.AF_INET)))
    mode = struct.pack("!IB", copy_bytes, NFQNL_COPY_PACKET) if copy_bytes else struct.pack("!IB", 0, NFQNL_COPY_META)
    params = _attr(NFQA_CFG_PARAMS, mode)
    maxlen = _attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", QUEUE_MAXLEN))
    return [_message(NFQNL_MSG_CONFIG, queue, bind, NLM_F_REQUEST | NLM_F_ACK, 1),
            _message(NFQNL_MSG_CONFIG, queue, params + maxlen, NLM_F_REQUEST | NLM_F_ACK, 2)]


def verdict_message(queue: int, packet_id: int, verdict: int) -> bytes:
    return _message(NFQNL_MSG_VERDICT, queue, _attr(NFQA_VERDICT_HDR, struct.pack("!II", verdict, packet_id)))


def parse_messages(data: bytes) -> list[tuple[int, int, bytes] | int]:
    """Netlink messages -> (packet id, hook, copied bytes) for each queued packet, or the errno
    (negative, 0 for an ACK) of each NLMSG_ERROR."""
    out: list[tuple[int, int, bytes] | int] = []
    offset = 0
    while offset + 16 <= len(data):
        length, kind = struct.unpack_from("=IH", data, offset)
        if length < 16:
            break
        if kind == NLMSG_ERROR:
            out.append(struct.unpack_from("=i", data, offset + 16)[0])
        elif kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
            packet_id = hook = None
            payload = b""
            pos, end = offset + 20, offset + length  # after nlmsghdr (16) + nfgenmsg (4)
            while pos + 4 <= end:
                alen, atype = struct.unpack_from("=HH", data, pos)
                if alen < 4:
                    break
                value = data[pos + 4:pos + alen]
                atype &= 0x3FFF  # without the nested and byte-order flags
                if atype == NFQA_PACKET_HDR:
                    packet_id, _proto, hook = struct.unpack_from("!IHB", value)
                elif atype == NFQA_PAYLOAD:
                    payload = bytes(value)
                pos += (alen + 3) & ~3
            if packet_id is not None:
                out.append((packet_id, hook, payload))
        offset += (length + 3) & ~3
    return out


class LinkSchedule:
    """One device's link: its impairment, and when its next packet each way may leave."""

    def __init__(self, name: str, spec: LinkImpairment, seed: int = 0) -> None:
        self.name, self.spec = name, spec
        self.rng = random.Random(f"{seed}:{name}")
        self.last_release = {UP: 0.0, DOWN: 0.0}
        self.counters = {UP: {"accepted": 0, "dropped": 0}, DOWN: {"accepted": 0, "dropped": 0}}

    def schedule(self, direction: str, now: float) -> tuple[float, int]:
        """(release time, verdict) of one packet that entered the queue at ``now``."""
        spec, counts = self.spec, self.counters[direction]
        if spec.loss and self.rng.random() < spec.loss:
            counts["dropped"] += 1
            return now, NF_DROP
        delay = spec.delay_ms + (self.rng.uniform(-spec.jitter_ms, spec.jitter_ms) if spec.jitter_ms else 0.0)
        release = max(now + delay / 1000.0, self.last_release[direction])
        self.last_release[direction] = release
        counts["accepted"] += 1
        return release, NF_ACCEPT

    def summary(self) -> dict:
        """Packets accepted and dropped, in all and per direction."""
        both = {k: self.counters[UP][k] + self.counters[DOWN][k] for k in ("accepted", "dropped")}
        return {**both, UP: dict(self.counters[UP]), DOWN: dict(self.counters[DOWN])}


Route = Callable[[bytes], LinkSchedule | None]


class DelayQueue:
    """One NFQUEUE: a netlink socket bound to queue ``queue`` in the namespace it was opened in.
    ``route`` maps a packet (its first ``copy_bytes``) to the link it belongs to; ``direction``
    is the way its packets go (the queue sits at the receiving end's input hook)."""

    def __init__(self, name: str, queue: int, direction: str, route: Route, copy_bytes: int = 0) -> None:
        self.name, self.queue, self.direction, self.route, self.copy_bytes = name, queue, direction, route, copy_bytes
        self.unknown = 0
        self.sock: socket.socket | None = None

    def open(self) -> None:
        """Bind the queue, in the namespace this thread is in now (see :func:`in_namespace`)."""
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            sock.bind((0, 0))
            for message in config_messages(self.queue, self.copy_bytes):
                sock.send(message)
                errors = [e for e in parse_messages(sock.recv(RECV_BYTES)) if isinstance(e, int)]
                if errors and errors[0] != 0:
                    raise DelayLineError(f"{self.name}: binding NFQUEUE {self.queue}: {os.strerror(-errors[0])} "
                                         "(needs root, nfnetlink_queue, and the queue not bound elsewhere)")
        except BaseException:
            sock.close()
            raise
        self.sock = sock

    def schedule(self, header: bytes, now: float) -> tuple[float, int]:
        """(release time, verdict) of one queued packet; an unknown one passes at once."""
        link = self.route(header)
        if link is None:
            self.unknown += 1
            return now, NF_ACCEPT
        return link.schedule(self.direction, now)

    def verdict(self, packet_id: int, verdict: int) -> None:
        try:
            self.sock.send(verdict_message(self.queue, packet_id, verdict))
        except OSError as exc:
            print(f"delayline: {self.name}: verdict for packet {packet_id}: {exc}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def serve(queues: list[DelayQueue], stop, clock=time.monotonic) -> None:
    """Until ``stop()`` is true: read every queue's packets, hand out the verdicts that are due."""
    pending: list[tuple[float, int, int, int, int]] = []  # (release at, tie, queue index, packet id, verdict)
    by_fd = {queue.sock.fileno(): k for k, queue in enumerate(queues)}
    tie = 0
    while not stop():
        now = clock()
        while pending and pending[0][0] <= now:
            _, _, k, packet_id, verdict = heapq.heappop(pending)
            queues[k].verdict(packet_id, verdict)
        timeout = min(0.2, max(0.0, pending[0][0] - now)) if pending else 0.2
        ready, _, _ = select.select(list(by_fd), [], [], timeout)
        now = clock()
        for fd in ready:
            k = by_fd[fd]
            queue = queues[k]
            try:
                data = queue.sock.recv(RECV_BYTES)
            except OSError as exc:  # ENOBUFS: the kernel dropped queue messages; those packets are lost
                print(f"delayline: {queue.name}: {exc}", file=sys.stderr, flush=True)
                continue
            for item in parse_messages(data):
                if isinstance(item, int):
                    continue
                packet_id, _hook, header = item
                release, verdict = queue.schedule(header, now)
                if release <= now:
                    queue.verdict(packet_id, verdict)
                else:
                    tie += 1
                    heapq.heappush(pending, (release, tie, k, packet_id, verdict))
    for _, _, k, packet_id, verdict in sorted(pending):  # nothing stays parked
        queues[k].verdict(packet_id, verdict)


@contextlib.contextmanager
def in_namespace(name: str) -> Iterator[None]:
    """This thread in network namespace ``name`` (``/run/netns/NAME``) for the block, then back:
    a socket opened inside stays in that namespace."""
    libc = ctypes.CDLL(None, use_errno=True)
    own = os.open("/proc/self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            raise DelayLineError(f"entering network namespace {name}: {os.strerror(ctypes.get_errno())}")
        try:
            yield
        finally:
            if libc.setns(own, CLONE_NEWNET) != 0:
                raise DelayLineError(f"leaving network namespace {name}: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(target)
        os.close(own)


def load_links(path: Path) -> dict:
    """The links file (see the module docstring), its impairments checked."""
    data = json.loads(Path(path).read_text())
    for link in data["links"].values():
        LinkImpairment(**{k: link[k] for k in ("delay_ms", "jitter_ms", "loss")})
    return data


def build_queues(data: dict) -> tuple[list[DelayQueue], dict[str, LinkSchedule]]:
    """The queues of a links file, not yet open: one per device namespace (its downlink, at the
    device's input hook) and the uplink queue of this namespace (at the broker's input hook,
    packets told apart by their source address)."""
    seed = int(data.get("seed", 0))
    links = {name: LinkSchedule(name, LinkImpairment(link["delay_ms"], link["jitter_ms"], link["loss"]), seed)
             for name, link in data["links"].items()}
    queues = [DelayQueue(name, 0, DOWN, lambda _header, link=link: link) for name, link in links.items()]
    by_address = {socket.inet_aton(link["address"]): links[name] for name, link in data["links"].items()}
    queues.append(DelayQueue("uplink", int(data["uplink_queue"]), UP,
                             lambda header: by_address.get(header[12:16]), IPV4_HEADER_BYTES))
    return queues, links


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sflam.delayline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--links", type=Path, required=True, help="JSON: seed, uplink queue, each namespace's link")
    args = parser.parse_args(argv)
    queues, links = build_queues(load_links(args.links))
    stopping: list[bool] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.append(True))
    try:
        for queue in queues:
            if queue.direction == DOWN:
                with in_namespace(queue.name):
                    queue.open()
            else:
                queue.open()
    except (DelayLineError, OSError) as exc:
        print(f"delayline: {exc}", file=sys.stderr, flush=True)
        for queue in queues:
            queue.close()
        return 1
    print(f"delayline: ready, {len(links)} links", flush=True)
    try:
        serve(queues, lambda: bool(stopping))
    finally:
        for queue in queues:
            queue.close()
        summary = {name: link.summary() for name, link in links.items()}
        summary["unknown"] = sum(queue.unknown for queue in queues)
        print("delayline-summary " + json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
