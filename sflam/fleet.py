"""``sflam fleet provision``: everything a TLS-only, per-device-authenticated broker needs.

One call writes, into a new directory: a CA and a server certificate signed by it (ECDSA P-256),
a random password per device and for the server, mosquitto's password file (``$7$`` PBKDF2-SHA512,
hashed here so ``mosquitto_passwd`` is not needed), an ACL that confines each device to its own
topics (docs/protocol.md section 1), a ``mosquitto.conf`` with one TLS listener and no anonymous access,
a ``fleet.json`` manifest and a README with the commands. docs/security.md has the threat model.
Everything is generated in memory first, then written; secrets are created 0600 (never widened).
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import hashlib
import ipaddress
import json
import os
import pwd
import re
import secrets
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from edge_runtime.protocol.topics import Topics, check_id
from sflam.fleet_pki import issue_certificates
from sflam_common.problems import ProblemsError

SERVER_USERNAME = "sflam-server"
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
MAX_DEVICES = 100_000
MAX_DAYS = 36_500
PASSWORD_BYTES = 24  # 192 random bits: key stretching adds nothing, so mosquitto's default count is enough
PBKDF2_ITERATIONS = 101  # mosquitto_passwd's default (PW_DEFAULT_ITERATIONS)
PBKDF2_SALT_BYTES = 12  # mosquitto_passwd's salt length
SECRET_MODE, PUBLIC_MODE = 0o600, 0o644
_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


@dataclass(frozen=True)
class FleetSpec:
    """What to provision; ``check()`` lists every problem at once."""

    devices: int
    out: Path
    hostnames: tuple[str, ...] = ("127.0.0.1",)
    run_id: str = "default"
    device_prefix: str = "dev-"
    port: int = 8883
    days: int = 365
    bind: str | None = None  # listener address; None: loopback for loopback names, else every interface
    broker_user: str | None = None  # who mosquitto runs as when started as root; None: whoever provisions

    def check(self) -> None:
        """ProblemsError (a ValueError) naming every bad field."""
        problems = []
        if isinstance(self.devices, bool) or not isinstance(self.devices, int) or not 1 <= self.devices <= MAX_DEVICES:
            problems.append(f"--devices must be a whole number in 1..{MAX_DEVICES}, got {self.devices!r}")
        if not 1 <= self.port <= 65535:
            problems.append(f"--port must be in 1..65535, got {self.port}")
        if not 1 <= self.days <= MAX_DAYS:
            problems.append(f"--days must be in 1..{MAX_DAYS}, got {self.days}")
        problems.append(_id_problem(self.run_id, "--run-id"))
        if isinstance(self.devices, int) and 1 <= self.devices <= MAX_DEVICES:
            problems.append(_id_problem(self.device_ids()[-1], "--device-prefix + index (the device id)"))
        problems += [f"--hostname {h!r}: not an IP address or DNS name" for h in self.hostnames if not _is_hostname(h)]
        if not self.hostnames:
            problems.append("at least one --hostname is needed")
        if self.bind is not None and not _is_hostname(self.bind):
            problems.append(f"--bind {self.bind!r}: not an IP address or DNS name")
        if self.broker_user is not None and not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}", self.broker_user):
            problems.append(f"--broker-user {self.broker_user!r}: not a user name")
        problems = [p for p in problems if p]
        if problems:
            raise ProblemsError("fleet provision", problems)

    def device_ids(self) -> list[str]:
        """``dev-0 .. dev-{N-1}``, indices zero-padded to one width (dev-00 .. dev-10 for 11)."""
        width = len(str(self.devices - 1))
        return [f"{self.device_prefix}{i:0{width}d}" for i in range(self.devices)]

    @property
    def listen_address(self) -> str | None:
        """Where the listener binds: --bind, else 127.0.0.1 when every name is loopback, else all (None)."""
        if self.bind is not None:
            return self.bind
        return "127.0.0.1" if all(h in LOOPBACK_NAMES for h in self.hostnames) else None

    @property
    def run_as(self) -> str:
        """The ``user`` mosquitto switches to when started as root: it must be able to read the 0600 files."""
        return self.broker_user or pwd.getpwuid(os.geteuid()).pw_name

    @property
    def broker_url(self) -> str:
        host = self.hostnames[0]
        return f"mqtts://[{host}]:{self.port}" if ":" in host else f"mqtts://{host}:{self.port}"


@dataclass
class FleetFiles:
    """Every file of a provisioned fleet (bytes and mode), keyed by its path relative to the directory."""

    spec: FleetSpec
    files: dict[str, tuple[bytes, int]] = field(default_factory=dict)  # path -> (content, mode)

    def add(self, path: str, content: str | bytes, mode: int = PUBLIC_MODE) -> None:
        self.files[path] = (content.encode() if isinstance(content, str) else content, mode)


# ---------------------------------------------------------------- pieces


def mosquitto_hash(password: str, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS) -> str:
    """A mosquitto 2 password-file hash: ``$7$iterations$b64(salt)$b64(PBKDF2-HMAC-SHA512)``."""
    salt = secrets.token_bytes(PBKDF2_SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def acl_text(run_id: str, device_ids: list[str]) -> str:
    """mosquitto acl_file: the server owns the run's prefix; device d writes d/up, d/status, reads d/down, plan, model."""
    t = Topics(run_id)
    lines = [f"# sflam fleet ACL for run {run_id!r}: users not listed here (and anonymous clients) get nothing.",
             "", f"user {SERVER_USERNAME}", f"topic readwrite {t.prefix}/#"]
    for device_id in device_ids:
        lines += ["", f"user {device_id}", f"topic write {t.up(device_id)}", f"topic write {t.status(device_id)}",
                  f"topic read {t.down(device_id)}", f"topic read {t.retained_filter('plan')}",
                  f"topic read {t.retained_filter('model')}"]
    return "\n".join(lines) + "\n"


