"""``sflam fleet provision``: everything a TLS-only, per-device-authenticated broker needs.

One call writes, into a new directory (layout in :mod:`sflam.fleet_layout`): a CA and a server
certificate signed by it (ECDSA P-256; the CA's key is kept only with ``--write-ca-key``), a
random password per device and for the server, an Ed25519 signing key per device and for the
server (:mod:`sflam.fleet_keys`), mosquitto's password file (``$7$`` PBKDF2-SHA512, hashed here so
``mosquitto_passwd`` is not needed), an ACL that confines each device to its own topics
(docs/protocol.md section 1), a ``mosquitto.conf`` with one TLS listener, no anonymous access and
limits sized for the fleet (:mod:`sflam.fleet_broker`), a ``fleet.json`` manifest and a README
with the commands. docs/security.md has the threat model. Everything is generated in memory
first, then written; secrets are created 0600 (never widened), folders 0700, and a folder others
may write into is refused.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import os
import pwd
import re
import secrets
import shlex
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path

from edge_runtime.mqtt import DEFAULT_MAX_FRAME_BYTES
from edge_runtime.protocol.signing import write_secret
from edge_runtime.protocol.topics import Topics, check_id
from sflam import fleet_layout as layout
from sflam.fleet_broker import SERVER_USERNAME, BrokerLimits, acl_text, mosquitto_conf_text, mosquitto_hash
from sflam.fleet_keys import FleetKeys, generate_keys
from sflam.fleet_pki import issue_certificates
from sflam_common.problems import ProblemsError

__all__ = ["SERVER_USERNAME", "FleetFiles", "FleetSpec", "add_user", "build", "check_location", "cmd_fleet_provision",
           "manifest", "mosquitto_hash", "provision", "readme_text", "write"]

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
MAX_DEVICES = 100_000
MAX_DAYS = 36_500
MIN_FRAME_BYTES = 1024  # what server_runtime.config accepts for broker.max_frame_bytes
MAX_FRAME_BYTES = 256 * 1024 * 1024 - 4096  # an MQTT packet holds at most 256 MiB, framing included
PASSWORD_BYTES = 24  # 192 random bits: key stretching adds nothing, so mosquitto's default count is enough
SECRET_MODE, PUBLIC_MODE, DIR_MODE = 0o600, 0o644, 0o700
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
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES  # what senders chunk to: sizes the broker's max_packet_size
    write_ca_key: bool = False  # keep the CA's private key (ca.key); otherwise it is dropped once it has signed

    def check(self) -> None:
        """ProblemsError (a ValueError) naming every bad field."""
        problems = []
        if isinstance(self.devices, bool) or not isinstance(self.devices, int) or not 1 <= self.devices <= MAX_DEVICES:
            problems.append(f"--devices must be a whole number in 1..{MAX_DEVICES}, got {self.devices!r}")
        if not 1 <= self.port <= 65535:
            problems.append(f"--port must be in 1..65535, got {self.port}")
        if not 1 <= self.days <= MAX_DAYS:
            problems.append(f"--days must be in 1..{MAX_DAYS}, got {self.days}")
        if not MIN_FRAME_BYTES <= self.max_frame_bytes <= MAX_FRAME_BYTES:
            problems.append(f"--max-frame-bytes must be in {MIN_FRAME_BYTES}..{MAX_FRAME_BYTES}, "
                            f"got {self.max_frame_bytes}")
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
    def limits(self) -> BrokerLimits:
        """The broker's limits for this many devices and this frame size."""
        return BrokerLimits.for_fleet(self.devices, self.max_frame_bytes)

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


# ---------------------------------------------------------------- checks


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


# ---------------------------------------------------------------- building


