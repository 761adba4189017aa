"""``sflam fleet provision`` and ``revoke`` against a real mosquitto running the provisioned config.

What the files say (layout and modes, ACL lines, the password hash, the certificate's names, the
signing keys, the broker's limits), then what the broker does with them: TLS only with AEAD
suites, passwords checked, each device confined to its own topics, packets over the limit
refused, a revoked device shut out, and a server with two device processes training over it.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import ssl
import stat
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from cryptography import x509

from edge_runtime.mqtt import DEFAULT_MAX_FRAME_BYTES, LinkConfig, MqttLink, TransportError, read_password_file
from edge_runtime.protocol.signing import Keyring, SigningKey, public_b64, read_public_key, signed_digest
from edge_runtime.protocol.topics import Topics
from server_runtime.config import BrokerSection
from sflam.broker import HOST, MosquittoBroker, free_port
from sflam.cli import main
from sflam.fleet import SERVER_USERNAME, FleetSpec, mosquitto_hash, provision
from sflam.fleet_broker import SIGNATURE_BLOCK_MAX_BYTES, BrokerLimits, acl_text, publish_overhead_bytes
from sflam.fleet_revoke import RevokeError, revoke
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
    # Assert: broker files, credentials and keys in folders of their own; secrets 0600, folders 0700
    mode = lambda rel: stat.S_IMODE((out / rel).stat().st_mode)  # noqa: E731
    ids = [f"dev-{i:02d}" for i in range(11)]
    for folder in [".", "broker", "credentials", "credentials/devices", "keys", "keys/devices"]:
        assert mode(folder) == 0o700, folder
    secrets = ["broker/server.key", "broker/passwd", "broker/acl", "credentials/server.password", "keys/server.key",
               *(f"credentials/devices/{d}.password" for d in ids), *(f"keys/devices/{d}.key" for d in ids)]
    public = ["ca.crt", "fleet.json", "README.txt", "broker/ca.crt", "broker/server.crt", "broker/mosquitto.conf",
              "keys/server.pub"]
    for rel in secrets:
        assert mode(rel) == 0o600, rel
    for rel in public:
        assert mode(rel) == 0o644, rel
    written = {str(path.relative_to(out)) for path in out.rglob("*") if path.is_file()}
    assert written == set(secrets) | set(public)  # no ca.key unless asked for
    assert sorted(path.name for path in (out / "broker").iterdir()) == [
        "acl", "ca.crt", "mosquitto.conf", "passwd", "server.crt", "server.key"]
    passwords = {read_password_file(out / f"credentials/devices/{d}.password") for d in ids}
    assert len(passwords) == 11 and all(len(p) >= 32 for p in passwords)
    users = [line.split(":")[0] for line in (out / "broker/passwd").read_text().splitlines()]
    assert users == [SERVER_USERNAME, *ids]
    acl = (out / "broker/acl").read_text()
    block = acl.split("user dev-03\n")[1].split("\n\n")[0].splitlines()
    assert block == ["topic write sflam/v1/r1/d/dev-03/up", "topic write sflam/v1/r1/d/dev-03/status",
                     "topic read sflam/v1/r1/d/dev-03/down", "topic read sflam/v1/r1/plan/#",
                     "topic read sflam/v1/r1/model/#"]
    assert f"user {SERVER_USERNAME}\ntopic readwrite sflam/v1/r1/#\n" in acl
    conf = (out / "broker/mosquitto.conf").read_text().splitlines()
    assert [line for line in conf if line.startswith("listener ")] == ["listener 18883 127.0.0.1"]
    for line in ["allow_anonymous false", "tls_version tlsv1.2", "persistence false", "set_tcp_nodelay true",
                 f"password_file {out / 'broker/passwd'}", f"acl_file {out / 'broker/acl'}",
                 f"cafile {out / 'broker/ca.crt'}", f"keyfile {out / 'broker/server.key'}"]:
        assert line in conf
    assert (out / "ca.crt").read_bytes() == (out / "broker/ca.crt").read_bytes()
    manifest = json.loads((out / "fleet.json").read_text())
    assert manifest["broker_url"] == "mqtts://127.0.0.1:18883" and manifest["topics_prefix"] == "sflam/v1/r1"
    assert [d["id"] for d in manifest["devices"]] == ids
    assert manifest["devices"][3]["password_file"] == "credentials/devices/dev-03.password"
    assert all((out / rel).is_file() for rel in manifest["files"].values())
    readme = (out / "README.txt").read_text()
    assert ("--ca-file ca.crt --username dev-00 \\\n       --password-file credentials/devices/dev-00.password \\\n"
            "       --signing-key keys/devices/dev-00.key --server-key keys/server.pub") in readme
    assert (f'signing = "ed25519"\n   signing_key = "{out / "keys/server.key"}"\n'
            f'   device_keys = "{out / "fleet.json"}"') in readme


def test_every_party_gets_its_own_signing_key_and_fleet_json_lists_the_public_ones(tmp_path: Path) -> None:
    # Prepare / Execute
    out = tmp_path / "fleet"
    provision(FleetSpec(devices=3, out=out, run_id="r1"))
    manifest = json.loads((out / "fleet.json").read_text())
    # Assert: format 2, nothing revoked, each listed public key is the one of the key file next to it
    assert manifest["format"] == 2 and manifest["revoked"] == []
    assert manifest["files"]["server_public_key"] == "keys/server.pub"
    server = manifest["server"]
    assert public_b64(read_public_key(out / "keys/server.pub")) == server["public_key"]
    for party in [server, *manifest["devices"]]:
        key = SigningKey.from_file(party.get("id", "server"), out / party["signing_key_file"])
        assert public_b64(key.public_bytes) == party["public_key"]
    assert [d["signing_key_file"] for d in manifest["devices"]] == [f"keys/devices/dev-{i}.key" for i in range(3)]
    assert len({d["public_key"] for d in manifest["devices"]} | {server["public_key"]}) == 4
    # the server's key ring takes them as they are: a device's signature verifies under its own id only
    ring = Keyring.from_fleet_json(out / "fleet.json")
    assert ring.ids == ["dev-0", "dev-1", "dev-2", "server"]
    digest = signed_digest([b"a frame"])
    signature = SigningKey.from_file("dev-1", out / "keys/devices/dev-1.key").sign(digest)
    ring.verify("dev-1", digest, signature)
    with pytest.raises(ValueError, match="does not match"):
        ring.verify("dev-2", digest, signature)


def test_the_ca_key_is_dropped_unless_asked_for(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # Execute: the default, then --write-ca-key
    assert main(["fleet", "provision", "--devices", "1", "--out", str(tmp_path / "plain")]) == 0
    assert "cannot issue new certificates" in capsys.readouterr().out
    assert main(["fleet", "provision", "--devices", "1", "--out", str(tmp_path / "kept"), "--write-ca-key"]) == 0
    # Assert: no key anywhere in the first, and the README says what that means; the second's key is the CA's
    plain = tmp_path / "plain"
    assert not list(plain.rglob("ca.key")) and "ca_key" not in json.loads((plain / "fleet.json").read_text())["files"]
    assert "no other certificate can be issued" in (plain / "README.txt").read_text()
    kept = tmp_path / "kept"
    assert stat.S_IMODE((kept / "ca.key").stat().st_mode) == 0o600
    assert json.loads((kept / "fleet.json").read_text())["files"]["ca_key"] == "ca.key"
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    ca = x509.load_pem_x509_certificate((kept / "ca.crt").read_bytes())
    assert load_pem_private_key((kept / "ca.key").read_bytes(), None).public_key() == ca.public_key()


def test_a_folder_others_may_write_into_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # Prepare: an existing, empty --out that others may write; a parent that others may write, not sticky
    shared_out, open_parent, sticky_parent = tmp_path / "shared-out", tmp_path / "open", tmp_path / "sticky"
    for folder, mode in [(shared_out, 0o777), (open_parent, 0o777), (sticky_parent, 0o1777)]:  # sticky: like /tmp
        folder.mkdir()
        folder.chmod(mode)
    # Execute / Assert: both refused before anything is written, with the reason; a sticky parent is fine
    assert main(["fleet", "provision", "--devices", "1", "--out", str(shared_out)]) == 2
    assert "writable by group or others (mode 0777)" in capsys.readouterr().err
    assert list(shared_out.iterdir()) == []
    assert main(["fleet", "provision", "--devices", "1", "--out", str(open_parent / "a" / "fleet")]) == 2
    assert f"{open_parent} is writable by group or others and not sticky" in capsys.readouterr().err
    assert list(open_parent.iterdir()) == []
    with pytest.raises(PermissionError):
        provision(FleetSpec(devices=1, out=open_parent / "fleet"))
    provision(FleetSpec(devices=1, out=sticky_parent / "fleet"))
    assert stat.S_IMODE((sticky_parent / "fleet").stat().st_mode) == 0o700


def test_a_two_device_acl_is_exactly_this(tmp_path: Path) -> None:
    provision(FleetSpec(devices=2, out=tmp_path / "fleet", run_id="r1"))
    assert (tmp_path / "fleet" / "broker" / "acl").read_text() == TWO_DEVICE_ACL


def test_the_server_certificate_is_signed_by_the_ca_for_both_loopback_forms(tmp_path: Path) -> None:
    out = tmp_path / "fleet"
    provision(FleetSpec(devices=1, out=out, port=18883))
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((out / "broker" / "server.crt").read_bytes())
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
        MosquittoBroker(tmp_path / "b", conf=out / "broker/mosquitto.conf")


def test_the_broker_limits_follow_from_the_frame_size_and_the_fleet(tmp_path: Path) -> None:
    # Prepare: the frame size senders chunk to, the same by default on both sides
    assert DEFAULT_MAX_FRAME_BYTES == BrokerSection().max_frame_bytes == 262144
    longest_publish = 1 + 4 + 2 + len(Topics("r" * 64).status("d" * 64)) + 2 + 1  # protocol.md 1.6
    # Execute
    provision(FleetSpec(devices=2, out=tmp_path / "fleet"))
    provision(FleetSpec(devices=2, out=tmp_path / "big", max_frame_bytes=1024 * 1024))
    # Assert: the conf says what BrokerLimits works out, which is these numbers
    assert publish_overhead_bytes() == longest_publish == 157 and SIGNATURE_BLOCK_MAX_BYTES == 1 + 1 + 64 + 64
    limits = BrokerLimits.for_fleet(2, 262144)
    assert limits == BrokerLimits(max_packet_size=262144 + 130 + 157 + 1024, max_queued_messages=3 * (512 + 8),
                                  max_inflight_messages=20, max_connections=2 * 3 + 16)
    conf = (tmp_path / "fleet/broker/mosquitto.conf").read_text().splitlines()
    for line in ["max_packet_size 263455", "max_queued_messages 1560", "max_inflight_messages 20",
                 "max_connections 22"]:
        assert line in conf
    assert json.loads((tmp_path / "fleet/fleet.json").read_text())["broker_limits"]["max_packet_size"] == 263455
    big = (tmp_path / "big/broker/mosquitto.conf").read_text().splitlines()
    assert "max_packet_size 1049887" in big and "max_queued_messages 408" in big  # 3 * (128 + 8)
    # 10,000 devices: every one may reconnect while its old connection lingers, and every one may queue a burst
    assert BrokerLimits.for_fleet(10_000, 262144).max_connections == 20_018
    assert BrokerLimits.for_fleet(10_000, 262144).max_queued_messages == 10_001 * 520
    assert BrokerLimits.for_fleet(2, 4096).max_inflight_messages == 1221  # 5 MB in flight at 4 KiB frames
    with pytest.raises(ValueError, match="--max-frame-bytes must be in 1024"):
        FleetSpec(devices=1, out=tmp_path / "x", max_frame_bytes=512).check()


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
    right = read_password_file(named / "credentials/devices/dev-0.password")
    with MosquittoBroker(tmp_path / "named-broker", conf=named / "broker/mosquitto.conf", port=port):
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
        **fleet.server_overrides(),
    ))
    # Execute
    server = start_server(config)
    devices = [
        start_device(quick_bundle, fleet.url, f"dev-{i}", shard, seed=i, rounds=2,
                     extra=fleet.device_args(f"dev-{i}"))
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


# ---------------------------------------------------------------- limits, ciphers, revocation


class Probe:
    """A bare paho MQTT 5 client (no chunking, no reconnects) that records what the broker does."""

    def __init__(self, port: int, ca_file: str, username: str, password: str) -> None:
        self.connack, self.disconnect, self.received = threading.Event(), threading.Event(), []
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=username, protocol=paho.MQTTv5,
                                  reconnect_on_failure=False)
        self.client.tls_set(ca_certs=ca_file)
        self.client.username_pw_set(username, password)
        self.client.on_connect = lambda c, u, flags, reason, props: self._first("connack", props)
        self.client.on_disconnect = lambda c, u, flags, reason, props: self._first("disconnect", reason)
        self.client.on_message = lambda c, u, msg: self.received.append((msg.topic, len(msg.payload)))
        self.client.connect(HOST, port, keepalive=10)
        self.client.loop_start()
        assert self.connack.wait(5.0), f"no CONNACK for {username}"

    def _first(self, name: str, what: object) -> None:
        """Keep the first: after the broker's DISCONNECT paho also reports the socket closing."""
        if not getattr(self, name).is_set():
            setattr(self, f"{name}_seen", what)
            getattr(self, name).set()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def wait_for(condition, timeout_s: float = 5.0) -> bool:
    """Poll ``condition`` until it holds or ``timeout_s`` passes (a failure guard: milliseconds suffice)."""
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    return bool(condition())