def mosquitto_conf_text(spec: FleetSpec, root: Path) -> str:
    """One TLS listener (TLS 1.2+), passwords + ACL, no anonymous access, no persistence, TCP_NODELAY."""
    address = spec.listen_address
    listener = f"listener {spec.port} {address}" if address else f"listener {spec.port}"
    return "\n".join([
        f"# sflam fleet broker for run {spec.run_id!r} ({spec.broker_url}); start: mosquitto -c {root / 'mosquitto.conf'}",
        "# Paths are absolute: provision again rather than move this directory.",
        "# started as root, mosquitto switches to this user, who must be able to read the 0600 files here",
        f"user {spec.run_as}",
        "per_listener_settings false",
        "allow_anonymous false",
        f"password_file {root / 'passwd'}",
        f"acl_file {root / 'acl'}",
        "persistence false",
        "set_tcp_nodelay true",
        "log_dest stderr",
        "",
        listener,
        "protocol mqtt",
        f"cafile {root / 'ca.crt'}",
        f"certfile {root / 'server.crt'}",
        f"keyfile {root / 'server.key'}",
        "tls_version tlsv1.2",
        "require_certificate false",
        "# a device cannot take over another's session (or kick it off) by reusing its client id",
        "use_username_as_clientid true",
    ]) + "\n"


def _id_problem(value: str, what: str) -> str | None:
    try:
        check_id(value, what)
    except ValueError as exc:
        return str(exc)
    return None


def _is_hostname(name: str) -> bool:
    """An IP address, or a DNS name of 1-253 characters in labels of letters, digits and inner hyphens."""
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        pass
    return 0 < len(name) <= 253 and all(_DNS_LABEL.fullmatch(label) for label in name.rstrip(".").split("."))


# ---------------------------------------------------------------- building and writing