def build(spec: FleetSpec, root: Path) -> FleetFiles:
    """Every file of the fleet, in memory; ``root`` is the absolute directory the conf will name."""
    spec.check()
    if not root.is_absolute() or any(c in str(root) for c in "\r\n"):
        raise ValueError(f"the fleet directory must be an absolute path on one line (mosquitto.conf names it): {root!r}")
    fleet = FleetFiles(spec)
    pki = issue_certificates(_subject_names(spec.hostnames), spec.days, keep_ca_key=spec.write_ca_key)
    if pki.ca_key is not None:
        fleet.add(layout.CA_KEY, pki.ca_key, SECRET_MODE)
    fleet.add(layout.CA_CERT, pki.ca_cert)
    fleet.add(layout.BROKER_CA_CERT, pki.ca_cert)
    fleet.add(layout.SERVER_TLS_KEY, pki.server_key, SECRET_MODE)
    fleet.add(layout.SERVER_CERT, pki.server_cert)
    _add_passwords(fleet)
    keys = generate_keys(spec.device_ids())
    for path, pem, secret in keys.files:
        fleet.add(path, pem, SECRET_MODE if secret else PUBLIC_MODE)
    fleet.add(layout.ACL, acl_text(spec.run_id, spec.device_ids()), SECRET_MODE)
    fleet.add(layout.MOSQUITTO_CONF, _conf_text(spec, root))
    fleet.add(layout.MANIFEST, json.dumps(manifest(spec, pki.not_after, keys), indent=2) + "\n")
    fleet.add(layout.README, readme_text(spec, root, pki.not_after))
    return fleet


def _add_passwords(fleet: FleetFiles) -> None:
    """A random password file for the server and each device, and mosquitto's passwd with their hashes."""
    users = [(SERVER_USERNAME, layout.SERVER_PASSWORD)] + [(d, layout.device_password(d))
                                                           for d in fleet.spec.device_ids()]
    passwd = []
    for username, path in users:
        password = secrets.token_urlsafe(PASSWORD_BYTES)
        fleet.add(path, password + "\n", SECRET_MODE)
        passwd.append(f"{username}:{mosquitto_hash(password)}")
    fleet.add(layout.PASSWD, "\n".join(passwd) + "\n", SECRET_MODE)  # mosquitto >= 2.0.16 warns on readable ones


def _conf_text(spec: FleetSpec, root: Path) -> str:
    address = spec.listen_address
    listener = f"listener {spec.port} {address}" if address else f"listener {spec.port}"
    return mosquitto_conf_text(root, run_id=spec.run_id, broker_url=spec.broker_url, run_as=spec.run_as,
                               listener=listener, limits=spec.limits)


def _subject_names(hostnames: tuple[str, ...]) -> list[str]:
    """The certificate's names: the given ones, plus every loopback form when any is loopback."""
    names = list(dict.fromkeys(hostnames))
    if any(h in LOOPBACK_NAMES for h in hostnames):
        names += [h for h in LOOPBACK_NAMES if h not in names]
    return names


def manifest(spec: FleetSpec, not_after: dt.datetime, keys: FleetKeys) -> dict:
    """fleet.json: what was provisioned, every party's public key, and where each file is (paths
    relative to the directory). ``sflam fleet revoke`` moves a device from "devices" to "revoked"."""
    files = {"ca_cert": layout.CA_CERT, "server_cert": layout.SERVER_CERT, "server_key": layout.SERVER_TLS_KEY,
             "broker_ca_cert": layout.BROKER_CA_CERT, "passwd": layout.PASSWD, "acl": layout.ACL,
             "mosquitto_conf": layout.MOSQUITTO_CONF, "server_public_key": layout.SERVER_PUBLIC_KEY}
    if spec.write_ca_key:
        files["ca_key"] = layout.CA_KEY
    limits = spec.limits
    return {
        "format": layout.MANIFEST_FORMAT,
        "run_id": spec.run_id,
        "topics_prefix": Topics(spec.run_id).prefix,
        "broker_url": spec.broker_url,
        "hostnames": list(spec.hostnames),
        "listen": {"address": spec.listen_address or "*", "port": spec.port},
        "certificates_not_after": not_after.isoformat(),
        "broker_limits": {"max_frame_bytes": spec.max_frame_bytes, "max_packet_size": limits.max_packet_size,
                          "max_queued_messages": limits.max_queued_messages,
                          "max_inflight_messages": limits.max_inflight_messages,
                          "max_connections": limits.max_connections},
        "server": {"username": SERVER_USERNAME, "password_file": layout.SERVER_PASSWORD,
                   "public_key": keys.server_public, "signing_key_file": layout.SERVER_SIGNING_KEY},
        "devices": [{"id": d, "username": d, "password_file": layout.device_password(d),
                     "public_key": keys.device_public[d], "signing_key_file": layout.device_signing_key(d)}
                    for d in spec.device_ids()],
        "revoked": [],
        "files": files,
    }


