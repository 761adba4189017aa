"""Kernel links (``sflam simulate --network netem``) without the kernel: the NFQUEUE netlink
messages of sflam.delayline and its delay/jitter/loss schedule, sflam.netem's topology commands,
run tags, leftovers, stale-run sweeping and flaps (on a fake ``ip``), the tc token bucket of
edge_runtime.link.ShapedUplink, the broker's extra listeners, and the option checks of --network.

No namespace, interface, qdisc or rule is made here: every command goes to a recording fake.
"""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from edge_runtime.link import ShapedUplink, ShapedUplinkError
from sflam import netem
from sflam.broker import AmqttBroker, MosquittoBroker, amqtt_config_text, config_text
from sflam.delayline import (
    NF_ACCEPT,
    NF_DROP,
    NF_INET_LOCAL_IN,
    NF_INET_LOCAL_OUT,
    NFNL_SUBSYS_QUEUE,
    NFQA_CFG_CMD,
    NFQA_CFG_PARAMS,
    NFQA_CFG_QUEUE_MAXLEN,
    NFQA_PACKET_HDR,
    NFQA_PAYLOAD,
    NFQA_VERDICT_HDR,
    NFQNL_CFG_CMD_BIND,
    NFQNL_COPY_META,
    NFQNL_MSG_CONFIG,
    NFQNL_MSG_PACKET,
    NFQNL_MSG_VERDICT,
    NLM_F_ACK,
    NLM_F_REQUEST,
    NLMSG_ERROR,
    QUEUE_MAXLEN,
    DOWN,
    IPV4_HEADER_BYTES,
    NFQNL_COPY_PACKET,
    UP,
    DelayQueue,
    LinkImpairment,
    LinkSchedule,
    build_queues,
    config_messages,
    load_links,
    parse_messages,
    verdict_message,
)
from sflam.netem import DeviceLink, Flap, NetemError, RunLinks, Topology, impairment_for, leftovers, sweep_stale
from sflam.options import SimulateError, build_options

# ---------------------------------------------------------------------------------------------
# helpers: netlink built and read independently of sflam.delayline, and a fake `ip`


def nlmsg(kind: int, body: bytes, flags: int = 0, seq: int = 0) -> bytes:
    return struct.pack("=IHHII", 16 + len(body), kind, flags, seq, 0) + body


def nlattr(kind: int, payload: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(payload), kind) + payload + b"\0" * (-(4 + len(payload)) % 4)


def read_attrs(data: bytes) -> list[tuple[int, bytes]]:
    out, pos = [], 0
    while pos + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, pos)
        out.append((kind, data[pos + 4:pos + length]))
        pos += (length + 3) & ~3
    return out


def packet_message(packet_id: int, hook: int, payload: bytes | None = None) -> bytes:
    """An NFQNL_MSG_PACKET as the kernel sends it: an unrelated (odd-length, nested-flagged)
    attribute first, then the packet header, optionally the payload."""
    attrs = nlattr(0x8000 | 9, b"\xaa\xbb\xcc\xdd\xee")  # NFQA_HWADDR-like, 5 bytes: 3 of padding
    attrs += nlattr(NFQA_PACKET_HDR, struct.pack("!IHB", packet_id, 0x0800, hook))
    if payload is not None:
        attrs += nlattr(NFQA_PAYLOAD, payload)
    nfgen = struct.pack("=BBH", socket.AF_INET, 0, socket.htons(0))
    return nlmsg((NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET, nfgen + attrs)


def error_message(errno: int) -> bytes:
    return nlmsg(NLMSG_ERROR, struct.pack("=i", errno) + nlmsg(0x302, b"\0" * 4)[:16], seq=1)


class FakeIp:
    """``run`` for Topology/leftovers/sweep_stale: records each argv, answers the queries with
    the configured outputs, fails the commands ``fail`` matches (exit 2, RTNETLINK's stderr)."""

    def __init__(self, addrs: str = "", routes: str = "", links: str = "", netns: str = "", fail=None,
                 rules: str = "-P INPUT ACCEPT\n") -> None:
        self.calls: list[list[str]] = []
        self.rules = rules
        self.addrs, self.routes, self.links, self.netns, self.fail = addrs, routes, links, netns, fail

    def __call__(self, cmd) -> subprocess.CompletedProcess:
        cmd = list(cmd)
        self.calls.append(cmd)
        if self.fail is not None and self.fail(cmd):
            return subprocess.CompletedProcess(cmd, 2, "", "RTNETLINK answers: Operation not permitted\n")
        out = {("ip", "-4", "-o", "addr"): self.addrs, ("ip", "-4", "route"): self.routes,
               ("ip", "-o", "link", "show"): self.links, ("ip", "netns", "list"): self.netns,
               ("iptables", "-w", "-S", "INPUT"): self.rules}.get(tuple(cmd), "")
        return subprocess.CompletedProcess(cmd, 0, out, "")

    def changes(self) -> list[list[str]]:
        """The calls that change something (not the five queries)."""
        queries = {("ip", "-4", "-o", "addr"), ("ip", "-4", "route"), ("ip", "-o", "link", "show"),
                   ("ip", "netns", "list"), ("iptables", "-w", "-S", "INPUT")}
        return [c for c in self.calls if tuple(c) not in queries]


def busy_200_to_253() -> FakeIp:
    """Every 10.200-253 /16 but 254 in use: half by addresses, half by routes."""
    addrs = "".join(f"{k}: eth{k}    inet 10.{b}.3.4/16 brd 10.{b}.255.255 scope global eth{k}\n"
                    for k, b in enumerate(range(200, 227)))
    routes = "default via 192.168.1.1 dev eth0\n" + "".join(f"10.{b}.0.0/16 via 192.168.1.7 dev eth0\n"
                                                            for b in range(227, 254))
    return FakeIp(addrs=addrs, routes=routes)


# ---------------------------------------------------------------------------------------------
# sflam.delayline: the netlink messages


def test_verdict_message_is_an_nfqueue_verdict_for_the_queue_and_packet() -> None:
    """nlmsghdr (length, subsystem/type, request flag), nfgenmsg with the queue big-endian, and
    NFQA_VERDICT_HDR holding (verdict, packet id) in network order."""
    msg = verdict_message(7, 0x01020304, NF_ACCEPT)
    length, kind, flags, seq, pid = struct.unpack_from("=IHHII", msg)
    assert length == len(msg) == 16 + 4 + 4 + 8
    assert kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_VERDICT == 0x301
    assert flags == NLM_F_REQUEST and (seq, pid) == (0, 0)
    family, version, res_id = struct.unpack_from("=BBH", msg, 16)
    assert (family, version) == (socket.AF_UNSPEC, 0)
    assert msg[18:20] == b"\x00\x07"  # the queue number, big-endian
    assert read_attrs(msg[20:]) == [(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT, 0x01020304))]
    dropped = verdict_message(300, 9, NF_DROP)
    assert dropped[18:20] == (300).to_bytes(2, "big")
    assert struct.unpack("!II", read_attrs(dropped[20:])[0][1]) == (NF_DROP, 9)


