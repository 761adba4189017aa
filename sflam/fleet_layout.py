"""Where each file of a provisioned fleet lies, relative to the fleet's directory.

Three folders keep apart what goes to different places: ``broker/`` holds everything
mosquitto.conf names (and nothing else), ``credentials/`` the MQTT passwords, ``keys/`` the
Ed25519 signing keys. ``fleet.json``, ``README.txt`` and a copy of ``ca.crt`` (what every
device needs) lie at the top, and ``ca.key`` too when it was asked for.
"""

from __future__ import annotations

BROKER_DIR, CREDENTIALS_DIR, KEYS_DIR = "broker", "credentials", "keys"
PRIVATE_DIRS = (BROKER_DIR, CREDENTIALS_DIR, f"{CREDENTIALS_DIR}/devices", KEYS_DIR, f"{KEYS_DIR}/devices")

MANIFEST = "fleet.json"
MANIFEST_FORMAT = 2  # 1: no signing keys, no "revoked" list, every file at the top
README = "README.txt"
CA_CERT = "ca.crt"  # the copy devices get
CA_KEY = "ca.key"  # only with --write-ca-key

MOSQUITTO_CONF = f"{BROKER_DIR}/mosquitto.conf"
PASSWD = f"{BROKER_DIR}/passwd"
ACL = f"{BROKER_DIR}/acl"
BROKER_CA_CERT = f"{BROKER_DIR}/ca.crt"
SERVER_CERT = f"{BROKER_DIR}/server.crt"
SERVER_TLS_KEY = f"{BROKER_DIR}/server.key"

SERVER_PASSWORD = f"{CREDENTIALS_DIR}/server.password"
SERVER_SIGNING_KEY = f"{KEYS_DIR}/server.key"
SERVER_PUBLIC_KEY = f"{KEYS_DIR}/server.pub"


def device_password(device_id: str) -> str:
    """A provisioned device's MQTT password file."""
    return f"{CREDENTIALS_DIR}/devices/{device_id}.password"


def user_password(username: str) -> str:
    """The password file of a user added after provisioning (``sflam.fleet.add_user``)."""
    return f"{CREDENTIALS_DIR}/{username}.password"


def device_signing_key(device_id: str) -> str:
    """A device's Ed25519 private key (PEM)."""
    return f"{KEYS_DIR}/devices/{device_id}.key"