def readme_text(spec: FleetSpec, root: Path, not_after: dt.datetime) -> str:
    """How to start the broker, the server and each device with these files."""
    ids = spec.device_ids()
    span, conf = _span(ids), shlex.quote(str(root / layout.MOSQUITTO_CONF))
    return f"""sflam fleet for run {spec.run_id!r}: {_span(ids, count=True)}, broker {spec.broker_url}
Certificates expire {not_after:%Y-%m-%d}. See docs/security.md for what this protects and what it does not.

1. Broker (mosquitto 2.x; paths in mosquitto.conf are absolute, so keep this directory where it is):
   mosquitto -c {conf}

2. Server: in the run's TOML file
   [broker]
   url = "{spec.broker_url}"
   run_id = "{spec.run_id}"
   username = "{SERVER_USERNAME}"
   password_file = {json.dumps(str(root / layout.SERVER_PASSWORD))}
   ca_file = {json.dumps(str(root / layout.CA_CERT))}
   max_frame_bytes = {spec.max_frame_bytes}

   [security]
   signing = "ed25519"
   signing_key = {json.dumps(str(root / layout.SERVER_SIGNING_KEY))}
   device_keys = {json.dumps(str(root / layout.MANIFEST))}
   then: sflam server --config run.toml

3. Each device gets ca.crt, {layout.SERVER_PUBLIC_KEY}, and its own {layout.device_password('<id>')} and
   {layout.device_signing_key('<id>')}, nothing else; from this directory:
   sflam device --bundle BUNDLE --data npz:SHARD.npz --run-id {spec.run_id} --device-id {ids[0]} \\
       --broker {spec.broker_url} --ca-file ca.crt --username {ids[0]} \\
       --password-file {layout.device_password(ids[0])} \\
       --signing-key {layout.device_signing_key(ids[0])} --server-key {layout.SERVER_PUBLIC_KEY}
   (likewise for every id in {span})

4. To revoke a device: sflam fleet revoke --fleet {shlex.quote(str(root))} --device ID [--broker-pid PID]

{_ca_key_note(spec, not_after)}
The broker needs {layout.BROKER_DIR}/ and nothing else. Started as root, mosquitto switches to user
{spec.run_as!r} (`user` in mosquitto.conf), who must be able to read {layout.BROKER_DIR}/ (0700) and its
server.key, passwd and acl (0600): provision as that user, or chown {layout.BROKER_DIR}/ and its files to it.
{layout.CREDENTIALS_DIR}/ and {layout.KEYS_DIR}/ are for the server and the devices; the broker never reads them.
"""


def _ca_key_note(spec: FleetSpec, not_after: dt.datetime) -> str:
    if spec.write_ca_key:
        return (f"{layout.CA_KEY} signs certificates the devices will trust: move it offline now, "
                "off the broker and the devices.")
    return ("The CA's private key was not kept (--write-ca-key keeps it): no other certificate can be issued "
            f"under this CA.\nBefore {not_after:%Y-%m-%d}, or to change host names, provision a new fleet.")


def _span(ids: list[str], count: bool = False) -> str:
    """``dev-0 .. dev-9`` (``10 devices (dev-0 .. dev-9)`` with ``count``)."""
    span = ids[0] if len(ids) == 1 else f"{ids[0]} .. {ids[-1]}"
    return f"{len(ids)} device{'s' if len(ids) > 1 else ''} ({span})" if count else span


# ---------------------------------------------------------------- writing


