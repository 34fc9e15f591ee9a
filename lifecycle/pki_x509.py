"""X.509 building blocks of the PKI: RSA keys, CA and leaf certificates, PEM in and out.

Pure functions of their arguments (plus the clock and randomness); nothing here touches the
store or the state key. `lifecycle.pki` decides what to generate and keeps the results.
Certificates follow RKE: RSA 2048, ten years, leaves usable for both server and client auth.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from lifecycle.spec import CertRequest

KEY_BITS = 2048
CA_VALIDITY = timedelta(days=3650)
LEAF_VALIDITY = timedelta(days=3650)
# Backdate notBefore so a node whose clock runs a little behind still accepts a fresh cert.
CLOCK_SKEW = timedelta(minutes=5)
# RFC 5280 caps a CN at 64 characters; Go (Kubernetes, etcd) does not, and a kubelet's CN must
# be system:node:<node name>, so longer names are allowed past cryptography's check.
_CN_LIMIT = 64


@dataclass(frozen=True)
class Issued:
    """A freshly generated certificate and its private key (PEM; the key never in a repr)."""

    cert_pem: bytes
    key_pem: bytes = field(repr=False)
    not_after: datetime


def new_key() -> rsa.RSAPrivateKey:
    """A new RSA 2048 private key."""
    return rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS)


def key_to_pem(key: rsa.RSAPrivateKey) -> bytes:
    """PKCS#1 PEM ("BEGIN RSA PRIVATE KEY", as RKE writes), unencrypted: encrypt before storing."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def load_key(pem: bytes) -> rsa.RSAPrivateKey:
    """Parse a PEM private key; only RSA keys are ever generated here."""
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise TypeError("not an RSA private key")
    return key


def load_cert(pem: bytes | str) -> x509.Certificate:
    """Parse one PEM certificate."""
    return x509.load_pem_x509_certificate(pem.encode() if isinstance(pem, str) else pem)


def cert_to_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def subject_name(req: CertRequest) -> x509.Name:
    """CN=common_name plus one O= per organization, in the request's order."""
    cn = x509.NameAttribute(
        NameOID.COMMON_NAME, req.common_name, _validate=len(req.common_name) <= _CN_LIMIT
    )
    orgs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in req.organizations]
    return x509.Name([*orgs, cn])


def general_names(sans: tuple[str, ...]) -> list[x509.GeneralName]:
    """IP literals become IPAddress entries, everything else a DNSName."""
    out: list[x509.GeneralName] = []
    for san in sans:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(san)))
        except ValueError:
            out.append(x509.DNSName(san))
    return out


def _validity(builder: x509.CertificateBuilder, lifetime: timedelta) -> x509.CertificateBuilder:
    now = datetime.now(UTC)
    return builder.not_valid_before(now - CLOCK_SKEW).not_valid_after(now + lifetime)


def issue_ca(req: CertRequest) -> Issued:
    """A self-signed CA for `req` (BasicConstraints ca=True; signs certs and CRLs)."""
    key = new_key()
    name = subject_name(req)
    public = key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
    )
    cert = _validity(builder, CA_VALIDITY).sign(key, hashes.SHA256())
    return Issued(cert_to_pem(cert), key_to_pem(key), cert.not_valid_after_utc)


def issue_leaf(req: CertRequest, ca_cert: x509.Certificate, ca_key: rsa.RSAPrivateKey) -> Issued:
    """A leaf for `req` signed by the CA; server and client auth, like every RKE cert."""
    key = new_key()
    public = key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject_name(req))
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if req.sans:  # an empty SAN extension is invalid, and client-only certs need none
        builder = builder.add_extension(
            x509.SubjectAlternativeName(general_names(req.sans)), critical=False
        )
    cert = _validity(builder, LEAF_VALIDITY).sign(ca_key, hashes.SHA256())
    return Issued(cert_to_pem(cert), key_to_pem(key), cert.not_valid_after_utc)


def issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    """True when `ca` directly signed `cert` (issuer name and signature both check out)."""
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True
