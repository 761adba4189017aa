"""Ed25519 signatures on frames: who wrote a message, checked before anything in it is parsed.

Every frame (since protocol version 3) ends with a signature block before its CRC
(docs/protocol.md 2.6)::

    scheme u8 = 0                                   unsigned
    scheme u8 = 1 | key_id text8 | signature 64B    Ed25519 by the key named key_id

The signature is Ed25519 (RFC 8032) over ``DOMAIN || SHA-256(frame[0 : end of key_id])``: the
prefix (magic, version, type, lengths), the envelope (run, device, round, step, created_at), the
body, the scheme and the key id. Hashing first keeps one pass over a 9 MB model; the domain
string keeps these signatures from meaning anything elsewhere. Key ids are ``server`` for the
server and the device id for a device. A :class:`SigningKey` signs, a :class:`Keyring` of public
keys verifies; keys are files written by ``sflam fleet provision`` (docs/security.md).

``cryptography`` is imported only when a key is made or loaded, so an unsigned receiver needs
nothing beyond numpy.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from edge_runtime.protocol.errors import MalformedError, SignatureError
from edge_runtime.protocol.wire import Reader, Writer

log = logging.getLogger(__name__)
SCHEME_NONE, SCHEME_ED25519 = 0, 1
SIGNATURE_SIZE = 64
PUBLIC_KEY_SIZE = 32
# "v3" names this signature scheme (introduced with frame version 3), not the frame version: later
# frame versions keep it, and the version byte is inside the signed bytes anyway
DOMAIN = b"sflam frame signature v3\x00"
SERVER_KEY_ID = "server"  # the same string as messages.SERVER_ID: the server signs as "server"


def signed_digest(parts: Iterable[bytes | memoryview]) -> bytes:
    """What Ed25519 signs for a frame whose signed bytes are ``parts`` joined: DOMAIN + SHA-256."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part)
    return DOMAIN + h.digest()


class SigningKey:
    """One party's Ed25519 private key and the key id its frames carry."""

    def __init__(self, key_id: str, private_key: object) -> None:
        self.key_id = key_id
        self._key = private_key

    @classmethod
    def generate(cls, key_id: str) -> SigningKey:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        return cls(key_id, Ed25519PrivateKey.generate())

    @classmethod
    def from_pem(cls, key_id: str, data: bytes, where: str = "key") -> SigningKey:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        try:
            key = load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise KeyFileError(f"{where}: not an unencrypted PEM private key ({exc})") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise KeyFileError(f"{where}: a {type(key).__name__}, not an Ed25519 private key")
        return cls(key_id, key)

    @classmethod
    def from_file(cls, key_id: str, path: str | Path) -> SigningKey:
        """Load a PEM key file; refused when others may read it (it must be 0600 or stricter)."""
        path = Path(path)
        try:
            mode = path.stat().st_mode
            data = path.read_bytes()
        except OSError as exc:
            raise KeyFileError(f"signing key {path}: {exc.strerror or exc}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KeyFileError(f"signing key {path} is readable by others (mode {stat.S_IMODE(mode):04o}); "
                               f"chmod 600 it")
        return cls.from_pem(key_id, data, str(path))

    def sign(self, digest: bytes) -> bytes:
        """The 64-byte signature of ``digest`` (from :func:`signed_digest`)."""
        return self._key.sign(digest)

    @property
    def public_bytes(self) -> bytes:
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        return self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def pem(self) -> bytes:
        """The private key as unencrypted PKCS#8 PEM (write it 0600)."""
        from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

        return self._key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())

    def public_pem(self) -> bytes:
        return public_pem(self.public_bytes)


class KeyFileError(ValueError):
    """A key file that cannot be used: missing, unreadable, too open, or not an Ed25519 key."""