def check_location(out: Path) -> None:
    """PermissionError when others could swap the fleet's files: ``out`` exists and is group- or
    other-writable, or the folder it is (to be) made in is, without the sticky bit (/tmp has it)."""
    if out.exists() and stat.S_IMODE(out.stat().st_mode) & (stat.S_IWGRP | stat.S_IWOTH):
        raise PermissionError(f"{out} is writable by group or others (mode {_mode(out):04o}): they could replace "
                              f"the broker's files or its keys; chmod go-w it, or provision into another folder")
    parent = out.parent
    while not parent.exists():  # the nearest folder that exists; provision makes the rest
        parent = parent.parent
    mode = parent.stat().st_mode
    if mode & (stat.S_IWGRP | stat.S_IWOTH) and not mode & stat.S_ISVTX:
        raise PermissionError(f"{parent} is writable by group or others and not sticky (mode {_mode(parent):04o}): "
                              f"they could rename {out.name} and put their own files in its place; chmod go-w it "
                              f"(or +t), or provision into a folder of your own")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _refuse_existing(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty directory; provision into a new one")


def write(fleet: FleetFiles, out: Path) -> None:
    """Create ``out`` and its folders (0700; refused when it exists and is not empty) and write every
    file with its mode."""
    _refuse_existing(out)
    out.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    for folder in (out, *(out / d for d in layout.PRIVATE_DIRS)):
        folder.mkdir(mode=DIR_MODE, exist_ok=True)
        os.chmod(folder, DIR_MODE)  # whatever the umask
    for rel, (content, mode) in fleet.files.items():
        fd = os.open(out / rel, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)  # never wider than mode ...
        os.fchmod(fd, mode)  # ... nor narrower, whatever the umask
        with os.fdopen(fd, "wb") as f:
            f.write(content)


def provision(spec: FleetSpec) -> FleetFiles:
    """Build the fleet and write it into ``spec.out``; returns what was written."""
    root = spec.out.resolve()
    check_location(root)
    _refuse_existing(root)  # before spending time on keys
    fleet = build(spec, root)
    write(fleet, root)
    return fleet


def cmd_fleet_provision(args: argparse.Namespace) -> int:
    """``sflam fleet provision``: write the fleet's files and print where they are."""
    spec = FleetSpec(
        devices=args.devices, out=Path(args.out), hostnames=tuple(args.hostname or ("127.0.0.1",)),
        run_id=args.run_id, device_prefix=args.device_prefix, port=args.port, days=args.days, bind=args.bind,
        broker_user=args.broker_user, max_frame_bytes=args.max_frame_bytes or DEFAULT_MAX_FRAME_BYTES,
        write_ca_key=args.write_ca_key,
    )
    provision(spec)
    root = spec.out.resolve()
    limits = spec.limits
    print(f"provisioned {_span(spec.device_ids(), count=True)} for run {spec.run_id!r} in {root}")
    print(f"broker: {spec.broker_url}   start it with: mosquitto -c {shlex.quote(str(root / layout.MOSQUITTO_CONF))}")
    print(f"broker limits: max_packet_size {limits.max_packet_size} (frames of {spec.max_frame_bytes} bytes), "
          f"max_queued_messages {limits.max_queued_messages}, max_inflight_messages {limits.max_inflight_messages}, "
          f"max_connections {limits.max_connections}")
    if not spec.write_ca_key:
        print("the CA's private key was not kept: this fleet cannot issue new certificates (--write-ca-key keeps it)")
    if spec.run_as == "root":
        print("warning: mosquitto.conf says `user root`, so a broker started as root keeps root privileges; "
              "provision as an unprivileged user or pass --broker-user (and chown the files to it)", file=sys.stderr)
    print(f"next steps: {root / layout.README}")
    return 0


def add_user(fleet_dir: Path, username: str, acl_lines: list[str]) -> Path:
    """Give a provisioned fleet one more broker user (a fresh password, ``acl_lines`` as its rules);
    returns its password file. Takes effect when mosquitto (re)starts. For tools and tests that
    need an identity the provisioning does not make (a monitor, an attacker with chosen rights)."""
    problem = _id_problem(username, "username")
    if problem:
        raise ValueError(problem)
    password = secrets.token_urlsafe(PASSWORD_BYTES)
    path = fleet_dir / layout.user_password(username)
    write_secret(path, (password + "\n").encode())
    with open(fleet_dir / layout.PASSWD, "a", encoding="utf-8") as f:
        f.write(f"{username}:{mosquitto_hash(password)}\n")
    with open(fleet_dir / layout.ACL, "a", encoding="utf-8") as f:
        f.write(f"\nuser {username}\n" + "".join(line + "\n" for line in acl_lines))
    return path