def build(spec: FleetSpec, root: Path) -> FleetFiles:
    """Every file of the fleet, in memory; ``root`` is the absolute directory the conf will name."""
    spec.check()
    if not root.is_absolute() or any(c in str(root) for c in "\r\n"):
        raise ValueError(f"the fleet directory must be an absolute path on one line (mosquitto.conf names it): {root!r}")
    fleet = FleetFiles(spec)
    pki = issue_certificates(_subject_names(spec.hostnames), spec.days)
    fleet.add("ca.key", pki.ca_key, SECRET_MODE)
    fleet.add("ca.crt", pki.ca_cert)
    fleet.add("server.key", pki.server_key, SECRET_MODE)
    fleet.add("server.crt", pki.server_cert)
    passwd = []
    for username, path in [(SERVER_USERNAME, "server.password")] + [(d, f"devices/{d}.password")
                                                                      for d in spec.device_ids()]:
        password = secrets.token_urlsafe(PASSWORD_BYTES)
        fleet.add(path, password + "\n", SECRET_MODE)
        passwd.append(f"{username}:{mosquitto_hash(password)}")
    fleet.add("passwd", "\n".join(passwd) + "\n", SECRET_MODE)  # mosquitto >= 2.0.16 warns on readable ones
    fleet.add("acl", acl_text(spec.run_id, spec.device_ids()), SECRET_MODE)
    fleet.add("mosquitto.conf", mosquitto_conf_text(spec, root))
    fleet.add("fleet.json", json.dumps(manifest(spec, pki.not_after), indent=2) + "\n")
    fleet.add("README.txt", readme_text(spec, root, pki.not_after))
    return fleet


def _subject_names(hostnames: tuple[str, ...]) -> list[str]:
    """The certificate's names: the given ones, plus every loopback form when any is loopback."""
    names = list(dict.fromkeys(hostnames))
    if any(h in LOOPBACK_NAMES for h in hostnames):
        names += [h for h in LOOPBACK_NAMES if h not in names]
    return names


def manifest(spec: FleetSpec, not_after: dt.datetime) -> dict:
    """fleet.json: what was provisioned and where each file is (paths relative to the directory)."""
    return {
        "format": 1,
        "run_id": spec.run_id,
        "topics_prefix": Topics(spec.run_id).prefix,
        "broker_url": spec.broker_url,
        "hostnames": list(spec.hostnames),
        "listen": {"address": spec.listen_address or "*", "port": spec.port},
        "certificates_not_after": not_after.isoformat(),
        "server": {"username": SERVER_USERNAME, "password_file": "server.password"},
        "devices": [{"id": d, "username": d, "password_file": f"devices/{d}.password"} for d in spec.device_ids()],
        "files": {"ca_cert": "ca.crt", "ca_key": "ca.key", "server_cert": "server.crt", "server_key": "server.key",
                  "passwd": "passwd", "acl": "acl", "mosquitto_conf": "mosquitto.conf"},
    }


def readme_text(spec: FleetSpec, root: Path, not_after: dt.datetime) -> str:
    """How to start the broker, the server and each device with these files."""
    ids = spec.device_ids()
    span, conf = _span(ids), shlex.quote(str(root / "mosquitto.conf"))
    return f"""sflam fleet for run {spec.run_id!r}: {_span(ids, count=True)}, broker {spec.broker_url}
Certificates expire {not_after:%Y-%m-%d}. See docs/security.md for what this protects and what it does not.

1. Broker (mosquitto 2.x; paths in mosquitto.conf are absolute, so keep this directory where it is):
   mosquitto -c {conf}

2. Server: in the run's TOML file
   [broker]
   url = "{spec.broker_url}"
   run_id = "{spec.run_id}"
   username = "{SERVER_USERNAME}"
   password_file = {json.dumps(str(root / "server.password"))}
   ca_file = {json.dumps(str(root / "ca.crt"))}
   then: sflam server --config run.toml

3. Each device gets ca.crt and its own devices/<id>.password, nothing else; from this directory:
   sflam device --bundle BUNDLE --data npz:SHARD.npz --run-id {spec.run_id} --device-id {ids[0]} \\
       --broker {spec.broker_url} --ca-file ca.crt --username {ids[0]} --password-file devices/{ids[0]}.password
   (likewise for every id in {span})

ca.key signs certificates the devices will trust: keep it offline, not on the broker.
The broker needs ca.crt, server.crt, server.key, passwd, acl and mosquitto.conf. Started as root,
mosquitto switches to user {spec.run_as!r} (`user` in mosquitto.conf), who must be able to read them
(server.key, passwd and acl are 0600): provision as that user, or chown them to it.
"""