class Keyring:
    """Public keys by key id: what a receiver accepts signatures from.

    Thread-safe; :meth:`replace` swaps the whole set, and a key no longer listed stops verifying
    at once. A ring read from a fleet.json follows that file: :meth:`refresh` (called by the
    receiver before each frame, at most once per ``RELOAD_EVERY_S``) reloads it when it changed,
    so ``sflam fleet revoke`` reaches a running server without a restart.
    """

    RELOAD_EVERY_S = 1.0

    def __init__(self, keys: Mapping[str, bytes] | None = None, source: str = "") -> None:
        self.source = source
        self._lock = threading.Lock()
        self._keys: dict[str, object] = {}
        self._raw: dict[str, bytes] = {}
        self._fleet: Path | None = None
        self._stamp: tuple[int, int, int] | None = None
        self._checked_at = 0.0
        self.reloads = 0
        self.replace(keys or {})

    def refresh(self) -> None:
        """Reload the fleet.json this ring came from if it changed (a revocation); keep the keys
        it has when the file cannot be read (logged)."""
        now = time.monotonic()
        if self._fleet is None or now - self._checked_at < self.RELOAD_EVERY_S:
            return
        self._checked_at = now
        try:
            st = self._fleet.stat()
        except OSError as exc:
            log.warning("key list %s: %s; keeping the %d keys loaded", self._fleet, exc.strerror or exc, len(self))
            return
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == self._stamp:
            return
        try:
            keys = fleet_public_keys(self._fleet)
        except KeyFileError as exc:
            log.warning("%s; keeping the %d keys loaded", exc, len(self))
            return
        gone = sorted(set(self.ids) - set(keys))
        self.replace(keys)
        self._stamp, self.reloads = stamp, self.reloads + 1
        log.warning("key list %s reloaded: %d keys%s", self._fleet, len(keys), f" (removed: {', '.join(gone)})" if gone else "")

    def replace(self, keys: Mapping[str, bytes]) -> None:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        loaded = {}
        for key_id, raw in keys.items():
            if len(raw) != PUBLIC_KEY_SIZE:
                raise KeyFileError(f"public key of {key_id!r} has {len(raw)} bytes, Ed25519 needs {PUBLIC_KEY_SIZE}")
            loaded[key_id] = Ed25519PublicKey.from_public_bytes(bytes(raw))
        with self._lock:
            self._keys, self._raw = loaded, {key_id: bytes(raw) for key_id, raw in keys.items()}

    def holds(self, key_id: str, public: bytes) -> bool:
        """Whether ``key_id``'s key in the ring is ``public`` (raw 32 bytes)."""
        with self._lock:
            return self._raw.get(key_id) == bytes(public)

    def __contains__(self, key_id: object) -> bool:
        with self._lock:
            return key_id in self._keys

    def __len__(self) -> int:
        with self._lock:
            return len(self._keys)

    @property
    def ids(self) -> list[str]:
        with self._lock:
            return sorted(self._keys)

    def verify(self, key_id: str, digest: bytes, signature: bytes) -> None:
        """SignatureError unless ``signature`` is ``key_id``'s signature of ``digest``."""
        from cryptography.exceptions import InvalidSignature

        with self._lock:
            key = self._keys.get(key_id)
        if key is None:
            raise SignatureError(f"signed by {key_id!r}, whose key is not in the key list (revoked or never provisioned)")
        try:
            key.verify(signature, digest)
        except InvalidSignature:
            raise SignatureError(f"the signature of {key_id!r} does not match the frame (altered or forged)") from None

    @classmethod
    def from_fleet_json(cls, path: str | Path) -> Keyring:
        """The server's and every listed device's public key from a provisioned ``fleet.json``."""
        ring = cls(source=str(path))
        path = Path(path)
        st = path.stat() if path.exists() else None
        ring.replace(fleet_public_keys(path))
        ring._fleet, ring._checked_at = path, time.monotonic()
        ring._stamp = (st.st_mtime_ns, st.st_size, st.st_ino) if st is not None else None
        return ring

    @classmethod
    def server_only(cls, path: str | Path) -> Keyring:
        """A device's keyring: the server's public key from a PEM (or base64) file."""
        return cls({SERVER_KEY_ID: read_public_key(path)}, source=str(path))


