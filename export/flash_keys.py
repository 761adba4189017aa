"""A provisioned device's signing keys for ``sflam flash --fleet DIR --device-id ID``.

``sflam fleet provision`` writes every device's Ed25519 private key and the server's public key
into the fleet directory and lists them in ``fleet.json``. A flash installs one device's pair in
the bundle, where ``sflam device`` looks for them (:mod:`edge_runtime.device_keys`):
``keys/device.key`` (0600, in a 0700 ``keys/``) and ``keys/server.pub``. They are not in the
bundle's manifest, so the hash checks (``verify hashes``, ``launch.sh --check``) neither see nor
need them.

This module reads and checks the fleet's files and writes the device-side shell lines; the steps
that carry them are built in :mod:`export.flash`. Key bytes travel only on a step's stdin (a tar
stream over ssh) or by ``adb push`` from the file: never in an argv, a message or the log.
"""

from __future__ import annotations

import json
import shlex
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from edge_runtime.device_keys import BUNDLE_DEVICE_KEY, BUNDLE_SERVER_KEY
from edge_runtime.protocol.signing import KeyFileError, SigningKey, public_b64, read_public_key
from sflam_common.problems import did_you_mean

FLEET_MANIFEST = "fleet.json"
FLEET_SERVER_KEY = "keys/server.pub"  # where provisioning puts it when fleet.json's "files" does not say
KEYS_DIR = str(PurePosixPath(BUNDLE_DEVICE_KEY).parent)
KEY_MODE_MARK = "sflam-key-mode="
INSTALL_STEP, PROTECT_STEP = "install keys", "protect keys"
SHOWN_IDS = 5  # known device ids an "unknown device" error lists


class FleetKeyError(ValueError):
    """Keys that a flash will not install: the fleet, the device or the key file is wrong; says which."""


@dataclass(frozen=True)
class DeviceKeys:
    """One device's private signing key and the server's public key, as files of a provisioned fleet."""

    device_id: str
    signing_key: Path
    server_key: Path

    @property
    def members(self) -> tuple[tuple[str, Path], ...]:
        """(name in the installed bundle, local file): the private key, then the server's key."""
        return (BUNDLE_DEVICE_KEY, self.signing_key), (BUNDLE_SERVER_KEY, self.server_key)

    @property
    def note(self) -> str:
        """What the key step reads, for ``--dry-run`` (file names only)."""
        return f"tar of {self.signing_key} as {BUNDLE_DEVICE_KEY} and {self.server_key} as {BUNDLE_SERVER_KEY}"


def keys_from_options(fleet: str | None, device_id: str | None) -> DeviceKeys | None:
    """The keys ``--fleet DIR --device-id ID`` name (the two go together); None without either."""
    if (fleet is None) != (device_id is None):
        given, missing = ("--fleet", "--device-id") if fleet is not None else ("--device-id", "--fleet")
        raise FleetKeyError(f"{given} needs {missing}: --fleet DIR --device-id ID install that provisioned "
                            "device's signing keys; give both, or neither")
    return None if fleet is None else fleet_device_keys(Path(fleet), device_id)


def fleet_device_keys(fleet_dir: Path, device_id: str) -> DeviceKeys:
    """``device_id``'s key files in a provisioned fleet, checked; FleetKeyError says what is wrong."""
    fleet_dir = Path(fleet_dir)
    doc = _read_fleet(fleet_dir / FLEET_MANIFEST)
    entry = _device_entry(doc, device_id, fleet_dir / FLEET_MANIFEST)
    signing_key = _fleet_file(fleet_dir, entry.get("signing_key_file"), f"device {device_id!r}'s signing_key_file")
    files = doc.get("files") if isinstance(doc.get("files"), dict) else {}
    server_key = _fleet_file(fleet_dir, files.get("server_public_key", FLEET_SERVER_KEY), "the server's public key")
    _check_private(signing_key)
    _check_keys(device_id, (signing_key, entry), (server_key, doc.get("server")))
    return DeviceKeys(device_id, signing_key, server_key)