def test_the_broker_takes_the_largest_legitimate_frame_and_drops_a_client_that_sends_more(tmp_path: Path) -> None:
    # Prepare: 64-character run and device ids, so the status topic is the longest any publish uses
    run, port, out = "r" * 64, free_port(), tmp_path / "fleet"
    provision(FleetSpec(devices=1, out=out, run_id=run, device_prefix="d" * 63, port=port))
    manifest = json.loads((out / "fleet.json").read_text())
    device, limit = manifest["devices"][0]["id"], manifest["broker_limits"]["max_packet_size"]
    topic = Topics(run).status(device)
    assert len(device) == 64 and len(topic) == 147
    framing = 2 + len(topic) + 2 + 1  # mosquitto checks remaining length + 1 <= limit (measured)
    with MosquittoBroker(tmp_path / "broker", conf=out / "broker/mosquitto.conf", port=port) as broker:
        server = Probe(port, str(out / "ca.crt"), SERVER_USERNAME,
                       read_password_file(out / "credentials/server.password"))
        dev = Probe(port, str(out / "ca.crt"), device, read_password_file(out / manifest["devices"][0]["password_file"]))
        try:
            assert (dev.connack_seen.MaximumPacketSize, dev.connack_seen.ReceiveMaximum) == (limit, 20)
            server.client.subscribe(Topics(run).all_devices("status"), qos=1)
            time.sleep(0.3)  # the SUBACK (a control: the largest frame below does arrive)
            # Execute: the largest frame a sender makes (a signed max-size chunk), the limit, one byte more
            sizes = [DEFAULT_MAX_FRAME_BYTES + SIGNATURE_BLOCK_MAX_BYTES, limit - 1 - framing, limit - framing]
            for count, size in enumerate(sizes, start=1):
                dev.client.publish(topic, b"x" * size, qos=1)
                wait_for(lambda: len(server.received) == count or dev.disconnect.is_set())
            # Assert: the first two arrive whole; the third closes the sender's connection, and nobody gets it
            assert server.received == [(topic, sizes[0]), (topic, sizes[1])]
            assert wait_for(dev.disconnect.is_set)
            # the broker's DISCONNECT "Packet too large", or paho's "Unspecified error" when the socket closed first
            assert dev.disconnect_seen.value in (0x95, 0x80), dev.disconnect_seen
            assert "disconnected due to oversize packet" in broker.log_tail(100_000)
            time.sleep(QUIET_S)
            assert len(server.received) == 2 and server.client.is_connected()
        finally:
            server.close()
            dev.close()


