"""Many MQTT sessions on one shared network thread (LinkLoop) against a real mosquitto."""

from __future__ import annotations

import threading
import time

import pytest

from edge_runtime.mqtt import LinkConfig, MqttLink
from edge_runtime.mqtt_loop import LinkLoop
from sflam_common.limits import raise_open_file_limit

pytestmark = pytest.mark.broker
LINKS = 1100  # past select()'s 1,024-descriptor cap: the loop must poll


def _wait(predicate, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_hundreds_of_sessions_share_one_thread_and_each_gets_its_own_messages(broker) -> None:
    # Prepare: LINKS real sessions (own client id, own will) on one loop
    assert raise_open_file_limit() > 4 * LINKS, "this test needs more open files than the hard limit allows"
    threads_before = threading.active_count()
    loop = LinkLoop(stagger_s=0.2)
    links = [MqttLink(broker.url, LinkConfig(client_id=f"d{i}", will_topic=f"t/d{i}/status", will_payload=b"gone"),
                      loop=loop) for i in range(LINKS)]
    try:
        for i, link in enumerate(links):
            link.subscribe([f"t/d{i}/down"])
            link.start(wait=False)
        _wait(lambda: all(link.connected for link in links))
        # one thread for all of them (a link with its own thread would add LINKS threads)
        assert threading.active_count() <= threads_before + 2
        sender = MqttLink(broker.url, LinkConfig(client_id="sender"), loop=loop)
        sender.start()
        # Execute: a message to every device's own topic, published from this thread
        for i in range(LINKS):
            sender.publish(f"t/d{i}/down", f"to d{i}".encode())
        # Assert: each got exactly its own
        for i, link in enumerate(links):
            incoming = link.get(10.0)
            assert incoming is not None and incoming.payload == f"to d{i}".encode()
            assert link.get(0.0) is None
        sender.close()
    finally:
        for link in links:
            link.close()
        loop.close()
    assert not any(link.connected for link in links)


def test_a_link_on_the_loop_reconnects_after_the_broker_restarts(broker) -> None:
    loop = LinkLoop()
    link = MqttLink(broker.url, LinkConfig(client_id="survivor", reconnect_max_s=1.0), loop=loop)
    link.subscribe(["t/survivor"])
    link.start()
    try:
        broker.stop()
        _wait(lambda: not link.connected)
        broker.start()
        _wait(lambda: link.connections >= 2)
        other = MqttLink(broker.url, LinkConfig(client_id="other"), loop=loop)
        other.start()
        other.publish("t/survivor", b"back")
        incoming = link.get(10.0)
        assert incoming is not None and incoming.payload == b"back"
        other.close()
    finally:
        link.close()
        loop.close()