def _span(ids: list[str], count: bool = False) -> str:
    """``dev-0 .. dev-9`` (``10 devices (dev-0 .. dev-9)`` with ``count``)."""
    span = ids[0] if len(ids) == 1 else f"{ids[0]} .. {ids[-1]}"
    return f"{len(ids)} device{'s' if len(ids) > 1 else ''} ({span})" if count else span


def _refuse_existing(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty directory; provision into a new one")


def write(fleet: FleetFiles, out: Path) -> None:
    """Create ``out`` (0700; refused when it exists and is not empty) and write every file with its mode."""
    _refuse_existing(out)
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    for rel, (content, mode) in fleet.files.items():
        path = out / rel
        path.parent.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)  # never wider than mode ...
        os.fchmod(fd, mode)  # ... nor narrower, whatever the umask
        with os.fdopen(fd, "wb") as f:
            f.write(content)


def provision(spec: FleetSpec) -> FleetFiles:
    """Build the fleet and write it into ``spec.out``; returns what was written."""
    root = spec.out.resolve()
    _refuse_existing(root)  # before spending time on keys
    fleet = build(spec, root)
    write(fleet, root)
    return fleet


def cmd_fleet_provision(args: argparse.Namespace) -> int:
    """``sflam fleet provision``: write the fleet's files and print where they are."""
    spec = FleetSpec(
        devices=args.devices, out=Path(args.out), hostnames=tuple(args.hostname or ("127.0.0.1",)),
        run_id=args.run_id, device_prefix=args.device_prefix, port=args.port, days=args.days, bind=args.bind,
        broker_user=args.broker_user,
    )
    provision(spec)
    root = spec.out.resolve()
    ids = spec.device_ids()
    print(f"provisioned {_span(ids, count=True)} for run {spec.run_id!r} in {root}")
    print(f"broker: {spec.broker_url}   start it with: mosquitto -c {shlex.quote(str(root / 'mosquitto.conf'))}")
    if spec.run_as == "root":
        print("warning: mosquitto.conf says `user root`, so a broker started as root keeps root privileges; "
              "provision as an unprivileged user or pass --broker-user (and chown the files to it)", file=sys.stderr)
    print(f"next steps: {root / 'README.txt'}")
    return 0


def add_user(fleet_dir: Path, username: str, acl_lines: list[str]) -> Path:
    """Give a provisioned fleet one more broker user (a fresh password, ``acl_lines`` as its rules);
    returns its password file. Takes effect when mosquitto (re)starts. For tools and tests that
    need an identity the provisioning does not make (a monitor, an attacker with chosen rights)."""
    problem = _id_problem(username, "username")
    if problem:
        raise ValueError(problem)
    password = secrets.token_urlsafe(PASSWORD_BYTES)
    path = fleet_dir / f"{username}.password"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, SECRET_MODE)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(password + "\n")
    with open(fleet_dir / "passwd", "a", encoding="utf-8") as f:
        f.write(f"{username}:{mosquitto_hash(password)}\n")
    with open(fleet_dir / "acl", "a", encoding="utf-8") as f:
        f.write(f"\nuser {username}\n" + "".join(line + "\n" for line in acl_lines))
    return path
