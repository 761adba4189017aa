"""``sflam fleet provision`` against a real mosquitto running the provisioned config.

What the files say (modes, ACL lines, the password hash, the certificate's names), then what the
broker does with them: TLS only, passwords checked, each device confined to its own topics, and
a server with two device processes training over it.
"""

from __future__ import annotations

import base64
import json
import socket
import ssl
import stat
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from cryptography import x509

from edge_runtime.mqtt import LinkConfig, MqttLink, TransportError, read_password_file
from edge_runtime.protocol.topics import Topics
from sflam.broker import HOST, MosquittoBroker, free_port
from sflam.cli import main
from sflam.fleet import SERVER_USERNAME, FleetSpec, mosquitto_hash, provision
from sflam_common.problems import ProblemsError
from sflam.testing.local_fleet import LocalFleet
from server_runtime.metrics import read_round_records
from test_server import config_text, start_device, start_server, stop, write_shards

pytestmark = pytest.mark.broker
RUN = "srv"  # tests/test_server.config_text's run id
T = Topics(RUN)
QUIET_S = 1.0  # how long "nothing arrives" is watched for, after a control message did arrive
SUBACK_TIMEOUT_S = 10.0  # a failure guard only: SUBACKs from a loopback broker come in milliseconds
TWO_DEVICE_ACL = """\
# sflam fleet ACL for run 'r1': users not listed here (and anonymous clients) get nothing.

user sflam-server
topic readwrite sflam/v1/r1/#

user dev-0
topic write sflam/v1/r1/d/dev-0/up
topic write sflam/v1/r1/d/dev-0/status
topic read sflam/v1/r1/d/dev-0/down
topic read sflam/v1/r1/plan/#
topic read sflam/v1/r1/model/#

user dev-1
topic write sflam/v1/r1/d/dev-1/up
topic write sflam/v1/r1/d/dev-1/status
topic read sflam/v1/r1/d/dev-1/down
topic read sflam/v1/r1/plan/#
topic read sflam/v1/r1/model/#
"""


def connack(port: int, username: str | None, password: str | None, *, ca_file: str | None,
            timeout_s: float = 5.0) -> object | None:
    """The reason code of one MQTT 5 CONNECT's CONNACK; None when none came (TLS via ``ca_file``)."""
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="", protocol=paho.MQTTv5)
    reasons: list[object] = []
    client.on_connect = lambda c, userdata, flags, reason, props: reasons.append(reason)
    if ca_file is not None:
        client.tls_set(ca_certs=ca_file)
    if username is not None:
        client.username_pw_set(username, password)
    try:
        client.connect(HOST, port, keepalive=10)
        deadline = time.monotonic() + timeout_s
        while not reasons and time.monotonic() < deadline:
            if client.loop(timeout=0.1) != paho.MQTT_ERR_SUCCESS:
                break  # the broker closed the connection
    except (OSError, ssl.SSLError):
        pass
    finally:
        sock = client.socket()
        if sock is not None:
            sock.close()
    return reasons[0] if reasons else None


def subscribe_acked(link: MqttLink, filters: list[str]) -> list[object]:
    """Subscribe ``link`` to ``filters`` and return once the broker has SUBACKed every one (their reason codes).

    MqttLink sends one SUBSCRIBE per filter and exposes no SUBACK event, so paho's on_subscribe
    callback of the link's client is the signal that the broker holds the subscriptions.
    """
    acked, codes = threading.Event(), []

    def on_subscribe(client: object, userdata: object, mid: int, reason_codes: list, props: object) -> None:
        codes.extend(reason_codes)
        if len(codes) >= len(filters):
            acked.set()

    link._client.on_subscribe = on_subscribe
    link.subscribe(filters)
    assert acked.wait(SUBACK_TIMEOUT_S), f"{len(codes)} of {len(filters)} SUBACKs for {link.config.client_id}"
    return codes


