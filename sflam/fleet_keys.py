"""The fleet's Ed25519 signing keys: one for the server, one per device.

Every frame a party sends is signed with its key (edge_runtime.protocol.signing); the receiver
checks it against the public keys in fleet.json (the server) or ``keys/server.pub`` (a device).
Private keys are PKCS#8 PEM, written 0600; public keys go into fleet.json as base64 of the raw
32 bytes. Generating one costs about 30 microseconds, so 10,000 devices add a third of a second.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from edge_runtime.protocol.signing import SERVER_KEY_ID, SigningKey, public_b64, write_secret
from sflam import fleet_layout as layout


@dataclass(frozen=True)
class FleetKeys:
    """Public keys (base64) by key id, and the files to write: (path, PEM bytes, secret?)."""

    server_public: str
    device_public: dict[str, str]
    files: list[tuple[str, bytes, bool]] = field(default_factory=list)


def generate_keys(device_ids: list[str]) -> FleetKeys:
    """A fresh server key and one key per device, and their files (``keys/``, see fleet_layout)."""
    server = SigningKey.generate(SERVER_KEY_ID)
    files = [(layout.SERVER_SIGNING_KEY, server.pem(), True), (layout.SERVER_PUBLIC_KEY, server.public_pem(), False)]
    device_public = {}
    for device_id in device_ids:
        key = SigningKey.generate(device_id)
        files.append((layout.device_signing_key(device_id), key.pem(), True))
        device_public[device_id] = public_b64(key.public_bytes)
    return FleetKeys(public_b64(server.public_bytes), device_public, files)


def write_key_folder(folder: Path, device_ids: list[str]) -> None:
    """Fresh keys laid out as a fleet's ``keys/`` in ``folder`` (server.key, server.pub,
    devices/<id>.key; private keys 0600, folders 0700) and ``folder/fleet.json`` with the public
    keys, as the server's ``security.device_keys`` reads it. For runs without a provisioned fleet
    (``sflam simulate --sign``)."""
    keys = generate_keys(device_ids)
    (folder / "devices").mkdir(mode=0o700, parents=True)
    folder.chmod(0o700)
    for rel, pem, secret in keys.files:
        path = folder / Path(rel).relative_to(layout.KEYS_DIR)
        if secret:
            write_secret(path, pem)
        else:
            path.write_bytes(pem)
    doc = {"server": {"public_key": keys.server_public},
           "devices": [{"id": d, "public_key": keys.device_public[d]} for d in device_ids]}
    (folder / "fleet.json").write_text(json.dumps(doc, indent=1) + "\n")
