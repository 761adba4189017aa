"""sflam.broker.AmqttBroker, the embedded fallback: amqtt 0.12 in a subprocess on loopback, MQTT 3.1.1.

Everything the project asks of MQTT (QoS 1, retained messages and their clearing, a retained
last will, large payloads) is checked with the project's own MqttLink; then device-loop rounds
(one plain, one across a broker restart) and a server + device round run over it. A fake broker
that refuses MQTT 5 checks the link's fallback to 3.1.1 when the URL does not pin a version.
Not checked because amqtt does not do it: queueing QoS 1 messages for a disconnected persistent
session (amqtt treats every anonymous session as clean).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import amqtt  # noqa: F401  (a pinned server dependency: missing, these tests must fail, not skip)
import numpy as np
import pytest
import yaml

from edge_runtime.mqtt import BrokerAddress, LinkConfig, MqttLink, TransportError
from sflam.broker import AmqttBroker, MosquittoBroker, find_mosquitto, start_local_broker
from test_broker import accepts
from test_device_loop import data_file  # noqa: F401  (the device-loop harness's data fixture)

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.broker


@pytest.fixture()
def amqtt_broker(tmp_path: Path):
    with AmqttBroker(tmp_path / "amqtt") as b:
        yield b


@pytest.fixture()
def links():
    made: list[MqttLink] = []

    def make(url: str, client_id: str, filters: tuple[str, ...] = (), **config: object) -> MqttLink:
        link = MqttLink(url, LinkConfig(client_id=client_id, **config))
        link.subscribe(filters)
        link.start()
        made.append(link)
        return link

    yield make
    for link in made:
        link.close()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def next_on(link: MqttLink, topic: str, timeout_s: float = 5.0):
    """The next publish on ``topic`` (others are dropped), or None."""
    deadline = time.monotonic() + timeout_s
    while (incoming := link.get(deadline - time.monotonic())) is not None:
        if incoming.topic == topic:
            return incoming
    return None


def test_config_listens_on_loopback_only_and_url_pins_311(tmp_path: Path) -> None:
    broker = AmqttBroker(tmp_path)
    config = yaml.safe_load(broker.conf.read_text())
    assert config["listeners"] == {"default": {"type": "tcp", "bind": f"127.0.0.1:{broker.port}"}}
    assert config["plugins"] == {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}
    assert broker.url == f"mqtt://127.0.0.1:{broker.port}?protocol=3.1.1"
    assert BrokerAddress.parse(broker.url) == BrokerAddress("127.0.0.1", broker.port, False, "3.1.1")


def test_start_stop_restart_leave_no_process(tmp_path: Path) -> None:
    # Execute
    with AmqttBroker(tmp_path) as broker:
        port, first = broker.port, broker.proc.pid
        up = accepts(port)
        broker.restart()
        second = broker.proc.pid
        up_again = accepts(port)
    # Assert: listening before and after the restart (same port, new process); nothing left after
    assert up and up_again and second != first
    assert not broker.running and broker.proc is None
    assert not alive(first) and not alive(second)
    assert not accepts(port)
    assert "Listener 'default' bind to 127.0.0.1" in broker.log_tail()


def test_a_port_in_use_fails_fast_with_amqtts_words(tmp_path: Path) -> None:
    # Prepare: someone else holds the broker's port (bound, not listening: nothing answers there)
    broker = AmqttBroker(tmp_path)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", broker.port))
        # Execute
        try:
            with pytest.raises(RuntimeError) as caught:
                broker.start()
        finally:
            broker.stop()  # should it have started after all
    # Assert: start() saw the child exit and says why; it did not wait out the listen timeout
    # (that error reads "did not listen on ... within 10 s")
    message = str(caught.value)
    assert message.startswith(f"amqtt exited with status 1 before listening on 127.0.0.1:{broker.port}"), message
    assert "address already in use" in message.lower() and "did not listen" not in message
    assert not broker.running


def test_qos1_round_trip(amqtt_broker: AmqttBroker, links) -> None:
    sub = links(amqtt_broker.url, "sub", ("t/#",))
    pub = links(amqtt_broker.url, "pub")
    pub.publish("t/a", b"hello")  # returns only after the PUBACK
    got = next_on(sub, "t/a")
    assert got is not None and got.payload == b"hello" and not got.retained
    assert sub.protocol == pub.protocol == "3.1.1"


def test_retained_seen_late_then_cleared(amqtt_broker: AmqttBroker, links) -> None:
    pub = links(amqtt_broker.url, "pub")
    pub.publish("r/model", b"weights-v1", retain=True)
    late = links(amqtt_broker.url, "late", ("r/#",))
    got = next_on(late, "r/model")
    assert got is not None and got.payload == b"weights-v1" and got.retained
    # Execute: an empty retained publish clears it
    pub.publish("r/model", b"", retain=True)
    later = links(amqtt_broker.url, "later", ("r/#",))
    # Assert: a subscriber after the clear sees nothing retained
    assert later.get(1.0) is None


def test_last_will_when_the_client_process_is_killed(amqtt_broker: AmqttBroker, links) -> None:
    # Prepare: a child process holds a link with a (retained) will
    code = ("import sys, time\n"
            "from edge_runtime.mqtt import LinkConfig, MqttLink\n"
            "link = MqttLink(sys.argv[1], LinkConfig(client_id='doomed', will_topic='w/doomed', "
            "will_payload=b'offline'))\n"
            "link.start()\nprint('connected', flush=True)\ntime.sleep(60)\n")
    watcher = links(amqtt_broker.url, "watcher", ("w/#",))
    child = subprocess.Popen([sys.executable, "-c", code, amqtt_broker.url], cwd=ROOT, stdout=subprocess.PIPE,
                             env={**os.environ, "PYTHONPATH": str(ROOT)}, text=True)
    try:
        assert child.stdout.readline().strip() == "connected"
        # Execute
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    # Assert: the will reaches the watcher, and stays retained for a late subscriber
    got = next_on(watcher, "w/doomed")
    assert got is not None and got.payload == b"offline"
    late = links(amqtt_broker.url, "late", ("w/#",))
    got = next_on(late, "w/doomed")
    assert got is not None and got.payload == b"offline" and got.retained


def test_a_2_mb_payload(amqtt_broker: AmqttBroker, links) -> None:
    payload = os.urandom(2 * 1024 * 1024)
    sub = links(amqtt_broker.url, "sub", ("big/#",))
    pub = links(amqtt_broker.url, "pub")
    pub.publish("big/one", payload, timeout_s=30)  # one 2 MiB PUBLISH
    got = next_on(sub, "big/one", timeout_s=30)
    assert got is not None and got.payload == payload


def test_a_chunked_message(amqtt_broker: AmqttBroker, links) -> None:
    from edge_runtime import protocol as p

    # Prepare: a 2 MiB tensor, sent as 64 KiB frames
    weights = {"w": np.arange(512 * 1024, dtype=np.float32).reshape(512, 1024)}
    message = p.ModelWeights(p.Envelope("amq", 1, "server"), 1, p.weights_from_numpy(weights))
    topic = p.Topics("amq").model()
    sub = links(amqtt_broker.url, "sub", (topic,))
    pub = links(amqtt_broker.url, "pub", max_frame_bytes=64 * 1024)
    # Execute
    sent = pub.send(topic, message, timeout_s=30)
    receiver, got = p.Receiver("amq"), None
    deadline = time.monotonic() + 30
    while got is None and (incoming := sub.get(deadline - time.monotonic())) is not None:
        got = receiver.accept(incoming.payload, incoming.topic)
    # Assert: reassembled bit for bit from many frames
    assert sent > 2 * 1024 * 1024 and receiver.counters["chunks"] >= 32
    assert isinstance(got, p.ModelWeights)
    np.testing.assert_array_equal(p.weights_to_numpy(got.weights)["w"], weights["w"])


def test_start_local_broker_kinds(tmp_path: Path) -> None:
    amqtt = start_local_broker(tmp_path / "a", "amqtt")
    try:
        assert isinstance(amqtt, AmqttBroker) and amqtt.running and accepts(amqtt.port)
    finally:
        amqtt.stop()
    assert not amqtt.running
    with pytest.raises(ValueError, match="broker kind"):
        start_local_broker(tmp_path / "x", "rabbitmq")


def test_auto_prefers_mosquitto(tmp_path: Path) -> None:
    assert find_mosquitto() is not None, "mosquitto is part of the set-up (make setup runs scripts/ensure-broker.sh)"
    broker = start_local_broker(tmp_path)
    try:
        assert isinstance(broker, MosquittoBroker) and broker.running
    finally:
        broker.stop()


def test_auto_falls_back_to_amqtt_without_mosquitto(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sflam.broker.find_mosquitto", lambda: None)
    broker = start_local_broker(tmp_path)
    try:
        assert isinstance(broker, AmqttBroker) and broker.running
    finally:
        broker.stop()


def read_exactly(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed mid-packet")
        data += chunk
    return data


def connect_level(conn: socket.socket) -> int:
    """Read one CONNECT packet; its protocol level (4: MQTT 3.1.1, 5: MQTT 5)."""
    if read_exactly(conn, 1)[0] >> 4 != 1:
        raise ValueError("not a CONNECT")
    length, shift = 0, 0
    while True:  # remaining length, a variable byte integer
        byte = read_exactly(conn, 1)[0]
        length |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            break
    body = read_exactly(conn, length)
    if body[:6] != b"\x00\x04MQTT":
        raise ValueError(f"not an MQTT CONNECT: {body[:6]!r}")
    return body[6]


def refusing_v5_broker(sock: socket.socket, levels: list[int], done: threading.Event) -> None:
    """A fake 3.1.1-only broker: CONNACK return code 1 to MQTT 5, 0 to 3.1.1 (held until ``done``)."""
    while not done.is_set():
        try:
            conn, _ = sock.accept()
        except OSError:  # the test closed the listening socket
            return
        with conn:
            level = connect_level(conn)
            levels.append(level)
            conn.sendall(bytes([0x20, 0x02, 0x00, 0x00 if level == 4 else 0x01]))
            if level == 4:
                done.wait(10)


def fake_broker() -> tuple[socket.socket, list[int], threading.Event]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    levels: list[int] = []
    done = threading.Event()
    threading.Thread(target=refusing_v5_broker, args=(sock, levels, done), daemon=True).start()
    return sock, levels, done


def test_an_unpinned_link_falls_back_to_311_when_5_is_refused() -> None:
    # Prepare: a fake broker that speaks only 3.1.1
    sock, levels, done = fake_broker()
    link = MqttLink(f"mqtt://127.0.0.1:{sock.getsockname()[1]}", LinkConfig(client_id="probe"))
    # Execute
    try:
        link.start(timeout_s=5)
        connected = link.connected
    finally:
        done.set()
        link.close()
        sock.close()
    # Assert: MQTT 5 first, refused, then 3.1.1 at once, accepted
    assert connected and link.protocol == "3.1.1"
    assert levels == [5, 4]


def test_a_link_pinned_to_5_does_not_fall_back() -> None:
    sock, levels, done = fake_broker()
    link = MqttLink(f"mqtt://127.0.0.1:{sock.getsockname()[1]}?protocol=5",
                    LinkConfig(client_id="probe", reconnect_min_s=0.05, reconnect_max_s=0.1))
    try:
        with pytest.raises(TransportError):
            link.start(timeout_s=1.0)
    finally:
        done.set()
        link.close()
        sock.close()
    assert link.protocol == "5" and len(levels) >= 2 and set(levels) == {5}  # retried, always as 5


@pytest.mark.parametrize("url", ["mqtt://127.0.0.1:1883?protocol=4", "mqtt://127.0.0.1:1883?qos=1",
                                 "mqtt://127.0.0.1:1883?protocol=3.1.1&x=1"])
def test_bad_protocol_queries_are_refused(url: str) -> None:
    with pytest.raises(ValueError, match="protocol"):
        BrokerAddress.parse(url)


@pytest.mark.slow
def test_device_loop_round_over_amqtt(quick_bundle: Path, amqtt_broker: AmqttBroker, data_file: Path) -> None:
    from test_device_loop import check_round, round_trip

    peer, summary = round_trip(quick_bundle, amqtt_broker, data_file, restart_at_step=None, max_frame_bytes=1500)
    check_round(peer, summary)  # every gradient applied once, in order: the final weights prove it
    assert peer.receiver.counters["chunks"] > 0  # 1500-byte frames: activations travel chunked


@pytest.mark.slow
def test_device_loop_survives_an_amqtt_restart(quick_bundle: Path, amqtt_broker: AmqttBroker,
                                               data_file: Path) -> None:
    from test_device_loop import check_round, round_trip

    peer, summary = round_trip(quick_bundle, amqtt_broker, data_file, restart_at_step=2,
                               max_frame_bytes=256 * 1024)
    check_round(peer, summary)
    assert peer.restarted and summary["counters"]["resent_activations"] >= 1
    assert peer.steps_seen.count(2) == 1


@pytest.mark.slow
def test_server_and_device_one_round_over_amqtt(quick_bundle: Path, amqtt_broker: AmqttBroker,
                                                tmp_path: Path) -> None:
    from test_server import config_text, start_device, start_server, stop, write_shards

    from server_runtime.metrics import read_round_records

    (shard,) = write_shards(tmp_path, 1, 32)
    ckpt, config = tmp_path / "ckpt", tmp_path / "run.toml"
    config.write_text(config_text(amqtt_broker.url, ckpt, training__rounds=1, training__devices_per_round=1))
    server = start_server(config)
    device = start_device(quick_bundle, amqtt_broker.url, "dev-0", shard, seed=0, rounds=1)
    try:
        out, err = server.communicate(timeout=120)
    finally:
        stop([device, server])
    assert server.returncode == 0, err[-3000:]
    (record,) = read_round_records(ckpt / "metrics.jsonl")
    assert record.round == 1 and record.counted and record.completed == ("dev-0",)
    assert record.devices["dev-0"].bytes_up > 0 and record.devices["dev-0"].bytes_down > 0
    summary = json.loads(next(l for l in out.splitlines() if l.startswith("sflam-server-summary ")).split(" ", 1)[1])
    assert summary["rounds"] == 1