def drain(link: MqttLink, quiet_s: float = QUIET_S) -> list[str]:
    """Topics of everything ``link`` receives until nothing has come for ``quiet_s``."""
    topics = []
    while (incoming := link.get(quiet_s)) is not None:
        topics.append(incoming.topic)
    return topics


# ---------------------------------------------------------------- the files


def test_provision_writes_private_files_and_a_confining_acl(tmp_path: Path) -> None:
    # Prepare / Execute
    out = tmp_path / "fleet"
    provision(FleetSpec(devices=11, out=out, run_id="r1", port=18883))
    # Assert: secrets 0600 in a 0700 directory, public parts 0644
    mode = lambda rel: stat.S_IMODE((out / rel).stat().st_mode)  # noqa: E731
    ids = [f"dev-{i:02d}" for i in range(11)]
    assert mode(".") == 0o700 and mode("devices") == 0o700
    for rel in ["ca.key", "server.key", "server.password", "passwd", "acl", *(f"devices/{d}.password" for d in ids)]:
        assert mode(rel) == 0o600, rel
    for rel in ["ca.crt", "server.crt", "mosquitto.conf", "fleet.json", "README.txt"]:
        assert mode(rel) == 0o644, rel
    passwords = {read_password_file(out / f"devices/{d}.password") for d in ids}
    assert len(passwords) == 11 and all(len(p) >= 32 for p in passwords)
    users = [line.split(":")[0] for line in (out / "passwd").read_text().splitlines()]
    assert users == [SERVER_USERNAME, *ids]
    acl = (out / "acl").read_text()
    block = acl.split("user dev-03\n")[1].split("\n\n")[0].splitlines()
    assert block == ["topic write sflam/v1/r1/d/dev-03/up", "topic write sflam/v1/r1/d/dev-03/status",
                     "topic read sflam/v1/r1/d/dev-03/down", "topic read sflam/v1/r1/plan/#",
                     "topic read sflam/v1/r1/model/#"]
    assert f"user {SERVER_USERNAME}\ntopic readwrite sflam/v1/r1/#\n" in acl
    conf = (out / "mosquitto.conf").read_text().splitlines()
    assert [line for line in conf if line.startswith("listener ")] == ["listener 18883 127.0.0.1"]
    for line in ["allow_anonymous false", "tls_version tlsv1.2", "persistence false", "set_tcp_nodelay true",
                 f"password_file {out / 'passwd'}", f"acl_file {out / 'acl'}", f"keyfile {out / 'server.key'}"]:
        assert line in conf
    manifest = json.loads((out / "fleet.json").read_text())
    assert manifest["broker_url"] == "mqtts://127.0.0.1:18883" and manifest["topics_prefix"] == "sflam/v1/r1"
    assert [d["id"] for d in manifest["devices"]] == ids
    readme = (out / "README.txt").read_text()
    assert "--ca-file ca.crt --username dev-00 --password-file devices/dev-00.password" in readme


def test_a_two_device_acl_is_exactly_this(tmp_path: Path) -> None:
    provision(FleetSpec(devices=2, out=tmp_path / "fleet", run_id="r1"))
    assert (tmp_path / "fleet" / "acl").read_text() == TWO_DEVICE_ACL


