"""Two findings of a security review, each kept fixed by a test.

1. Credentials (or a CA file) with a plaintext ``mqtt://`` URL to a host that is not loopback are
   refused before anything connects, by the link, ``sflam device`` and the server's run.toml check,
   unless the user opts in (``--insecure-plaintext`` / ``broker.insecure_plaintext = true``).
2. The server's subscriptions are not shared: a device that subscribes to ``$share/<group>/...``
   cannot take the devices' uplink away from the server (protocol.md 1.5).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from edge_runtime.commands import plaintext_opt_in
from edge_runtime.mqtt import LinkConfig, MqttLink, PlaintextSecretsError, is_loopback
from edge_runtime.protocol.topics import Topics
from sflam.cli import build_parser, main
from sflam.fleet import SERVER_USERNAME
from sflam.testing.local_fleet import local_fleet
from server_runtime.config import BrokerSection, ConfigError, RunConfig, parse_config

REMOTE = "192.0.2.1"  # TEST-NET-1: nothing is contacted, the refusal comes first
RUN = "R"
T = Topics(RUN)
MESSAGES = 20
QUIET_S = 1.0  # how long "nothing more arrives" is watched for, after the messages did arrive
SERVER_ROOT = Path(__file__).resolve().parents[1] / "server_runtime"


@pytest.fixture()
def connects(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Every paho connect attempt (host, port), recorded instead of made."""
    calls: list[tuple] = []
    monkeypatch.setattr(paho.Client, "connect", lambda self, host, port=1883, *a, **k: calls.append((host, port)))
    return calls


# ---------------------------------------------------------------- 1. credentials over plaintext


@pytest.mark.parametrize("url", [f"mqtt://{REMOTE}:1883", f"tcp://{REMOTE}", "mqtt://[2001:db8::1]:1883",
                                 "mqtt://broker.example", "mqtt://127.0.0.1.example"])
@pytest.mark.parametrize("given", [{"username": "dev-0", "password": "s3cret"}, {"username": "dev-0"},
                                   {"ca_file": "ca.crt"}])
def test_credentials_to_a_remote_plaintext_broker_are_refused_before_connecting(
        url: str, given: dict, connects: list) -> None:
    # Execute
    with pytest.raises(PlaintextSecretsError) as caught:
        MqttLink(url, LinkConfig(client_id="dev-0", **given)).start(0.5)

    # Assert: a ValueError (the CLI shows its message), saying what to do; nothing was contacted
    message = str(caught.value)
    assert isinstance(caught.value, ValueError)
    assert "in the clear" in message and "use mqtts://" in message and "--insecure-plaintext" in message
    assert "broker.insecure_plaintext = true" in message and "s3cret" not in message
    assert connects == []


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "localhost", "LOCALHOST.", "[::1]", "[::ffff:127.0.0.1]"])
def test_credentials_to_a_loopback_plaintext_broker_are_allowed(host: str, connects: list) -> None:
    # Execute
    link = MqttLink(f"mqtt://{host}:1", LinkConfig(client_id="dev-0", username="dev-0", password="pw"))

    # Assert
    assert is_loopback(link.address.host)
    assert link.config.username == "dev-0"


@pytest.mark.parametrize("url", [f"mqtts://{REMOTE}", f"mqtt://{REMOTE}"])
def test_tls_or_the_insecure_opt_in_allows_credentials_to_a_remote_broker(url: str, connects: list) -> None:
    # Prepare
    insecure = url.startswith("mqtt://")

    # Execute
    link = MqttLink(url, LinkConfig(client_id="dev-0", username="dev-0", password="pw", insecure_plaintext=insecure))

    # Assert
    assert link.address.host == REMOTE and link.address.tls is not insecure


def test_a_remote_plaintext_broker_without_credentials_is_allowed(connects: list) -> None:
    # Execute / Assert: anonymous plaintext (the simulator's kernel links) has no secret to leak
    assert MqttLink(f"mqtt://{REMOTE}", LinkConfig(client_id="dev-0")).address.host == REMOTE


def test_a_ca_file_that_mqtt_would_ignore_on_loopback_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    # Execute
    with caplog.at_level(logging.WARNING, logger="edge_runtime.mqtt"):
        MqttLink("mqtt://127.0.0.1:1", LinkConfig(client_id="dev-0", ca_file="fleet/ca.crt"))
        MqttLink("mqtt://127.0.0.1:1", LinkConfig(client_id="dev-1", username="dev-1", password="pw"))

    # Assert: one warning, for the link given a CA file
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["ca_file fleet/ca.crt is ignored: mqtt://127.0.0.1:1 does not use TLS (mqtts:// does)"]


def _device_args(broker: str, *extra: str) -> list[str]:
    return ["device", "--bundle", "b", "--broker", broker, "--device-id", "dev-0", "--data", "npz:x", *extra]


