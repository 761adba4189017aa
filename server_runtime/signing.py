"""The server's side of message signatures: its signing key and the devices' public keys.

``security.signing = "ed25519"`` in run.toml: every frame the server sends is signed with
``security.signing_key`` and every frame it receives must carry the signature of the device whose
topic it arrived on, from the key list ``security.device_keys`` (the fleet's fleet.json, reloaded
when ``sflam fleet revoke`` rewrites it). ``"off"`` (or ``"auto"`` without broker credentials) is
unsigned mode. docs/security.md has the threat model, docs/protocol.md 2.6 the bytes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from edge_runtime import protocol as p
from edge_runtime.protocol.signing import SERVER_KEY_ID
from server_runtime.config import RunConfig

log = logging.getLogger(__name__)


class SigningSetupError(ValueError):
    """Key files that cannot be used for the configured signing."""


@dataclass(frozen=True)
class ServerSigning:
    """What the daemon (and each trainer rank) signs with and verifies against; both None: unsigned."""

    key: p.SigningKey | None
    keys: p.Keyring | None

    @property
    def description(self) -> str:
        if self.key is None:
            return "UNSIGNED (security.signing is off): any broker user who may publish on the run's topics can steer it"
        return (f"signed (Ed25519): the server signs as {SERVER_KEY_ID!r}; {len(self.keys) - 1} device keys "
                f"from {self.keys.source}, reloaded when it changes")


def load_signing(config: RunConfig) -> ServerSigning:
    """The run's signing key and key list (SigningSetupError when they cannot be used), or unsigned."""
    security = config.security
    if not security.signed:
        return ServerSigning(None, None)
    try:
        key = p.SigningKey.from_file(SERVER_KEY_ID, security.signing_key)
        keys = p.Keyring.from_fleet_json(security.device_keys)
    except p.KeyFileError as exc:
        raise SigningSetupError(str(exc)) from None
    if not keys.holds(SERVER_KEY_ID, key.public_bytes):
        raise SigningSetupError(f"security.signing_key {security.signing_key} is not the server key listed in "
                                f"{security.device_keys}: devices would refuse everything the server signs")
    return ServerSigning(key, keys)

