"""Session certificates for mutual TLS between parties (DESIGN.md section 8).

One run gets its own certificate authority. Every party holds a key and a
certificate signed by that CA whose Common Name is the party's name, so the
gRPC transport can bind a TLS connection to a protocol identity: a party
accepts only peers signed by the session CA, and a peer may only speak as the
name in its certificate. Keys are ECDSA P-256 (accepted by gRPC's BoringSSL on
both sides of the handshake) and come from the OS CSPRNG via ``cryptography``.

Layout of ``out_dir`` (mode 0700): ``ca.pem``, ``ca.key``, ``<party>.pem`` and
``<party>.key``; key files are mode 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import secrets
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PARTY_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
CA_NAME = "ca"
#: Backdating of ``not_valid_before`` so that small clock differences between
#: machines do not make a fresh certificate "not yet valid".
_CLOCK_SKEW = dt.timedelta(minutes=5)
_INIT_HINT = "run `clicooper certs init` to create the session certificates"


def validate_party_name(name: str) -> str:
    """``name`` if it is a valid party name (it becomes a CN and a DNS name)."""
    if not isinstance(name, str) or not PARTY_NAME.fullmatch(name) or name == CA_NAME:
        raise ValueError(
            f"invalid party name {name!r}: use 1-32 characters a-z, 0-9, '_' or '-', "
            "starting with a letter (and not 'ca')"
        )
    return name


def create_certificates(
    parties: list[str], out_dir: Path, valid_days: int = 30, *, overwrite: bool = False
) -> None:
    """A fresh session CA plus one key and CA-signed certificate per party.

    Each party certificate has CN = party name, SubjectAltName DNS:localhost,
    DNS:<party>, IP:127.0.0.1 and IP:::1, and both serverAuth and clientAuth
    extended key usage (every party is a gRPC server and a client). An existing
    CA is only replaced with ``overwrite=True``, because a new CA invalidates
    every certificate issued by the old one.
    """
    names = [validate_party_name(p) for p in parties]
    if not names:
        raise ValueError("no parties given: name at least one party, e.g. do t1 verifier")
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate party names in {names}: give each party once")
    if not isinstance(valid_days, int) or valid_days < 1:
        raise ValueError(f"valid_days must be a positive integer, got {valid_days!r}")
    out_dir = Path(out_dir)
    if (out_dir / "ca.pem").exists() and not overwrite:
        raise FileExistsError(
            f"{out_dir / 'ca.pem'} already exists: use another directory or overwrite it "
            "(this invalidates every certificate it issued)"
        )
    _private_dir(out_dir)

    now = dt.datetime.now(dt.UTC)
    not_after = now + dt.timedelta(days=valid_days)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _ca_certificate(ca_key, now - _CLOCK_SKEW, not_after)
    _write_pem(out_dir / "ca.key", _key_pem(ca_key), 0o600)
    for name in names:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _party_certificate(name, key, ca_key, ca_cert, now - _CLOCK_SKEW, not_after)
        _write_pem(out_dir / f"{name}.key", _key_pem(key), 0o600)
        _write_pem(out_dir / f"{name}.pem", cert.public_bytes(serialization.Encoding.PEM), 0o644)
    # The CA certificate last: its presence marks a complete directory.
    _write_pem(out_dir / "ca.pem", ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)


def load_party_credentials(certs_dir: Path, party: str) -> tuple[bytes, bytes, bytes]:
    """``(ca_pem, cert_pem, key_pem)`` for ``party``, checked before any handshake.

    The checks turn what would be an opaque TLS handshake failure into a
    one-line reason: the certificate must name ``party``, be signed by the CA,
    be within its validity period and match the key.
    """
    validate_party_name(party)
    certs_dir = Path(certs_dir)
    ca_pem, cert_pem, key_pem = (
        _read(certs_dir / f) for f in ("ca.pem", f"{party}.pem", f"{party}.key")
    )
    ca = _load_cert(ca_pem, certs_dir / "ca.pem")
    cert = _load_cert(cert_pem, certs_dir / f"{party}.pem")
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{certs_dir / f'{party}.key'} is not a PEM private key: {exc}") from None
    _check_party_certificate(cert, ca, key, party, certs_dir)
    return ca_pem, cert_pem, key_pem


def common_name(cert: x509.Certificate) -> str:
    """The certificate's subject Common Name ('' when absent)."""
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else ""


def _ca_certificate(
    key: ec.EllipticCurvePrivateKey, not_before: dt.datetime, not_after: dt.datetime
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "clicooper session CA")])
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(_serial())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )


def _party_certificate(
    name: str,
    key: ec.EllipticCurvePrivateKey,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    not_before: dt.datetime,
    not_after: dt.datetime,
) -> x509.Certificate:
    san = x509.SubjectAlternativeName(
        [
            x509.DNSName("localhost"),
            x509.DNSName(name),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1")),
        ]
    )
    eku = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
    aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(_serial())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(eku, critical=False)
        .add_extension(san, critical=False)
        .add_extension(aki, critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )


def _private_dir(path: Path) -> None:
    """Make ``path`` a 0700 directory; an existing non-empty one must already be private.

    An existing directory with other content (say the working directory) is
    not silently chmod-ed; the user is asked to choose a fresh one instead.
    """
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        path.mkdir(parents=True, exist_ok=True)
        os.chmod(path, 0o700)
    elif not path.is_dir():
        raise NotADirectoryError(f"{path} is not a directory: choose a directory for certificates")
    elif path.stat().st_mode & 0o077:
        raise PermissionError(
            f"{path} is accessible to other users: use a new directory or `chmod 700 {path}`"
        )


def _key_usage(ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _serial() -> int:
    """A positive 159-bit serial from the CSPRNG (RFC 5280 allows at most 20 octets)."""
    return secrets.randbits(159) | 1


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_pem(path: Path, data: bytes, mode: int) -> None:
    """Write atomically with exactly ``mode`` (keys 0600), refusing symlinks.

    :func:`clicooper.common.files.write_file` sets the mode on the unique
    temporary file before writing, so a key is never readable by others, not
    even for the moment between write and rename.
    """
    from clicooper.common.files import write_file

    write_file(path, data, mode)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"missing {path}: {_INIT_HINT} in {path.parent}") from None


def _load_cert(pem: bytes, path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise ValueError(f"{path} is not a PEM certificate: {exc}") from None


def _check_party_certificate(
    cert: x509.Certificate,
    ca: x509.Certificate,
    key: PrivateKeyTypes,
    party: str,
    certs_dir: Path,
) -> None:
    path = certs_dir / f"{party}.pem"
    if common_name(cert) != party:
        raise ValueError(f"{path} is issued to {common_name(cert)!r}, not {party!r}: {_INIT_HINT}")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise ValueError(
            f"{path} is not signed by {certs_dir / 'ca.pem'}: {_INIT_HINT} again"
        ) from None
    now = dt.datetime.now(dt.UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise ValueError(
            f"{path} is valid only from {cert.not_valid_before_utc:%Y-%m-%d %H:%M} to "
            f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC: {_INIT_HINT} again"
        )
    if _spki(key.public_key()) != _spki(cert.public_key()):
        raise ValueError(f"{certs_dir / f'{party}.key'} does not match {path}: {_INIT_HINT}")


def _spki(public_key: PublicKeyTypes) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
