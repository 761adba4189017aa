"""A provisioned TLS fleet with its broker running on loopback: for tests, benchmarks and trying
a fleet out (``sflam fleet provision`` is the product; this runs what it writes)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sflam.fleet import SERVER_USERNAME, FleetSpec, add_user, provision


@dataclass(frozen=True)
class LocalFleet:
    """A provisioned fleet and a mosquitto running its config on loopback (tests, benchmarks, trying it out).

    ``with local_fleet(workdir, devices=2, run_id="r") as fleet:`` provisions into ``workdir/fleet``,
    starts the broker, and stops it at the end; ``fleet.server_config()`` and
    ``fleet.device_args(id)`` are what a server's run.toml and ``sflam device`` need to log in.
    """

    dir: Path
    url: str
    broker: object  # sflam.broker.MosquittoBroker

    @property
    def ca(self) -> str:
        return str(self.dir / "ca.crt")

    @property
    def port(self) -> int:
        return int(self.broker.port)

    def password_file(self, user: str) -> Path:
        if user == SERVER_USERNAME:
            return self.dir / "server.password"
        device = self.dir / "devices" / f"{user}.password"
        return device if device.exists() else self.dir / f"{user}.password"

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

    def device_args(self, device_id: str) -> tuple[str, ...]:
        """The ``sflam device`` arguments that log ``device_id`` in (besides --broker)."""
        return ("--ca-file", self.ca, "--username", device_id, "--password-file", str(self.password_file(device_id)))


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
    url = json.loads((out / "fleet.json").read_text())["broker_url"]
    with MosquittoBroker(Path(workdir) / "broker", conf=out / "mosquitto.conf", port=port) as broker:
        yield LocalFleet(out.resolve(), url, broker)
