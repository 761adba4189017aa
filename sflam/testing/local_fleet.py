"""A provisioned TLS fleet with its broker running on loopback: for tests, benchmarks and trying
a fleet out (``sflam fleet provision`` is the product; this runs what it writes)."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from edge_runtime.protocol.signing import SERVER_KEY_ID
from sflam import fleet_layout as layout
from sflam.fleet import SERVER_USERNAME, FleetSpec, add_user, provision


@dataclass(frozen=True)
class LocalFleet:
    """A provisioned fleet and a mosquitto running its config on loopback (tests, benchmarks, trying it out).

    ``with local_fleet(workdir, devices=2, run_id="r") as fleet:`` provisions into ``workdir/fleet``,
    starts the broker, and stops it at the end; ``fleet.server_config()`` and
    ``fleet.security_config()`` are the ``[broker]`` and ``[security]`` keys of a server's run.toml
    (``fleet.server_overrides()`` both, as ``section__key`` overrides), ``fleet.device_args(id)``
    what ``sflam device`` needs to log in and sign (``device_key_args(id)`` the signing part).
    """

    dir: Path
    url: str
    broker: object  # sflam.broker.MosquittoBroker

    @property
    def ca(self) -> str:
        return str(self.dir / layout.CA_CERT)

    @property
    def port(self) -> int:
        return int(self.broker.port)

    @property
    def server_public_key(self) -> Path:
        """The server's Ed25519 public key (PEM): what every device verifies the server's frames with."""
        return self.dir / layout.SERVER_PUBLIC_KEY

    @property
    def manifest(self) -> Path:
        """fleet.json: every party's public key (the server's ``device_keys``)."""
        return self.dir / layout.MANIFEST

    def password_file(self, user: str) -> Path:
        if user == SERVER_USERNAME:
            return self.dir / layout.SERVER_PASSWORD
        device = self.dir / layout.device_password(user)
        return device if device.exists() else self.dir / layout.user_password(user)

    def signing_key(self, user: str) -> Path:
        """The Ed25519 private key (PEM, 0600) of a device, or of the server (``sflam-server`` or ``server``)."""
        if user in (SERVER_USERNAME, SERVER_KEY_ID):
            return self.dir / layout.SERVER_SIGNING_KEY
        return self.dir / layout.device_signing_key(user)

    def link(self, user: str):
        """A started ``edge_runtime.mqtt.MqttLink`` logged in as ``user`` (the caller closes it). The
        provisioned broker takes the user name as the client id: a second link of one user replaces
        the first."""
        from edge_runtime.mqtt import LinkConfig, MqttLink, read_password_file

        config = LinkConfig(client_id=user, ca_file=self.ca,
                            username=user, password=read_password_file(self.password_file(user)), timeout_s=5.0)
        link = MqttLink(self.url, config)
        link.start()
        return link

    def server_config(self) -> dict[str, str]:
        """The ``[broker]`` keys of a server's run.toml (besides url and run_id)."""
        return {"username": SERVER_USERNAME, "password_file": str(self.password_file(SERVER_USERNAME)),
                "ca_file": self.ca}

    def revoke(self, device_id: str) -> None:
        """``sflam fleet revoke`` the device and SIGHUP the broker, which then re-reads passwd and acl,
        drops the device's connection and refuses its logins (a moment after this returns)."""
        from sflam.fleet_revoke import revoke

        revoke(self.dir, device_id)
        os.kill(self.broker.proc.pid, signal.SIGHUP)

    def security_config(self) -> dict[str, str]:
        """The ``[security]`` keys of a server's run.toml: sign with the server's key, check the
        devices' against fleet.json."""
        return {"signing": "ed25519", "signing_key": str(self.signing_key(SERVER_USERNAME)),
                "device_keys": str(self.manifest)}

    def server_overrides(self) -> dict[str, str]:
        """``server_config()`` and ``security_config()`` as ``broker__key`` / ``security__key`` overrides."""
        return {**{f"broker__{k}": v for k, v in self.server_config().items()},
                **{f"security__{k}": v for k, v in self.security_config().items()}}

    def device_args(self, device_id: str) -> tuple[str, ...]:
        """The ``sflam device`` arguments that log ``device_id`` in and make it sign (besides --broker)."""
        return (*self.login_args(device_id), *self.device_key_args(device_id))

    def login_args(self, device_id: str) -> tuple[str, ...]:
        """The ``sflam device`` arguments that log ``device_id`` in, and nothing else."""
        return ("--ca-file", self.ca, "--username", device_id, "--password-file", str(self.password_file(device_id)))

    def device_key_args(self, device_id: str) -> tuple[str, ...]:
        """The ``sflam device`` arguments that make ``device_id`` sign its frames and check the server's."""
        return ("--signing-key", str(self.signing_key(device_id)), "--server-key", str(self.server_public_key))


@contextmanager
def local_fleet(workdir: Path, devices: int, run_id: str,
                extra_users: dict[str, list[str]] | None = None) -> Iterator[LocalFleet]:
    """Provision ``devices`` devices (plus ``extra_users``: name -> ACL lines) into ``workdir/fleet``
    and run mosquitto on it on a free loopback port until the block ends (see LocalFleet)."""
    from sflam.broker import MosquittoBroker, free_port

    port = free_port()
    out = Path(workdir) / "fleet"
    provision(FleetSpec(devices=devices, out=out, run_id=run_id, port=port))
    for user, rules in (extra_users or {}).items():
        add_user(out.resolve(), user, rules)
    url = json.loads((out / layout.MANIFEST).read_text())["broker_url"]
    with MosquittoBroker(Path(workdir) / "broker", conf=out / layout.MOSQUITTO_CONF, port=port) as broker:
        yield LocalFleet(out.resolve(), url, broker)