def test_the_server_certificate_is_signed_by_the_ca_for_both_loopback_forms(tmp_path: Path) -> None:
    out = tmp_path / "fleet"
    provision(FleetSpec(devices=1, out=out, port=18883))
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((out / "server.crt").read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_the_password_hash_is_mosquitto_passwds() -> None:
    # `mosquitto_passwd -b` (mosquitto 2.0.11) wrote this line for alice / secret
    line = ("$7$101$8juE+69u0VPbk1ft$NHWmq+W+ukEngArERzBVZdB5sp75JI86eEit6WNpabe54lOjIS90q6fEGhko2tAA5BWA"
            "TyMqnIQfoWT7JJDOwA==")
    salt = base64.b64decode("8juE+69u0VPbk1ft")
    assert mosquitto_hash("secret", salt) == line
    assert mosquitto_hash("secret") != mosquitto_hash("secret")  # a fresh salt each time


def test_bad_arguments_are_refused_with_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "fleet"
    for devices in ("0", "two", "-3"):
        with pytest.raises(SystemExit) as exit_info:
            main(["fleet", "provision", "--devices", devices, "--out", str(out)])
        assert exit_info.value.code == 2
    assert "--devices: expected" in capsys.readouterr().err
    assert main(["fleet", "provision", "--devices", "2", "--out", str(out), "--port", "70000",
                 "--run-id", "a/b", "--hostname", "not a host"]) == 2
    err = capsys.readouterr().err
    assert "--port must be in 1..65535" in err and "--run-id" in err and "'not a host'" in err
    assert not out.exists()
    with pytest.raises(ValueError, match="--devices must be"):
        FleetSpec(devices=0, out=out).check()
    out.mkdir()
    (out / "keep").write_text("mine")
    assert main(["fleet", "provision", "--devices", "2", "--out", str(out)]) == 2
    assert "not an empty directory" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep"]
    with pytest.raises(ValueError, match="go together"):
        MosquittoBroker(tmp_path / "b", conf=out / "mosquitto.conf")


# ---------------------------------------------------------------- the broker


def test_wrong_password_unknown_user_and_anonymous_are_refused(fleet: LocalFleet) -> None:
    right = read_password_file(fleet.password_file("dev-0"))
    assert not connack(fleet.port, "dev-0", right, ca_file=fleet.ca).is_failure  # the control
    for username, password in [("dev-0", right[:-1] + "x"), ("dev-7", right), ("dev-0", None), (None, None)]:
        reason = connack(fleet.port, username, password, ca_file=fleet.ca)
        assert reason is not None and reason.is_failure, (username, reason)
        assert reason.value in (0x86, 0x87), reason  # bad user name or password / not authorized


def test_plaintext_mqtt_to_the_tls_port_gets_no_connack(fleet: LocalFleet) -> None:
    right = read_password_file(fleet.password_file("dev-0"))
    assert connack(fleet.port, "dev-0", right, ca_file=None, timeout_s=3.0) is None
    with pytest.raises(TransportError):
        MqttLink(f"mqtt://{HOST}:{fleet.port}", LinkConfig("plain", username="dev-0", password=right)).start(1.5)
    assert fleet.broker.running


def test_clients_check_the_fleet_ca_and_the_broker_name(fleet: LocalFleet, tmp_path: Path) -> None:
    # Prepare: a second fleet whose certificate names only broker.example, served on loopback
    port = free_port()
    named = tmp_path / "named"
    provision(FleetSpec(devices=1, out=named, run_id=RUN, port=port, hostnames=("broker.example",), bind=HOST))
    right = read_password_file(named / "devices/dev-0.password")
    with MosquittoBroker(tmp_path / "named-broker", conf=named / "mosquitto.conf", port=port):
        context = ssl.create_default_context(cafile=str(named / "ca.crt"))
        with socket.create_connection((HOST, port), timeout=5) as raw:  # the control: right CA, right name
            with context.wrap_socket(raw, server_hostname="broker.example") as tls:
                assert tls.version() in ("TLSv1.2", "TLSv1.3")
        # Execute / Assert: the device's client refuses the broker by IP (not in the certificate) ...
        config = LinkConfig("dev-0", ca_file=str(named / "ca.crt"), username="dev-0", password=right)
        with pytest.raises(TransportError):
            MqttLink(f"mqtts://{HOST}:{port}", config).start(1.5)
    # ... and the first fleet's broker under the second fleet's CA
    config = LinkConfig("dev-0", ca_file=str(named / "ca.crt"), username="dev-0",
                        password=read_password_file(fleet.password_file("dev-0")))
    with pytest.raises(TransportError):
        MqttLink(fleet.url, config).start(1.5)
    assert "u'dev-0'" not in fleet.broker.log_tail(100_000)  # it never got as far as logging in


def test_a_device_cannot_write_or_read_another_devices_topics(fleet: LocalFleet) -> None:
    # Prepare: the server watches every device's up and status and the retained plan
    server, a, b = fleet.link(SERVER_USERNAME), fleet.link("dev-0"), fleet.link("dev-1")
    try:
        granted = subscribe_acked(server, [T.all_devices("up"), T.all_devices("status"), T.retained_filter("plan")])
        granted += subscribe_acked(b, [T.retained_filter("plan")])
        subscribe_acked(a, [T.down("dev-1"), T.up("dev-1"), T.status("dev-1"), T.down("dev-0"), "#"])
        assert not any(code.is_failure for code in granted)  # the server's and dev-1's own filters
        # Execute: dev-0 forges dev-1's uplink and status and a retained plan, then sends its own up
        a.publish(T.up("dev-1"), b"forged up")
        a.publish(T.status("dev-1"), b"forged status", retain=True)
        a.publish(T.plan(), b"forged plan", retain=True)
        a.publish(T.up("dev-0"), b"own up")
        # Assert: only dev-0's own up reached the server; nobody saw the forged plan
        assert drain(server) == [T.up("dev-0")]
        assert drain(b, 0.3) == []
        # Execute: dev-1 and the server talk on dev-1's topics, then the server answers dev-0
        b.publish(T.up("dev-1"), b"dev-1 up")
        server.publish(T.down("dev-1"), b"for dev-1 only")
        server.publish(T.down("dev-0"), b"for dev-0")
        # Assert: dev-0 sees its own down and nothing of dev-1's (not even through '#')
        assert set(drain(a)) == {T.down("dev-0")}  # once per matching subscription
        assert drain(server) == [T.up("dev-1")]
    finally:
        for link in (a, b, server):
            link.close()


def test_a_server_and_two_devices_train_over_tls(fleet: LocalFleet, quick_bundle: Path, tmp_path: Path) -> None:
    # Prepare: the server logs in with the provisioned credentials and trusts only the fleet's CA
    shards = write_shards(tmp_path, 2, 64)
    ckpt = tmp_path / "ckpt"
    config = tmp_path / "run.toml"
    config.write_text(config_text(
        fleet.url, ckpt, training__rounds=2, training__devices_per_round=2, compute__workers=2,
        **{f"broker__{key}": value for key, value in fleet.server_config().items()},
    ))
    # Execute
    server = start_server(config)
    devices = [
        start_device(quick_bundle, fleet.url, f"dev-{i}", shard, seed=i, rounds=2, extra=fleet.device_args(f"dev-{i}"))
        for i, shard in enumerate(shards)
    ]
    try:
        out, err = server.communicate(timeout=180)
    finally:
        stop(devices)
    # Assert
    assert server.returncode == 0, err[-3000:]
    records = read_round_records(ckpt / "metrics.jsonl")
    assert [(r.round, r.counted) for r in records] == [(1, True), (2, True)]
    for record in records:
        assert record.completed == ("dev-0", "dev-1") and record.failed == {}
        assert all(stats.bytes_up > 0 and stats.steps == 4 for stats in record.devices.values())
    log = fleet.broker.log_tail(100_000)
    assert all(f"u'{user}'" in log for user in (SERVER_USERNAME, "dev-0", "dev-1"))


def test_every_bad_field_of_a_fleet_is_listed_at_once(tmp_path: Path) -> None:
    with pytest.raises(ProblemsError) as caught:
        FleetSpec(devices=0, out=tmp_path / "fleet", port=0, days=0, hostnames=("bad host",)).check()
    assert len(caught.value.problems) == 4 and str(caught.value).startswith("fleet provision: 4 problems:")