def _read_fleet(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise FleetKeyError(f"{path}: {exc.strerror or exc} (is {path.parent} a fleet from `sflam fleet "
                            "provision`?)") from None
    except ValueError as exc:
        raise FleetKeyError(f"{path}: not JSON ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("devices"), list):
        raise FleetKeyError(f"{path} has no \"devices\" list; provision the fleet again with this version")
    return doc


def _entries(doc: dict, key: str) -> list[dict]:
    """The dict entries of a fleet.json list ("devices", "revoked"); a bare string is an id."""
    listed = doc.get(key) if isinstance(doc.get(key), list) else []
    return [e if isinstance(e, dict) else {"id": e} for e in listed if isinstance(e, (dict, str))]


def _device_entry(doc: dict, device_id: str, path: Path) -> dict:
    for entry in _entries(doc, "revoked"):
        if entry.get("id") == device_id:
            when = f" at {entry['revoked_at']}" if entry.get("revoked_at") else ""
            raise FleetKeyError(f"device {device_id!r} was revoked{when} ({path} lists it under \"revoked\"): "
                                "its keys are not flashed; give the board a new device id")
    for entry in _entries(doc, "devices"):
        if entry.get("id") == device_id:
            return entry
    known = [e["id"] for e in _entries(doc, "devices") if isinstance(e.get("id"), str)]
    more = f" and {len(known) - SHOWN_IDS} more" if len(known) > SHOWN_IDS else ""
    listed = f"known ids: {', '.join(known[:SHOWN_IDS])}{more}" if known else "it lists no devices"
    raise FleetKeyError(f"no device {device_id!r} in {path}{did_you_mean(device_id, known)}; {listed}")


def _fleet_file(fleet_dir: Path, relative: object, what: str) -> Path:
    """A file that fleet.json names relative to the fleet directory (and inside it)."""
    parts = PurePosixPath(relative).parts if isinstance(relative, str) else ()
    if not parts or PurePosixPath(relative).is_absolute() or ".." in parts:
        raise FleetKeyError(f"{fleet_dir / FLEET_MANIFEST}: {what} {relative!r} is not a path inside the fleet")
    path = fleet_dir.joinpath(*parts)
    if not path.is_file():
        raise FleetKeyError(f"{what} {path} is missing; was the fleet provisioned completely?")
    return path.resolve()  # the file itself: tar would send a symbolic link as a link


def _check_private(path: Path) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise FleetKeyError(f"signing key {path} is open to group or others (mode {mode:04o}): not flashed; "
                            "chmod 600 it, and consider the key exposed if others could read it")


def _check_keys(device_id: str, device: tuple[Path, dict], server: tuple[Path, object]) -> None:
    """Both files parse as Ed25519 keys and match the public keys fleet.json lists (where it does)."""
    try:
        public = {"device": SigningKey.from_file(device_id, device[0]).public_bytes,
                  "server": read_public_key(server[0])}
    except KeyFileError as exc:
        raise FleetKeyError(str(exc)) from None
    for who, (path, entry) in (("device", device), ("server", server)):
        listed = entry.get("public_key") if isinstance(entry, dict) else None
        if isinstance(listed, str) and listed != public_b64(public[who]):
            raise FleetKeyError(f"{path} does not match the {who} public key in {FLEET_MANIFEST}; "
                                "the fleet directory is inconsistent: provision it again")


def ssh_install_command(path: str) -> str:
    """The device's shell line of the ssh key step: unpack the tar on stdin into ``path``/keys and
    insist on 0700/0600, failing where the file system does not keep modes (the device would refuse)."""
    q, folder, key = shlex.quote(path), KEYS_DIR, BUNDLE_DEVICE_KEY
    modes = f'[ "$(stat -c %a {folder})" = 700 ] && [ "$(stat -c %a {key})" = 600 ]'
    return (f"cd {q} && umask 077 && mkdir -p {folder} && chmod 700 {folder} && tar -xf - && chmod 600 {key} && "
            f"chmod 644 {BUNDLE_SERVER_KEY} && {{ {modes} || {{ ls -ld {folder} {key} >&2; "
            f"echo 'this file system does not keep modes: {key} must be 0600 in a 0700 {folder}/' >&2; exit 1; }}; }}")


def adb_protect_command(path: str) -> str:
    """The phone's shell line after the key pushes: 0700/0600 where the storage allows, and the mode."""
    folder, key = f"{shlex.quote(path)}/{KEYS_DIR}", f"{shlex.quote(path)}/{BUNDLE_DEVICE_KEY}"
    return f"chmod 700 {folder} 2>/dev/null; chmod 600 {key} 2>/dev/null; echo {KEY_MODE_MARK}$(stat -c %a {key})"


def adb_key_report(stdout: str) -> str:
    """The progress line for the phone's key mode (shared storage such as /sdcard ignores chmod)."""
    said = stdout.split(KEY_MODE_MARK, 1)[1].split() if KEY_MODE_MARK in stdout else []
    mode = said[0] if said else "unknown"
    if mode == "600":
        return f"    {BUNDLE_DEVICE_KEY} is 0600 on the phone"
    return (f"    {BUNDLE_DEVICE_KEY} is mode {mode} on the phone: this storage does not keep modes, so apps with "
            "storage access can read it; run-termux.sh makes its own copy 0600 (delete this one after the first run)")


def keys_line(keys: DeviceKeys | None, path: str) -> str:
    """The flash's last line: which keys the device got, or what it needs without them."""
    if keys is None:
        return ("no signing keys installed: start the device with --signing-key FILE --server-key FILE, or "
                "--unsigned (`sflam flash --fleet DIR --device-id ID` installs a provisioned device's keys)")
    return (f"signing keys of {keys.device_id!r} installed: {path}/{BUNDLE_DEVICE_KEY} and "
            f"{path}/{BUNDLE_SERVER_KEY}")