def test_sflam_device_refuses_a_password_file_over_plaintext_unless_told_otherwise() -> None:
    # Prepare
    parse = build_parser().parse_args
    secrets = ("--username", "dev-0", "--password-file", "dev-0.password")

    # Execute
    with pytest.raises(PlaintextSecretsError) as caught:
        plaintext_opt_in(parse(_device_args(f"mqtt://{REMOTE}", *secrets)))

    # Assert: the message names the options given and both ways out
    assert str(caught.value).startswith(f"--username and --password-file given for the plaintext broker URL "
                                        f"mqtt://{REMOTE}:1883")
    assert str(caught.value).endswith("use mqtts:// (TLS), or pass --insecure-plaintext on a network you trust")
    assert plaintext_opt_in(parse(_device_args(f"mqtt://{REMOTE}", *secrets, "--insecure-plaintext"))) is True
    assert plaintext_opt_in(parse(_device_args("mqtt://127.0.0.1", *secrets))) is False
    assert plaintext_opt_in(parse(_device_args(f"mqtts://{REMOTE}", *secrets, "--ca-file", "ca.crt"))) is False
    assert parse(_device_args(f"mqtt://{REMOTE}")).insecure_plaintext is False


def _run_toml(url: str, *extra: str) -> str:
    """A run.toml whose [broker] logs in with a password file; ``extra`` lines follow in [broker]."""
    return "\n".join(["[broker]", f'url = "{url}"', 'username = "sflam-server"',
                      'password_file = "server.password"', *extra])


def _problems(text: str) -> list[str]:
    """Every problem of a run.toml text (none: it is valid)."""
    try:
        parse_config(text, "run.toml")
    except ConfigError as exc:
        return exc.problems
    return []


def _about_the_broker(problems: list[str]) -> list[str]:
    """The broker's problems; other sections' rules (a fleet's [security], say) are tested elsewhere."""
    return [problem for problem in problems if problem.startswith("broker.")]


def test_the_server_config_lists_credentials_over_plaintext_with_its_other_problems() -> None:
    # Execute
    problems = _problems(_run_toml("mqtt://10.0.0.5:1883", "[training]", "rounds = 0"))

    # Assert: listed with the file's other problems, saying what to do
    assert any(problem.startswith("training.rounds: must be an integer >= 1") for problem in problems)
    assert _about_the_broker(problems) == [
        "broker.url: broker.username and broker.password_file given for the plaintext broker URL "
        "mqtt://10.0.0.5:1883: MQTT without TLS sends the username and password in the clear, and ignores a CA "
        "file; use mqtts:// (TLS), or set broker.insecure_plaintext = true on a network you trust"]


@pytest.mark.parametrize(("url", "extra"), [("mqtt://10.0.0.5:1883", "insecure_plaintext = true"),
                                            ("mqtts://10.0.0.5:8883", 'ca_file = "ca.crt"'),
                                            ("mqtt://127.0.0.1:1883", ""), ("mqtt://[::1]:1883", "")])
def test_the_server_config_accepts_tls_loopback_or_the_opt_in(url: str, extra: str) -> None:
    # Execute / Assert
    assert _about_the_broker(_problems(_run_toml(url, extra))) == []


def test_the_opt_in_survives_writing_run_toml() -> None:
    # Prepare
    config = RunConfig().replace(broker=BrokerSection(url="mqtt://10.0.0.5:1883", ca_file="ca.crt",
                                                      insecure_plaintext=True))

    # Execute / Assert
    assert "insecure_plaintext = true" in config.to_toml()
    assert parse_config(config.to_toml()) == config
    assert RunConfig.from_dict(config.to_dict()) == config
    assert RunConfig().broker.insecure_plaintext is False


def test_sflam_server_check_fails_with_the_problem(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # Prepare
    path = tmp_path / "run.toml"
    path.write_text(_run_toml("mqtt://10.0.0.5:1883", 'ca_file = "ca.crt"', "[training]", "rounds = 0"))

    # Execute
    code = main(["server", "--config", str(path), "--check"])

    # Assert: exit status 2, every problem listed (the rounds one too)
    err = capsys.readouterr().err
    assert code == 2 and " problems:\n  - " in err and "training.rounds" in err
    assert "broker.username and broker.password_file and broker.ca_file given for the plaintext broker URL" in err


# ---------------------------------------------------------------- 2. shared subscriptions


def test_the_server_runtime_makes_no_shared_subscription() -> None:
    # Execute: every subscription of the daemon and the trainer ranks is built in server_runtime/
    hits = [f"{path.name}:{n}" for path in sorted(SERVER_ROOT.rglob("*.py"))
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
            if re.search(r"\$share|\.shared\(", line)]

    # Assert
    assert hits == []


@pytest.mark.broker
@pytest.mark.parametrize("server_filter", [T.all_devices("up"), T.up("dev-0")], ids=["daemon", "rank"])
def test_a_device_in_a_share_group_takes_nothing_from_the_server(server_filter: str, tmp_path: Path) -> None:
    # Prepare: the server subscribes as the daemon (d/+/up) or a trainer rank (its devices' up) does;
    # dev-1 joins a shared group over every device's uplink, the group a shared server would use
    with local_fleet(tmp_path, devices=2, run_id=RUN) as fleet:
        server, sender, thief = fleet.link(SERVER_USERNAME), fleet.link("dev-0"), fleet.link("dev-1")
        try:
            server.subscribe([server_filter], timeout_s=5.0)
            thief.subscribe([T.shared("sflam-server", "up"), T.shared("g", "up")], timeout_s=5.0)

            # Execute
            for i in range(MESSAGES):
                sender.publish(T.up("dev-0"), b"step %d" % i)

            # Assert: the server got every message, in order; the device none
            received = [m.payload for m in iter(lambda: server.get(QUIET_S), None)]
            assert received == [b"step %d" % i for i in range(MESSAGES)]
            assert thief.get(0.2) is None
        finally:
            for link in (sender, thief, server):
                link.close()