def tls12_handshake(port: int, ca_file: str, cipher: str) -> str:
    """The suite a TLS 1.2 handshake offering only ``cipher`` agrees on (ssl.SSLError when none)."""
    context = ssl.create_default_context(cafile=ca_file)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(cipher)
    with socket.create_connection((HOST, port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname=HOST) as tls:
            return tls.cipher()[0]


def test_tls_1_2_takes_only_aead_suites(fleet: LocalFleet) -> None:
    # Assert: AES-GCM and ChaCha20-Poly1305 are agreed on; CBC suites (without the conf's `ciphers`, taken) are not
    for cipher in ("ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-ECDSA-CHACHA20-POLY1305"):
        assert tls12_handshake(fleet.port, fleet.ca, cipher) == cipher
    for cipher in ("ECDHE-ECDSA-AES128-SHA256", "ECDHE-ECDSA-AES256-SHA", "ECDHE-ECDSA-AES128-SHA"):
        with pytest.raises(ssl.SSLError, match="HANDSHAKE_FAILURE"):
            tls12_handshake(fleet.port, fleet.ca, cipher)
    assert "no shared cipher" in fleet.broker.log_tail(100_000)
    link = fleet.link("dev-0")  # the devices' own client offers the same list, and gets in
    try:
        assert link._client.socket().cipher()[0] in ("TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256",
                                                     "TLS_AES_128_GCM_SHA256")  # TLS 1.3 where both have it
    finally:
        link.close()


def test_revoke_takes_the_device_out_of_every_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # Prepare
    out = tmp_path / "fleet"
    provision(FleetSpec(devices=3, out=out, run_id="r1"))
    before = json.loads((out / "fleet.json").read_text())
    # Execute
    assert main(["fleet", "revoke", "--fleet", str(out), "--device", "dev-1"]) == 0
    printed = capsys.readouterr().out
    # Assert: passwd, acl and the key list as if dev-1 had never been provisioned; its secrets gone
    assert [line.split(":")[0] for line in (out / "broker/passwd").read_text().splitlines()] == [
        SERVER_USERNAME, "dev-0", "dev-2"]
    assert (out / "broker/acl").read_text() == acl_text("r1", ["dev-0", "dev-2"])
    assert not (out / "credentials/devices/dev-1.password").exists() and not (out / "keys/devices/dev-1.key").exists()
    assert (out / "keys/devices/dev-2.key").exists()
    after = json.loads((out / "fleet.json").read_text())
    assert [d["id"] for d in after["devices"]] == ["dev-0", "dev-2"]
    [entry] = after["revoked"]
    assert entry["id"] == "dev-1" and entry["public_key"] == before["devices"][1]["public_key"]
    assert entry["revoked_at"].endswith("+00:00")
    assert Keyring.from_fleet_json(out / "fleet.json").ids == ["dev-0", "dev-2", "server"]
    # modes kept, no temporary files left beside them
    for rel, mode in [("broker/passwd", 0o600), ("broker/acl", 0o600), ("fleet.json", 0o644)]:
        assert stat.S_IMODE((out / rel).stat().st_mode) == mode, rel
    assert sorted(p.name for p in (out / "broker").iterdir()) == [
        "acl", "ca.crt", "mosquitto.conf", "passwd", "server.crt", "server.key"]
    assert "kill -HUP <mosquitto pid>" in printed and f"device_keys is {out.resolve() / 'fleet.json'}" in printed


def test_revoke_refuses_unknown_and_revoked_devices_and_a_pid_that_is_not_mosquitto(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "fleet"
    provision(FleetSpec(devices=3, out=out, run_id="r1"))
    revoke(out, "dev-1")
    snapshot = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(RevokeError, match="was revoked already, at 20"):
        revoke(out, "dev-1")
    assert main(["fleet", "revoke", "--fleet", str(out), "--device", "dev_2"]) == 2
    assert "no device 'dev_2'" in (err := capsys.readouterr().err) and "(did you mean 'dev-2'?)" in err
    assert main(["fleet", "revoke", "--fleet", str(out), "--device", "dev-2", "--broker-pid", str(os.getpid())]) == 2
    assert "not mosquitto" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == snapshot  # nothing changed
    with pytest.raises(RevokeError, match="is .* a provisioned fleet"):
        revoke(tmp_path, "dev-0")  # no fleet.json there
    (tmp_path / "fleet.json").write_text('{"format": 1, "devices": []}')
    with pytest.raises(RevokeError, match="is format 1, revoke needs format 2 .* provision the fleet again"):
        revoke(tmp_path, "dev-0")


def test_a_revoked_device_is_shut_out_once_the_broker_rereads_its_files(fleet: LocalFleet) -> None:
    # Prepare: dev-1 is connected
    password = {d: read_password_file(fleet.password_file(d)) for d in ("dev-0", "dev-1")}
    live = Probe(fleet.port, fleet.ca, "dev-1", password["dev-1"])
    try:
        # Execute: revoke with the CLI, which SIGHUPs the broker
        assert main(["fleet", "revoke", "--fleet", str(fleet.dir), "--device", "dev-1",
                     "--broker-pid", str(fleet.broker.proc.pid)]) == 0
        # Assert: its live connection is dropped, its logins refused; dev-0 still gets in
        assert wait_for(live.disconnect.is_set)
    finally:
        live.close()
    reason = connack(fleet.port, "dev-1", password["dev-1"], ca_file=fleet.ca)
    assert reason is not None and reason.value == 0x87, reason  # not authorized
    assert not connack(fleet.port, "dev-0", password["dev-0"], ca_file=fleet.ca).is_failure
    assert fleet.broker.running and "Reloading config." in fleet.broker.log_tail(100_000)
