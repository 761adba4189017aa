"""What a provisioned mosquitto is told: its password file, its ACL, and its conf (TLS, limits).

The limits are sized from the protocol so that a legitimate run never meets them
(docs/security.md, "What the broker is told"): a packet holds the largest frame a sender makes,
a client's queue holds one burst from every device, and the listener takes every device twice
over (a reconnect overlaps its old, not yet timed-out connection) plus the operator's tools.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from dataclasses import dataclass
from pathlib import Path

from edge_runtime.mqtt import TLS12_CIPHERS
from edge_runtime.protocol.chunking import DEFAULT_MAX_BYTES_PER_DEVICE
from edge_runtime.protocol.signing import SIGNATURE_SIZE
from edge_runtime.protocol.topics import MAX_PARTS, Topics
from sflam import fleet_layout as layout

SERVER_USERNAME = "sflam-server"
PBKDF2_ITERATIONS = 101  # mosquitto_passwd's default (PW_DEFAULT_ITERATIONS)
PBKDF2_SALT_BYTES = 12  # mosquitto_passwd's salt length
TLS13_CIPHERS = "TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_GCM_SHA256"  # all AEAD

MAX_ID_CHARS = 64  # topics.check_id: run and device ids are 1-64 ASCII characters
SIGNATURE_BLOCK_MAX_BYTES = 1 + 1 + MAX_ID_CHARS + SIGNATURE_SIZE  # scheme, key id (text8), Ed25519 signature
PACKET_MARGIN_BYTES = 1024  # MQTT 5 properties a client may add to a PUBLISH (ours add none), and slack
CONTROL_MESSAGES_PER_DEVICE = 8  # Hellos, Status, an ErrorReport queued beside a device's largest burst
RECONNECT_COPIES = 2  # a reconnecting client is counted twice until its old connection goes
TOOL_CONNECTIONS = 16  # mosquitto_sub, monitors, users added with add_user, a second server worker
INFLIGHT_WINDOW_BYTES = 5_000_000  # a 1 Gbit/s path with 40 ms round trips: what one client keeps in flight
MIN_INFLIGHT_MESSAGES = 20  # mosquitto's default: small messages keep at least this many in flight
MAX_RECEIVE_MAXIMUM = 65_535  # MQTT 5's Receive Maximum is a two-byte integer


def longest_topic_bytes() -> int:
    """The longest topic any sflam publish uses: a device topic with 64-character run and device ids."""
    t = Topics("r" * MAX_ID_CHARS)
    device = "d" * MAX_ID_CHARS
    topics = [t.up(device), t.down(device), t.status(device), t.plan(), t.model(),
              t.retained_part("model", MAX_PARTS - 1), t.retained_part("plan", MAX_PARTS - 1)]
    return max(len(topic.encode()) for topic in topics)


def publish_overhead_bytes() -> int:
    """docs/protocol.md 1.6: fixed header 1, remaining length 1-4, topic length 2, topic, packet id 2,
    MQTT 5 property length 1 (QoS 1, no properties); the longest topic and a 4-byte length."""
    return 1 + 4 + 2 + longest_topic_bytes() + 2 + 1


@dataclass(frozen=True)
class BrokerLimits:
    """mosquitto's limits for one fleet (see :meth:`for_fleet` and docs/security.md)."""

    max_packet_size: int
    max_queued_messages: int
    max_inflight_messages: int
    max_connections: int

    @classmethod
    def for_fleet(cls, devices: int, max_frame_bytes: int) -> BrokerLimits:
        """Limits no legitimate run of ``devices`` devices sending frames of ``max_frame_bytes`` meets."""
        burst = -(-DEFAULT_MAX_BYTES_PER_DEVICE // max_frame_bytes) + CONTROL_MESSAGES_PER_DEVICE
        inflight = max(MIN_INFLIGHT_MESSAGES, -(-INFLIGHT_WINDOW_BYTES // max_frame_bytes))
        return cls(
            max_packet_size=max_frame_bytes + SIGNATURE_BLOCK_MAX_BYTES + publish_overhead_bytes()
            + PACKET_MARGIN_BYTES,
            max_queued_messages=(devices + 1) * burst,
            max_inflight_messages=min(inflight, MAX_RECEIVE_MAXIMUM),
            max_connections=RECONNECT_COPIES * (devices + 1) + TOOL_CONNECTIONS,
        )


def mosquitto_hash(password: str, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS) -> str:
    """A mosquitto 2 password-file hash: ``$7$iterations$b64(salt)$b64(PBKDF2-HMAC-SHA512)``."""
    salt = secrets.token_bytes(PBKDF2_SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def acl_header(run_id: str) -> list[str]:
    """The ACL's first lines: the comment and the server's grant over the whole run."""
    return [f"# sflam fleet ACL for run {run_id!r}: users not listed here (and anonymous clients) get nothing.",
            "", f"user {SERVER_USERNAME}", f"topic readwrite {Topics(run_id).prefix}/#"]


def acl_device_block(run_id: str, device_id: str) -> list[str]:
    """One device's ACL block: it writes d/X/up and d/X/status, reads d/X/down, plan and model."""
    t = Topics(run_id)
    return [f"user {device_id}", f"topic write {t.up(device_id)}", f"topic write {t.status(device_id)}",
            f"topic read {t.down(device_id)}", f"topic read {t.retained_filter('plan')}",
            f"topic read {t.retained_filter('model')}"]


def acl_text(run_id: str, device_ids: list[str]) -> str:
    """mosquitto's acl_file: the server owns the run's prefix; each device gets its own block."""
    lines = acl_header(run_id)
    for device_id in device_ids:
        lines += ["", *acl_device_block(run_id, device_id)]
    return "\n".join(lines) + "\n"


def mosquitto_conf_text(root: Path, *, run_id: str, broker_url: str, run_as: str, listener: str,
                        limits: BrokerLimits) -> str:
    """One TLS listener (TLS 1.2+, AEAD suites only), passwords + ACL, no anonymous access, no
    persistence, TCP_NODELAY, and the fleet's limits; every path absolute, under ``root``."""
    conf = root / layout.MOSQUITTO_CONF
    return "\n".join([
        f"# sflam fleet broker for run {run_id!r} ({broker_url}); start: mosquitto -c {conf}",
        "# Paths are absolute: provision again rather than move this directory.",
        "# started as root, mosquitto switches to this user, who must be able to read the 0600 files here",
        f"user {run_as}",
        "per_listener_settings false",
        "allow_anonymous false",
        f"password_file {root / layout.PASSWD}",
        f"acl_file {root / layout.ACL}",
        "persistence false",
        "set_tcp_nodelay true",
        "log_dest stderr",
        "# limits a legitimate run never meets (docs/security.md, 'What the broker is told')",
        f"max_packet_size {limits.max_packet_size}",
        f"max_queued_messages {limits.max_queued_messages}",
        f"max_inflight_messages {limits.max_inflight_messages}",
        "",
        listener,
        "protocol mqtt",
        f"max_connections {limits.max_connections}",
        f"cafile {root / layout.BROKER_CA_CERT}",
        f"certfile {root / layout.SERVER_CERT}",
        f"keyfile {root / layout.SERVER_TLS_KEY}",
        "tls_version tlsv1.2",
        "# TLS 1.2: ECDHE key exchange with AES-GCM or ChaCha20-Poly1305 only (no CBC, no static RSA)",
        f"ciphers {TLS12_CIPHERS}",
        f"ciphers_tls1.3 {TLS13_CIPHERS}",
        "require_certificate false",
        "# a device cannot take over another's session (or kick it off) by reusing its client id",
        "use_username_as_clientid true",
    ]) + "\n"
