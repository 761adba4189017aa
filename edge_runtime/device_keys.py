"""Which keys a device signs and verifies with: its flags, else the bundle's ``keys/``, else none.

A provisioned fleet signs every message (docs/security.md): ``sflam flash --fleet`` puts the
device's private key (``keys/device.key``, 0600) and the server's public key
(``keys/server.pub``) in the installed bundle, or ``--signing-key`` / ``--server-key`` name them.
Unsigned mode is explicit: a device with broker credentials but no keys refuses to start unless
``--unsigned`` is given; a loopback demo without credentials runs unsigned and says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edge_runtime.protocol.signing import Keyring, SigningKey

BUNDLE_DEVICE_KEY = "keys/device.key"
BUNDLE_SERVER_KEY = "keys/server.pub"


class DeviceKeysError(ValueError):
    """Keys missing, half given, or unusable; the message says what to pass."""


@dataclass(frozen=True)
class DeviceSigning:
    """The device's signing key and the server's public key (both None: unsigned), and why."""

    key: SigningKey | None
    server_keys: Keyring | None
    description: str


def device_signing(device_id: str, bundle: Path, *, signing_key: str | None, server_key: str | None,
                   unsigned: bool, credentials: bool) -> DeviceSigning:
    """Resolve the device's signing mode (DeviceKeysError for every unusable combination)."""
    if unsigned:
        if signing_key or server_key:
            raise DeviceKeysError("--unsigned with --signing-key/--server-key: choose one")
        return DeviceSigning(None, None, "UNSIGNED (--unsigned): the server's messages are not verified")
    signing_key = signing_key or _in_bundle(bundle, BUNDLE_DEVICE_KEY)
    server_key = server_key or _in_bundle(bundle, BUNDLE_SERVER_KEY)
    if signing_key and server_key:
        try:
            key, keys = SigningKey.from_file(device_id, signing_key), Keyring.server_only(server_key)
        except ValueError as exc:
            raise DeviceKeysError(str(exc)) from None
        return DeviceSigning(key, keys, f"signed (Ed25519) as {device_id!r}; only the server's key {server_key} "
                                        "is trusted")
    if signing_key or server_key:
        missing = "--server-key (the server's public key)" if signing_key else "--signing-key (this device's key)"
        raise DeviceKeysError(f"signed mode needs both keys: {missing} is missing")
    if credentials:
        raise DeviceKeysError("a device with broker credentials belongs to a provisioned fleet, which signs its "
                              "messages: pass --signing-key and --server-key (sflam fleet provision writes them; "
                              "sflam flash --fleet installs them), or --unsigned to run without signatures")
    return DeviceSigning(None, None, "UNSIGNED (no keys and no broker credentials: a loopback demo)")


def _in_bundle(bundle: Path, name: str) -> str | None:
    path = Path(bundle) / name
    return str(path) if path.exists() else None