def test_config_messages_bind_the_queue_and_ask_for_acks() -> None:
    """Two NFQNL_MSG_CONFIG requests with NLM_F_ACK: the first binds (command BIND, family AF_INET),
    the second copies metadata only and sets the queue's maximum length."""
    first, second = config_messages(7)
    for seq, msg in enumerate((first, second), start=1):
        length, kind, flags, got_seq, _ = struct.unpack_from("=IHHII", msg)
        assert length == len(msg) and length % 4 == 0
        assert kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_CONFIG
        assert flags & NLM_F_ACK and flags & NLM_F_REQUEST
        assert got_seq == seq
        assert msg[18:20] == b"\x00\x07"
    (cmd_kind, cmd), = read_attrs(first[20:])
    assert cmd_kind == NFQA_CFG_CMD
    assert cmd[0] == NFQNL_CFG_CMD_BIND and cmd[2:4] == socket.AF_INET.to_bytes(2, "big")
    attrs = dict(read_attrs(second[20:]))
    assert struct.unpack("!IB", attrs[NFQA_CFG_PARAMS]) == (0, NFQNL_COPY_META)
    assert struct.unpack("!I", attrs[NFQA_CFG_QUEUE_MAXLEN]) == (QUEUE_MAXLEN,)
    _, second = config_messages(7, copy_bytes=20)  # the uplink queue reads the IPv4 header
    assert struct.unpack("!IB", dict(read_attrs(second[20:]))[NFQA_CFG_PARAMS]) == (20, NFQNL_COPY_PACKET)


def test_parse_messages_reads_packets_past_other_attributes() -> None:
    """The packet id and hook come from NFQA_PACKET_HDR wherever it sits; no payload attribute: b""."""
    assert parse_messages(packet_message(0xDEADBEEF, NF_INET_LOCAL_OUT)) == [(0xDEADBEEF, NF_INET_LOCAL_OUT, b"")]
    ip_header = b"\x45\x00\x00"
    assert parse_messages(packet_message(5, NF_INET_LOCAL_IN, ip_header)) == [(5, NF_INET_LOCAL_IN, ip_header)]


def test_parse_messages_returns_the_errno_of_acks_and_errors() -> None:
    """NLMSG_ERROR: 0 for an ACK, the negative errno for a refusal."""
    assert parse_messages(error_message(0)) == [0]
    assert parse_messages(error_message(-1)) == [-1]  # EPERM: not root


def test_parse_messages_reads_every_message_of_a_datagram() -> None:
    data = packet_message(1, NF_INET_LOCAL_OUT) + error_message(-16) + packet_message(2, NF_INET_LOCAL_IN)
    assert parse_messages(data) == [(1, NF_INET_LOCAL_OUT, b""), -16, (2, NF_INET_LOCAL_IN, b"")]
    assert parse_messages(data[:10]) == []  # a truncated header is no message
    assert parse_messages(b"\0" * 16) == []  # nor is a zero length (no endless loop)


# ---------------------------------------------------------------------------------------------
# sflam.delayline: impairments and the schedule


