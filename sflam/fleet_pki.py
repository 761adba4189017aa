"""The fleet's certificates: a self-signed CA and one server certificate it signs (ECDSA P-256).

Devices verify the broker against the CA and the broker's name against the server certificate's
subjectAltName (DNS names and IP addresses, as given). There are no client certificates: devices
authenticate with passwords (:mod:`sflam.fleet`). Keys are unencrypted PKCS#8 PEM; the caller
writes them 0600. The CA's private key is serialized only when asked for: otherwise it is dropped
once it has signed, and the fleet can issue no other certificate.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CLOCK_SKEW = dt.timedelta(minutes=5)  # not-before this far back: a device clock slightly behind still accepts


@dataclass(frozen=True)
class Pki:
    """PEM bytes of the CA and server keys and certificates, and when the certificates expire;
    ``ca_key`` is None unless it was asked for."""

    ca_key: bytes | None
    ca_cert: bytes
    server_key: bytes
    server_cert: bytes
    not_after: dt.datetime


def issue_certificates(names: list[str], days: int, *, keep_ca_key: bool = False) -> Pki:
    """A new CA and a server certificate for ``names`` (the first is the subject CN), both valid
    ``days``; the CA's key comes back only with ``keep_ca_key``."""
    if not names:
        raise ValueError("a server certificate needs at least one host name")
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    not_after = now + dt.timedelta(days=days)
    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sflam fleet"),
                         x509.NameAttribute(NameOID.COMMON_NAME, f"sflam fleet CA {now:%Y-%m-%d %H:%M:%S}")])
    ca_cert = (
        _builder(ca_name, ca_name, ca_key.public_key(), now, not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    server_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    server_cert = (
        _builder(server_name, ca_name, server_key.public_key(), now, not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([_general_name(n) for n in names]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return Pki(_pem_key(ca_key) if keep_ca_key else None, ca_cert.public_bytes(serialization.Encoding.PEM),
               _pem_key(server_key), server_cert.public_bytes(serialization.Encoding.PEM), not_after)


def _builder(subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey,
             now: dt.datetime, not_after: dt.datetime) -> x509.CertificateBuilder:
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW).not_valid_after(not_after))


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    """A CA signs certificates and CRLs; a TLS server with an EC key only signs handshakes."""
    return x509.KeyUsage(digital_signature=not cert_sign, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=cert_sign,
                         crl_sign=cert_sign, encipher_only=False, decipher_only=False)


def _general_name(name: str) -> x509.GeneralName:
    """An IP address as an iPAddress entry (what TLS clients match IPs against), anything else as a DNS name."""
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
