"""``sflam fleet revoke``: take one device out of a provisioned fleet.

It removes the device's line from ``broker/passwd`` and its block from ``broker/acl``, deletes its
password file and its signing key, and moves its fleet.json entry from "devices" to "revoked"
(with the time). Every file is replaced atomically (a temporary file in the same folder, synced,
then renamed over the old one, with the old one's mode and owner), so mosquitto re-reading passwd
and acl on SIGHUP, or a server reloading fleet.json, sees the old file or the new one, never half
of one. fleet.json changes last: a revoke that was cut short can be run again to finish.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sflam import fleet_layout as layout
from sflam_common.problems import did_you_mean


class RevokeError(ValueError):
    """A revocation that cannot be made: an unknown or already revoked device, an old or foreign fleet.json."""


@dataclass(frozen=True)
class Revocation:
    """What ``revoke`` did: the device, when, and the files it deleted (relative to the fleet)."""

    device_id: str
    revoked_at: str
    deleted: tuple[str, ...]


def revoke(fleet_dir: Path, device_id: str, now: dt.datetime | None = None) -> Revocation:
    """Revoke ``device_id`` in the fleet at ``fleet_dir`` (see the module docstring)."""
    doc = read_manifest(fleet_dir)
    entry = _listed_device(doc, device_id, fleet_dir / layout.MANIFEST)
    passwd, acl = fleet_dir / layout.PASSWD, fleet_dir / layout.ACL
    replace_file(passwd, passwd_without(passwd.read_text(encoding="utf-8"), device_id).encode())
    replace_file(acl, acl_without(acl.read_text(encoding="utf-8"), device_id).encode())
    deleted = []
    for rel in (layout.device_password(device_id), layout.device_signing_key(device_id)):
        path = fleet_dir / rel
        if path.exists():
            path.unlink()
            deleted.append(rel)
    when = (now or dt.datetime.now(dt.timezone.utc)).replace(microsecond=0).isoformat()
    doc["devices"] = [d for d in doc["devices"] if d.get("id") != device_id]
    doc["revoked"].append({"id": device_id, "username": entry.get("username", device_id),
                           "public_key": entry.get("public_key"), "revoked_at": when})
    replace_file(fleet_dir / layout.MANIFEST, (json.dumps(doc, indent=2) + "\n").encode())
    return Revocation(device_id, when, tuple(deleted))


def read_manifest(fleet_dir: Path) -> dict:
    """The fleet's fleet.json; RevokeError when it is missing, unreadable, or not format 2."""
    path = fleet_dir / layout.MANIFEST
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise RevokeError(f"{path}: {exc.strerror or exc} (is {fleet_dir} a provisioned fleet?)") from None
    except ValueError as exc:
        raise RevokeError(f"{path}: not JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != layout.MANIFEST_FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else None
        raise RevokeError(f"{path} is format {found!r}, revoke needs format {layout.MANIFEST_FORMAT} (a fleet with "
                          f"signing keys and its broker files under {layout.BROKER_DIR}/): provision the fleet again")
    if not isinstance(doc.get("devices"), list) or not isinstance(doc.get("revoked"), list):
        raise RevokeError(f"{path} has no \"devices\" and \"revoked\" lists")
    return doc


def _listed_device(doc: dict, device_id: str, path: Path) -> dict:
    """The device's entry in "devices"; RevokeError naming it as revoked already, or as unknown."""
    for entry in doc["revoked"]:
        if isinstance(entry, dict) and entry.get("id") == device_id:
            raise RevokeError(f"device {device_id!r} was revoked already, at {entry.get('revoked_at')}")
    for entry in doc["devices"]:
        if isinstance(entry, dict) and entry.get("id") == device_id:
            return entry
    known = [d.get("id") for d in doc["devices"] if isinstance(d, dict)]
    raise RevokeError(f"no device {device_id!r} in {path}{did_you_mean(device_id, known)}")


def passwd_without(text: str, username: str) -> str:
    """mosquitto's password file without ``username``'s line."""
    return "".join(line for line in text.splitlines(keepends=True) if line.split(":", 1)[0] != username)


def acl_without(text: str, username: str) -> str:
    """mosquitto's acl_file without ``username``'s block (its ``user`` line up to the next one)."""
    kept, skipping = [], False
    for line in text.splitlines():
        if line.startswith("user "):
            skipping = line[len("user "):].strip() == username
        if not skipping:
            kept.append(line)
    while kept and not kept[-1].strip():
        kept.pop()
    return "\n".join(kept) + "\n"


def replace_file(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically, keeping its mode and owner (PermissionError when
    its owner is another user and we may not give the new file to them)."""
    old = path.stat()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), stat.S_IMODE(old.st_mode))
            if (old.st_uid, old.st_gid) != (os.geteuid(), os.getegid()):
                _give(f.fileno(), path, old)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)  # the rename itself survives a crash
    finally:
        os.close(folder)


def _give(fd: int, path: Path, old: os.stat_result) -> None:
    try:
        os.fchown(fd, old.st_uid, old.st_gid)
    except PermissionError:
        raise PermissionError(f"{path} belongs to uid {old.st_uid} (gid {old.st_gid}), and a replacement made here "
                              f"could not be given to it: run sflam fleet revoke as that user or as root") from None


def check_broker_pid(pid: int) -> None:
    """RevokeError unless ``pid`` is a mosquitto process (where /proc tells): SIGHUP ends most others."""
    comm = Path(f"/proc/{pid}/comm")
    if not Path("/proc/self").exists():
        return  # no procfs: trust the caller
    try:
        name = comm.read_text().strip()
    except OSError:
        raise RevokeError(f"--broker-pid {pid}: no such process") from None
    if name != "mosquitto":
        raise RevokeError(f"--broker-pid {pid} is {name!r}, not mosquitto; give the broker's PID")


def cmd_fleet_revoke(args: argparse.Namespace) -> int:
    """``sflam fleet revoke``: revoke one device, print what changed and what to do next."""
    fleet_dir = Path(args.fleet).resolve()
    if args.broker_pid is not None:
        check_broker_pid(args.broker_pid)  # before anything changes
    done = revoke(fleet_dir, args.device)
    print(f"revoked {done.device_id} at {done.revoked_at}: fleet.json lists it under \"revoked\"; its lines are gone "
          f"from {layout.PASSWD} and {layout.ACL}")
    for rel in done.deleted:
        print(f"deleted {rel}")
    if args.broker_pid is not None:
        os.kill(args.broker_pid, signal.SIGHUP)
        print(f"sent SIGHUP to mosquitto (pid {args.broker_pid}): it re-reads passwd and acl, drops "
              f"{done.device_id}'s connection and refuses its logins")
    else:
        print(f"next: kill -HUP <mosquitto pid> (or --broker-pid PID) to make the broker re-read passwd and acl; "
              f"until then {done.device_id} can still log in")
    print(f"a server whose [security] device_keys is {fleet_dir / layout.MANIFEST} reloads it by itself and "
          f"refuses {done.device_id}'s signatures from then on")
    return 0