@pytest.mark.parametrize("args, needle", [
    ((-1.0, 0.0, 0.0), "delay_ms"),
    ((60_000.0, 0.0, 0.0), "delay_ms"),
    ((5.0, 6.0, 0.0), "jitter_ms"),
    ((5.0, 0.0, 1.0), "loss"),
    ((5.0, 0.0, -0.01), "loss"),
])
def test_link_impairment_rejects_impossible_values(args: tuple[float, float, float], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        LinkImpairment(*args)


def test_link_impairment_is_active_when_it_delays_or_drops() -> None:
    assert not LinkImpairment().active
    assert not LinkImpairment(0.0, 0.0, 0.0).active
    assert LinkImpairment(0.2).active
    assert LinkImpairment(0.0, 0.0, 0.01).active
    assert LinkImpairment(5.0, 5.0, 0.0).jitter_ms == 5.0  # jitter == delay is allowed


def test_schedule_without_jitter_or_loss_releases_after_the_delay() -> None:
    link = LinkSchedule("sflam-ab12-0", LinkImpairment(20.0))
    for now in (1.0, 1.001, 2.5):
        release, verdict = link.schedule(UP, now)
        assert verdict == NF_ACCEPT and release == pytest.approx(now + 0.020)
    assert link.summary() == {"accepted": 3, "dropped": 0, UP: {"accepted": 3, "dropped": 0},
                              DOWN: {"accepted": 0, "dropped": 0}}


def test_schedule_keeps_each_direction_in_order_under_jitter() -> None:
    """jitter == delay and packets 0.1 ms apart: without FIFO they would overtake each other."""
    link = LinkSchedule("sflam-ab12-0", LinkImpairment(10.0, 10.0), seed=3)
    releases: dict[str, list[float]] = {UP: [], DOWN: []}
    for k in range(2000):
        direction = UP if k % 3 else DOWN
        now = 10.0 + k * 1e-4
        release, verdict = link.schedule(direction, now)
        assert verdict == NF_ACCEPT
        assert now - 1e-12 <= release <= max(now + 0.020, max(releases[direction], default=0.0)) + 1e-12
        releases[direction].append(release)
    for direction, times in releases.items():
        assert times == sorted(times), direction
    # the jitter is real: not every packet waits exactly the delay
    waits = [r - (10.0 + k * 1e-4) for k, r in enumerate(releases[UP])]
    assert len({round(w, 6) for w in waits}) > 100


def test_schedule_tracks_up_and_down_apart() -> None:
    """A late uplink packet holds back later uplink packets only, never the downlink."""
    link = LinkSchedule("sflam-ab12-0", LinkImpairment(10.0))
    assert link.schedule(UP, 5.0)[0] == pytest.approx(5.010)
    assert link.schedule(DOWN, 1.0)[0] == pytest.approx(1.010)  # not behind the uplink's 5.01
    assert link.schedule(UP, 1.0)[0] == pytest.approx(5.010)  # behind the uplink's 5.01
    assert link.schedule(DOWN, 0.5)[0] == pytest.approx(1.010)  # behind the downlink's 1.01


def test_schedule_drops_at_the_loss_rate_deterministically_per_seed() -> None:
    def verdicts(seed: int, name: str = "sflam-ab12-0") -> list[int]:
        link = LinkSchedule(name, LinkImpairment(5.0, 0.0, 0.3), seed=seed)
        out = []
        for k in range(5000):
            release, verdict = link.schedule(UP, float(k))
            if verdict == NF_DROP:
                assert release == float(k)  # a dropped packet is not parked
            out.append(verdict)
        assert link.summary()["dropped"] == out.count(NF_DROP)
        return out

    first = verdicts(11)
    assert set(first) == {NF_ACCEPT, NF_DROP}
    assert 0.27 <= first.count(NF_DROP) / len(first) <= 0.33
    assert verdicts(11) == first
    assert verdicts(12) != first
    assert verdicts(11, "sflam-ab12-1") != first  # each device its own stream


def _links_file(path: Path, links: dict) -> Path:
    path.write_text(json.dumps({"seed": 9, "uplink_queue": 4660, "links": links}))
    return path


def test_the_links_file_gives_a_downlink_queue_per_namespace_and_one_uplink_queue(tmp_path: Path) -> None:
    """Downlink: each namespace's queue 0, metadata only. Uplink: the run's queue, the IPv4 header
    copied, the packet's source address naming the device; an unknown sender passes at once."""
    path = _links_file(tmp_path / "links.json", {
        "sflam-ab12-0": {"address": "10.201.0.2", "delay_ms": 15.0, "jitter_ms": 0.0, "loss": 0.0},
        "sflam-ab12-3": {"address": "10.201.0.5", "delay_ms": 300.0, "jitter_ms": 0.0, "loss": 0.0}})
    queues, links = build_queues(load_links(path))
    assert [(q.name, q.queue, q.direction, q.copy_bytes) for q in queues] == [
        ("sflam-ab12-0", 0, DOWN, 0), ("sflam-ab12-3", 0, DOWN, 0), ("uplink", 4660, UP, IPV4_HEADER_BYTES)]
    uplink = queues[-1]

    def header(source: str) -> bytes:
        return b"\x45\x00\x00\x3c" + b"\x00" * 8 + socket.inet_aton(source) + socket.inet_aton("10.201.0.1")

    assert uplink.schedule(header("10.201.0.5"), 1.0) == (pytest.approx(1.3), NF_ACCEPT)
    assert uplink.schedule(header("10.201.0.2"), 1.0) == (pytest.approx(1.015), NF_ACCEPT)
    assert uplink.schedule(header("10.9.9.9"), 1.0) == (1.0, NF_ACCEPT) and uplink.unknown == 1
    assert queues[1].schedule(b"", 2.0) == (pytest.approx(2.3), NF_ACCEPT)  # device 3's downlink
    assert links["sflam-ab12-3"].summary()[UP]["accepted"] == 1
    assert links["sflam-ab12-3"].summary()[DOWN]["accepted"] == 1


def test_load_links_checks_every_impairment(tmp_path: Path) -> None:
    path = _links_file(tmp_path / "links.json", {
        "n": {"address": "10.201.0.2", "delay_ms": 1.0, "jitter_ms": 2.0, "loss": 0.0}})
    with pytest.raises(ValueError, match="jitter_ms"):
        load_links(path)


def test_an_unopened_queue_has_no_socket() -> None:
    queue = DelayQueue("sflam-ab12-0", 0, DOWN, lambda header: None)
    assert queue.sock is None
    queue.close()  # a no-op


# ---------------------------------------------------------------------------------------------
# sflam.netem: impairments of radio kinds


def test_impairment_for_radio_defaults_and_overrides() -> None:
    assert impairment_for("wifi") == LinkImpairment(2.0, 1.0, 0.0)
    assert impairment_for("lte") == LinkImpairment(15.0, 5.0, 0.0)
    assert impairment_for("nb-iot") == LinkImpairment(300.0, 100.0, 0.0)
    assert impairment_for("zigbee") == impairment_for("wifi")  # unknown kind: wifi's
    assert impairment_for("lte", delay_ms=40) == LinkImpairment(40.0, 0.0, 0.0)  # a delay alone: no jitter
    assert impairment_for("lte", delay_ms=40, jitter_ms=3) == LinkImpairment(40.0, 3.0, 0.0)
    assert impairment_for("lte", jitter_ms=2) == LinkImpairment(15.0, 2.0, 0.0)
    assert impairment_for("nb-iot", loss=0.05) == LinkImpairment(300.0, 100.0, 0.05)
    assert impairment_for("ethernet", delay_ms=0, loss=0).active is False


# ---------------------------------------------------------------------------------------------
# sflam.netem: the topology on a fake `ip`


def test_open_reserves_a_tag_and_the_one_free_subnet(tmp_path: Path) -> None:
    run = busy_200_to_253()
    topo = Topology(run=run, state_dir=tmp_path)
    topo.open()
    assert re.fullmatch(r"[0-9a-f]{4}", topo.tag)
    assert topo.subnet == 254 and topo.broker_host == "10.254.0.1"
    state = json.loads((tmp_path / f"{topo.tag}.json").read_text())
    assert state == {"pid": os.getpid(), "subnet": 254, "made": [["link", f"sf{topo.tag}br"]]}
    assert run.changes() == [["ip", "link", "add", f"sf{topo.tag}br", "type", "bridge"],
                             ["ip", "addr", "add", "10.254.0.1/16", "dev", f"sf{topo.tag}br"],
                             ["ip", "link", "set", f"sf{topo.tag}br", "up"]]


def test_reserve_avoids_subnets_and_tags_of_other_runs(tmp_path: Path) -> None:
    """A live run's state file claims its subnet; a second run gets another tag and the last subnet."""
    run = busy_200_to_253()
    (tmp_path / "0001.json").write_text(json.dumps({"pid": os.getpid(), "subnet": 254, "made": []}))
    topo = Topology(run=run, state_dir=tmp_path)
    with pytest.raises(NetemError, match="every 10.200-254.0.0/16 subnet is in use"):
        topo.reserve()
    assert (tmp_path / "0001.json").exists()  # the live run's file is not swept
    assert topo.tag != "0001" and (tmp_path / f"{topo.tag}.json").exists()
    assert topo.close() == [] and sorted(p.name for p in tmp_path.iterdir()) == ["0001.json"]


class FixedTags:
    """random.SystemRandom stand-in: the run tags come from ``tags`` in turn, subnets the lowest free."""

    def __init__(self, tags: list[int]) -> None:
        self.tags = iter(tags)

    def __call__(self) -> FixedTags:
        return self

    def randrange(self, n: int) -> int:
        return next(self.tags)

    def choice(self, seq):
        return seq[0]


def test_reserve_never_takes_a_tag_whose_state_file_exists(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "0001.json").write_text(json.dumps({"pid": os.getpid(), "subnet": 200, "made": []}))
    monkeypatch.setattr(netem, "random", SimpleNamespace(SystemRandom=FixedTags([1, 1, 2])))
    topo = Topology(run=FakeIp(), state_dir=tmp_path)
    topo.reserve()
    assert (topo.tag, topo.subnet) == ("0002", 201)  # 200 is the live run's
    assert json.loads((tmp_path / "0001.json").read_text())["subnet"] == 200  # untouched
    monkeypatch.setattr(netem, "random", SimpleNamespace(SystemRandom=FixedTags([1] * 64)))
    with pytest.raises(NetemError, match="no free run tag"):
        Topology(run=FakeIp(), state_dir=tmp_path).reserve()


def test_add_devices_makes_namespaces_veths_qdiscs_and_queue_rules(tmp_path: Path) -> None:
    run = busy_200_to_253()
    topo = Topology(run=run, state_dir=tmp_path)
    topo.open()
    tag = topo.tag
    delayed = LinkImpairment(15.0, 5.0, 0.01)
    topo.add_devices(["dev-0", "dev-1"], [delayed, LinkImpairment()], 100e6, [1e6, 2e6])
    calls = run.changes()[3:]  # after the bridge's three
    ns0, ns1 = f"sflam-{tag}-0", f"sflam-{tag}-1"
    for k, ns in enumerate((ns0, ns1)):
        host_if, dev_if = f"sf{tag}h{k}", f"sf{tag}d{k}"
        assert len(host_if) <= 15 and len(dev_if) <= 15  # IFNAMSIZ
        assert ["ip", "netns", "add", ns] in calls
        assert ["ip", "link", "add", host_if, "type", "veth", "peer", "name", dev_if, "netns", ns] in calls
        assert ["ip", "link", "set", host_if, "master", f"sf{tag}br", "up"] in calls
        assert ["ip", "-n", ns, "addr", "add", f"10.254.0.{k + 2}/16", "dev", dev_if] in calls
        assert ["ip", "-n", ns, "link", "set", dev_if, "up"] in calls
        assert ["ip", "-n", ns, "link", "set", "lo", "up"] in calls
        assert ShapedUplink(host_if).tbf_args(100e6) in calls  # the downlink, on the bridge end
        up = ["ip", "netns", "exec", ns] + ShapedUplink(dev_if).tbf_args([1e6, 2e6][k])
        assert up in calls and f"{int([1e6, 2e6][k])}bit" in up
        assert calls.index(["ip", "netns", "add", ns]) < calls.index(up)
    rules = [c for c in calls if "iptables" in c]
    uplink_rule = ["INPUT", "-i", f"sf{tag}br", "-j", "NFQUEUE", "--queue-num", str(int(tag, 16))]
    assert rules == [  # each parked where it arrives: the downlink in the device, the uplink here
        ["ip", "netns", "exec", ns0, "iptables", "-w", "-A", "INPUT", "-i", f"sf{tag}d0",
         "-j", "NFQUEUE", "--queue-num", "0"],
        ["iptables", "-w", "-I", *uplink_rule]]
    assert [link.address for link in topo.links] == ["10.254.0.2", "10.254.0.3"]
    assert topo.device_command(1, ["sflam", "device"]) == ["ip", "netns", "exec", ns1, "sflam", "device"]
    assert topo.made == [["link", f"sf{tag}br"], ["netns", ns0], ["link", f"sf{tag}h0"],
                         ["netns", ns1], ["link", f"sf{tag}h1"], ["rule", *uplink_rule]]
    assert json.loads(topo.state_file.read_text())["made"] == topo.made
    # only the delayed device's namespace goes to the delay line
    assert load_links(topo.delayline_file(tmp_path / "links.json", 4)) == {
        "seed": 4, "uplink_queue": int(tag, 16),
        "links": {ns0: {"address": "10.254.0.2", "delay_ms": 15.0, "jitter_ms": 5.0, "loss": 0.01}}}
    summary = topo.summary()
    assert summary["subnet"] == "10.254.0.0/16" and summary["links"]["dev-1"]["address"] == "10.254.0.3"


def test_delayline_file_is_none_without_an_active_link(tmp_path: Path) -> None:
    topo = Topology(run=busy_200_to_253(), state_dir=tmp_path)
    topo.open()
    topo.add_devices(["dev-0"], [LinkImpairment()], 1e8, [1e6])
    assert topo.delayline_file(tmp_path / "links.json", 0) is None
    assert not (tmp_path / "links.json").exists()


def test_add_devices_checks_its_arguments(tmp_path: Path) -> None:
    topo = Topology(run=FakeIp(), state_dir=tmp_path, tag="ab12", subnet=201)
    with pytest.raises(ValueError, match="one impairment and one uplink rate per device"):
        topo.add_devices(["a", "b"], [LinkImpairment()], 1e8, [1e6, 1e6])
    with pytest.raises(NetemError, match="1..4096 devices"):
        topo.add_devices([], [], 1e8, [])


def test_a_failing_command_names_itself_and_keeps_what_was_made(tmp_path: Path) -> None:
    run = busy_200_to_253()
    run.fail = lambda cmd: "veth" in cmd
    topo = Topology(run=run, state_dir=tmp_path)
    topo.open()
    with pytest.raises(NetemError) as caught:
        topo.add_devices(["dev-0"], [LinkImpairment()], 1e8, [1e6])
    text = str(caught.value)
    assert f"`ip link add sf{topo.tag}h0 type veth peer name sf{topo.tag}d0" in text
    assert "RTNETLINK answers: Operation not permitted" in text
    assert topo.made[-1] == ["netns", f"sflam-{topo.tag}-0"]  # close() removes it
    assert ["link", f"sf{topo.tag}h0"] not in topo.made


def test_close_removes_in_reverse_order_and_the_state_file_when_clean(tmp_path: Path) -> None:
    run = busy_200_to_253()
    topo = Topology(run=run, state_dir=tmp_path)
    topo.open()
    topo.add_devices(["dev-0", "dev-1"], [LinkImpairment(5.0), LinkImpairment()], 1e8, [1e6, 1e6])
    tag, before = topo.tag, len(run.calls)
    assert topo.close() == []
    assert run.changes()[-6:] == [["iptables", "-w", "-D", *topo.uplink_rule],  # the uplink rule first
                                  ["ip", "link", "del", f"sf{tag}h1"], ["ip", "netns", "del", f"sflam-{tag}-1"],
                                  ["ip", "link", "del", f"sf{tag}h0"], ["ip", "netns", "del", f"sflam-{tag}-0"],
                                  ["ip", "link", "del", f"sf{tag}br"]]
    assert len(run.calls) == before + 9  # the six removals and the three listings of leftovers
    assert not topo.state_file.exists()


def test_close_keeps_the_state_file_while_something_is_left(tmp_path: Path) -> None:
    run = busy_200_to_253()
    topo = Topology(run=run, state_dir=tmp_path)
    topo.open()
    topo.add_devices(["dev-0"], [LinkImpairment()], 1e8, [1e6])
    run.links = f"1: lo: <LOOPBACK,UP> mtu 65536\n9: sf{topo.tag}h0@if2: <BROADCAST,MULTICAST> mtu 1500\n"
    assert topo.close() == [f"link sf{topo.tag}h0"]
    assert topo.state_file.exists()


def test_close_before_open_does_nothing(tmp_path: Path) -> None:
    run = FakeIp()
    assert Topology(run=run, state_dir=tmp_path).close() == []
    assert run.calls == [] and list(tmp_path.iterdir()) == []


def test_leftovers_lists_this_tags_links_and_namespaces_only() -> None:
    run = FakeIp(links="1: lo: <LOOPBACK,UP,LOWER_UP> mtu 65536 qdisc noqueue\n"
                       "12: sfab12h0@if2: <BROADCAST,MULTICAST,UP> mtu 1500 master sfab12br\n"
                       "13: sfab12br: <BROADCAST,MULTICAST,UP> mtu 1500\n"
                       "14: sfcd34h0@if3: <BROADCAST,MULTICAST,UP> mtu 1500\n"
                       "15: eth0: <BROADCAST,MULTICAST,UP> mtu 1500 sfab12h9\n",
                 netns="sflam-ab12-0 (id: 3)\nsflam-ab12-1\nsflam-cd34-0 (id: 4)\nother-ab12-0\n\n",
                 rules="-P INPUT ACCEPT\n-A INPUT -i sfab12br -j NFQUEUE --queue-num 43538\n"
                       "-A INPUT -i sfcd34br -j NFQUEUE --queue-num 52532\n")
    assert leftovers("ab12", run) == ["link sfab12h0", "link sfab12br", "netns sflam-ab12-0", "netns sflam-ab12-1",
                                      "rule -A INPUT -i sfab12br -j NFQUEUE --queue-num 43538"]
    assert leftovers("ef56", run) == []


def test_sweep_stale_removes_what_a_dead_run_left_and_keeps_live_runs(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    rule = ["INPUT", "-i", "sfab12br", "-j", "NFQUEUE", "--queue-num", "43538"]
    made = [["link", "sfab12br"], ["netns", "sflam-ab12-0"], ["link", "sfab12h0"], ["rule", *rule]]
    (tmp_path / "ab12.json").write_text(json.dumps({"pid": child.pid, "subnet": 203, "made": made}))
    (tmp_path / "cd34.json").write_text(json.dumps({"pid": os.getpid(), "subnet": 204,
                                                    "made": [["link", "sfcd34br"]]}))
    run = FakeIp()
    assert sweep_stale(tmp_path, run) == ["ab12"]
    assert run.changes() == [["iptables", "-w", "-D", *rule], ["ip", "link", "del", "sfab12h0"],
                             ["ip", "netns", "del", "sflam-ab12-0"], ["ip", "link", "del", "sfab12br"]]
    assert not (tmp_path / "ab12.json").exists()
    assert (tmp_path / "cd34.json").exists()


def test_sweep_stale_keeps_the_file_while_a_dead_runs_interfaces_remain(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    (tmp_path / "ab12.json").write_text(json.dumps({"pid": child.pid, "subnet": 203, "made": [["link", "sfab12br"]]}))
    run = FakeIp(links="7: sfab12br: <BROADCAST> mtu 1500\n")
    assert sweep_stale(tmp_path, run) == []
    assert (tmp_path / "ab12.json").exists()


def test_sweep_stale_spares_a_fresh_reservation_without_a_pid(tmp_path: Path) -> None:
    """A run between its exclusive create and its first save has an empty file: not stale yet."""
    (tmp_path / "ab12.json").write_text("")
    assert sweep_stale(tmp_path, FakeIp()) == []
    assert (tmp_path / "ab12.json").exists()
    old = os.stat(tmp_path / "ab12.json").st_mtime - 120
    os.utime(tmp_path / "ab12.json", (old, old))
    assert sweep_stale(tmp_path, FakeIp()) == ["ab12"]


# ---------------------------------------------------------------------------------------------
# sflam.netem: a run's flap


def _run_links(flap: Flap | None) -> tuple[RunLinks, FakeIp]:
    links = RunLinks(delay_ms=None, jitter_ms=None, loss=None, flap=flap, seed=0)
    run = FakeIp()
    links.topology = Topology(run=run, tag="ab12", subnet=201, links=[
        DeviceLink(f"dev-{k}", f"sflam-ab12-{k}", f"sfab12h{k}", f"sfab12d{k}", f"10.201.0.{k + 2}", LinkImpairment())
        for k in range(2)])
    return links, run


def test_poll_flaps_the_link_down_then_up_once() -> None:
    links, run = _run_links(Flap(round=3, down_s=5.0, device=1, after_s=1.5))
    timeline = [(0, 100.0), (1, 105.0),  # rounds 1 and 2 running: round 3 has not begun
                (2, 110.0), (2, 111.4),  # round 3 began at 110: not yet 1.5 s into it
                (2, 111.5),  # down
                (2, 116.4),  # 4.9 s down
                (3, 116.5),  # up
                (3, 130.0), (4, 200.0)]
    seen = []
    for counted, now in timeline:
        links.poll(counted, now)
        seen.append(len(run.calls))
    assert seen == [0, 0, 0, 0, 1, 1, 2, 2, 2]
    assert run.calls == [["ip", "link", "set", "sfab12h1", "down"], ["ip", "link", "set", "sfab12h1", "up"]]
    summary = links.summary("delayline: ready, 1 links\n"
                            'delayline-summary {"sflam-ab12-0": {"accepted": 40, "dropped": 2}}\n')
    assert summary["flap"] == {"round": 3, "device": 1, "down_s": 5.0, "happened": True, "down_for_s": 5.0}
    assert summary["delayline"] == {"sflam-ab12-0": {"accepted": 40, "dropped": 2}}
    assert summary["tag"] == "ab12" and summary["left_after_cleanup"] == []


def test_a_flap_that_never_came_is_reported_so() -> None:
    links, run = _run_links(Flap(round=5, down_s=5.0))
    links.poll(3, 100.0)
    links.poll(3, 500.0)
    assert run.calls == []
    summary = links.summary("delayline-summary {not json\n")
    assert summary["flap"]["happened"] is False and summary["flap"]["down_for_s"] is None
    assert "delayline" not in summary
    quiet, quiet_run = _run_links(None)
    quiet.poll(10, 1e6)
    assert quiet_run.calls == [] and "flap" not in quiet.summary()


# ---------------------------------------------------------------------------------------------
# edge_runtime.link.ShapedUplink


def test_tbf_args_rate_burst_and_queue() -> None:
    args = ShapedUplink("sfab12d0").tbf_args(1e6)
    assert args[:8] == ["tc", "qdisc", "replace", "dev", "sfab12d0", "root", "tbf", "rate"]
    opts = dict(zip(args[7::2], args[8::2]))
    assert opts["rate"] == "1000000bit"
    assert int(opts["burst"]) >= 3028 and int(opts["limit"]) >= 256 * 1024
    fast = dict(zip(*[iter(ShapedUplink("x").tbf_args(1e9)[7:])] * 2))
    assert fast["rate"] == "1000000000bit"
    assert int(fast["burst"]) == 1e9 / 8 * 0.002  # 2 ms of the rate
    assert int(fast["limit"]) > int(opts["limit"])
    with pytest.raises(ValueError):
        ShapedUplink("x").tbf_args(0)


def test_set_rate_runs_tc_once_per_new_rate() -> None:
    calls = []

    def run(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    link = ShapedUplink("sfab12d0", run=run)
    with pytest.raises(ShapedUplinkError, match="no rate set yet"):
        link.airtime_s(1)
    link.set_rate(1e6)
    link.set_rate(1e6)
    assert calls == [link.tbf_args(1e6)]
    assert link.airtime_s(125_000) == pytest.approx(1.0)
    link.set_rate(2e6)
    assert calls == [link.tbf_args(1e6), link.tbf_args(2e6)]
    assert link.airtime_s(125_000) == pytest.approx(0.5)


def test_set_rate_raises_with_tcs_stderr_and_keeps_the_old_rate() -> None:
    def run(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 2, "", "Error: Cannot find device \"sfab12d0\".\n")

    link = ShapedUplink("sfab12d0", run=run)
    with pytest.raises(ShapedUplinkError, match='Cannot find device "sfab12d0"') as caught:
        link.set_rate(1e6)
    assert "tc qdisc replace dev sfab12d0" in str(caught.value)
    assert link.rate_bps is None


# ---------------------------------------------------------------------------------------------
# sflam.broker: listeners on the run's bridge


def test_mosquitto_config_adds_a_listener_per_address() -> None:
    lines = config_text(1883, ("10.200.0.1",)).splitlines()
    assert [line for line in lines if line.startswith("listener")] == ["listener 1883 127.0.0.1",
                                                                       "listener 1883 10.200.0.1"]
    assert {"allow_anonymous true", "persistence false", "set_tcp_nodelay true"} <= set(lines)
    assert config_text(1883) == config_text(1883, ())
    assert config_text(1883).count("listener") == 1


def test_amqtt_config_adds_a_named_listener_per_address() -> None:
    config = yaml.safe_load(amqtt_config_text(1883, ("10.200.0.1", "10.201.0.1")))
    listeners = config["listeners"]
    assert listeners == {"default": {"type": "tcp", "bind": "127.0.0.1:1883"},
                         "also1": {"type": "tcp", "bind": "10.200.0.1:1883"},
                         "also2": {"type": "tcp", "bind": "10.201.0.1:1883"}}
    assert config["plugins"]["amqtt.plugins.authentication.AnonymousAuthPlugin"] == {"allow_anonymous": True}


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "broker.local"])
def test_also_on_takes_specific_addresses_only(host: str) -> None:
    with pytest.raises(ValueError):
        config_text(1883, (host,))
    with pytest.raises(ValueError):
        amqtt_config_text(1883, (host,))


def test_url_on_keeps_port_and_query(tmp_path: Path) -> None:
    mosquitto = MosquittoBroker(tmp_path / "m", executable="/bin/true", also_on=("10.200.0.1",))
    assert mosquitto.url_on("10.200.0.1") == f"mqtt://10.200.0.1:{mosquitto.port}"
    assert f"listener {mosquitto.port} 10.200.0.1" in mosquitto.conf.read_text()
    amqtt = AmqttBroker(tmp_path / "a", python=sys.executable, also_on=("10.200.0.1",))
    assert amqtt.url_on("10.200.0.1") == f"mqtt://10.200.0.1:{amqtt.port}?protocol=3.1.1"
    assert f"bind: 10.200.0.1:{amqtt.port}" in amqtt.conf.read_text()
    assert not mosquitto.running and not amqtt.running


# ---------------------------------------------------------------------------------------------
# sflam.options: --network and the link options


def _problems(values: dict) -> list[str]:
    with pytest.raises(SimulateError) as caught:
        build_options(values)
    return caught.value.problems


def test_link_options_need_network_netem() -> None:
    problems = _problems({"link_delay_ms": 10, "link_flap": "2:5"})
    assert "link_delay_ms: kernel links only: add --network netem" in problems
    assert "link_flap: kernel links only: add --network netem" in problems
    assert build_options({"rounds": 1}).network == "bucket"


def test_an_unknown_network_is_a_problem() -> None:
    problems = _problems({"network": "nope"})
    assert any(p.startswith("network: one of bucket, netem, got 'nope'") for p in problems)


def test_link_flap_parse() -> None:
    assert Flap.parse("2:12") == Flap(2, 12.0, 0)
    assert Flap.parse("3:5:1") == Flap(3, 5.0, 1)
    assert Flap.parse("4:0.5") == Flap(4, 0.5, 0)
    for bad in ("1:5", "x", "2:0", "2", "2:5:1:0", "2:3600", "2:5:-1", "2:x"):
        with pytest.raises(ValueError, match="link_flap"):
            Flap.parse(bad)


def test_netem_needs_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sflam.netem.os.geteuid", lambda: 1000)
    problems = _problems({"network": "netem"})
    assert any("network netem: needs root" in p for p in problems)


def test_netem_checks_pass_with_a_ready_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sflam.netem.preflight", lambda: [])
    opts = build_options({"network": "netem", "link_delay_ms": 20, "link_loss": 0.01, "link_flap": "2:12:3"})
    assert (opts.network, opts.link_delay_ms, opts.link_loss, opts.link_flap) == ("netem", 20.0, 0.01, "2:12:3")


@pytest.mark.parametrize("values, needle", [
    ({"scheme": "fl"}, "network netem: the split schemes (sflam, sfl, sl) only"),
    ({"hosts": 2}, "network netem: a namespace per device process; pass --hosts 0"),
    ({"broker": "mqtt://127.0.0.1:1"}, "network netem: a private broker of the run"),
    ({"emulate_link": False}, "network netem: the kernel shapes each uplink"),
    ({"link_delay_ms": 5, "link_jitter_ms": 6}, "radios): jitter_ms (6.0) must not exceed delay_ms (5.0)"),
    ({"link_loss": 1.0}, "radios): loss must be a probability"),
    ({"link_flap": "2:5:10"}, "link_flap: device 10 of round 2: the run has 10 devices"),
    ({"link_flap": "61:5"}, "link_flap: device 0 of round 61: the run has 10 devices and 60 rounds"),
    ({"link_flap": "1:5"}, "link_flap: ROUND >= 2"),
    ({"keepalive_s": 0}, "keepalive_s: must be in 1..3600 seconds"),
])
def test_netem_lists_what_it_cannot_do(monkeypatch: pytest.MonkeyPatch, values: dict, needle: str) -> None:
    monkeypatch.setattr("sflam.netem.preflight", lambda: [])
    problems = _problems({"network": "netem", **values})
    assert any(needle in p for p in problems), problems


def test_a_jitter_alone_applies_to_each_radio_default_delay(monkeypatch) -> None:
    """--link-jitter-ms without --link-delay-ms is checked against the radios' own delays."""
    monkeypatch.setattr("sflam.netem.preflight", lambda: [])
    ok = build_options({"network": "netem", "link_jitter_ms": 2, "profiles": "android-midrange"})  # lte: 15 ms
    assert ok.link_jitter_ms == 2
    with pytest.raises(SimulateError) as caught:  # wifi's 2 ms cannot carry +- 5 ms
        build_options({"network": "netem", "link_jitter_ms": 5, "profiles": "raspberry-pi-5"})
    assert any("wifi radios" in p and "jitter_ms" in p for p in caught.value.problems)


def test_kernel_links_run_a_process_per_device_by_default(monkeypatch) -> None:
    """Beyond 50 devices the token bucket's default is device hosts; kernel links keep a process
    (and a namespace) per device unless --hosts says otherwise, which is then refused."""
    from sflam.options import host_count

    monkeypatch.setattr("sflam.netem.preflight", lambda: [])
    opts = build_options({"network": "netem", "devices": 60, "per_round": 5})
    assert host_count(opts) == 0
    assert host_count(build_options({"devices": 60, "per_round": 5})) > 0
    with pytest.raises(SimulateError) as caught:
        build_options({"network": "netem", "devices": 60, "per_round": 5, "hosts": 2})
    assert any("--hosts 0" in p for p in caught.value.problems)