def fleet_public_keys(path: str | Path) -> dict[str, bytes]:
    """``{key_id: raw public key}`` of fleet.json's ``server`` and ``devices`` entries."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        keys = {SERVER_KEY_ID: base64.b64decode(doc["server"]["public_key"], validate=True)}
        for device in doc["devices"]:
            keys[device["id"]] = base64.b64decode(device["public_key"], validate=True)
    except OSError as exc:
        raise KeyFileError(f"key list {path}: {exc.strerror or exc}") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise KeyFileError(f"key list {path}: no server and device public keys in it ({type(exc).__name__}: "
                           f"{exc}); provision the fleet again with this version") from None
    return keys


def public_pem(raw: bytes) -> bytes:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return Ed25519PublicKey.from_public_bytes(raw).public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)


def public_b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def read_public_key(path: str | Path) -> bytes:
    """The raw 32 bytes of an Ed25519 public key file (PEM SubjectPublicKeyInfo, or base64)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_pem_public_key

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"public key {path}: {exc.strerror or exc}") from None
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            key = load_pem_public_key(data)
            if not isinstance(key, Ed25519PublicKey):
                raise ValueError(f"a {type(key).__name__}")
            return key.public_bytes(Encoding.Raw, PublicFormat.Raw)
        raw = base64.b64decode(data.strip(), validate=True)
        if len(raw) != PUBLIC_KEY_SIZE:
            raise ValueError(f"{len(raw)} bytes")
        return raw
    except ValueError as exc:
        raise KeyFileError(f"public key {path}: not an Ed25519 public key ({exc})") from None


def write_secret(path: Path, data: bytes) -> None:
    """Create ``path`` 0600 (refused when it exists) and write ``data``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


# --- the frame's signature block (docs/protocol.md 2.6) ------------------------------------------


def signature_block(parts: list[bytes], signer: SigningKey | None) -> list[bytes]:
    """The signature block that follows ``parts`` (prefix, header, body): scheme, key id, signature."""
    if signer is None:
        return [bytes([SCHEME_NONE])]
    head = Writer()
    head.u8(SCHEME_ED25519)
    head.text(signer.key_id)
    signed = head.getvalue()
    return [signed, signer.sign(signed_digest([*parts, signed]))]


def read_signature_block(view: memoryview, start: int) -> tuple[tuple[str, bytes] | None, int]:
    """The block at ``start``: (None, its end) when unsigned, ((key_id, signature), its end) when
    signed; TruncatedError when the data ends inside it, MalformedError for an unknown scheme."""
    block = Reader(view[start:], "signature block")
    scheme = block.u8("signature scheme")
    if scheme == SCHEME_NONE:
        return None, start + 1
    if scheme != SCHEME_ED25519:
        raise MalformedError(f"unknown signature scheme {scheme}")
    key_id = block.text("key_id")
    signature = bytes(block.take(SIGNATURE_SIZE, "signature"))
    return (key_id, signature), len(view) - block.remaining


def check_signature(frame: memoryview, signature: tuple[str, bytes] | None, keys: Keyring | None,
                    signer: str | None) -> None:
    """With ``keys``: SignatureError unless ``frame`` (everything before the CRC) is signed by a key
    in them (``signer``'s, when given). Without, nothing is verified (unsigned mode)."""
    if keys is None:
        return
    if signature is None:
        raise SignatureError("unsigned frame: this receiver accepts signed frames only")
    key_id, value = signature
    if signer is not None and key_id != signer:
        raise SignatureError(f"signed by {key_id!r}; on this topic only {signer!r} may sign")
    keys.verify(key_id, signed_digest([frame[: len(frame) - SIGNATURE_SIZE]]), value)
