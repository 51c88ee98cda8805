"""Session certificates for mutual TLS between parties (DESIGN.md section 8).

One run gets its own certificate authority. Every party holds a key and a
certificate signed by that CA whose Common Name is the party's name, so the
gRPC transport can bind a TLS connection to a protocol identity: a party
accepts only peers signed by the session CA, and a peer may only speak as the
name in its certificate. Keys are ECDSA P-256 (accepted by gRPC's BoringSSL on
both sides of the handshake) and come from the OS CSPRNG via ``cryptography``.

Layout of ``out_dir`` (every directory mode 0700, key files mode 0600)::

    ca/ca.key  ca/ca.pem                  the CA: stays with the operator, offline
    <party>/<party>.key                   one bundle per party: its own key,
    <party>/<party>.pem                   its certificate
    <party>/ca.pem                        and the CA certificate (the trust anchor)

A party is given only its own bundle directory. Whoever holds ``ca.key`` can
issue a certificate for any name, and whoever holds ``do.key`` can speak as
the data owner, so :func:`load_party_credentials` refuses a directory that
holds the CA key or any private key other than the party's own: by file name
(``ca.key``, ``<other>.key``) and by content (every PEM or DER private key in
the directory must be the one that matches the party's certificate). Handing a
party the whole ``out_dir``, the CA folder or another party's bundle therefore
fails with one line before any handshake.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import secrets
import stat
from collections import deque
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PARTY_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
CA_NAME = "ca"
#: Backdating of ``not_valid_before`` so that small clock differences between
#: machines do not make a fresh certificate "not yet valid".
_CLOCK_SKEW = dt.timedelta(minutes=5)
_INIT_HINT = (
    "create the certificates with `clicooper certs init` and give each party its own "
    "bundle (OUT/<party>/)"
)
#: A bundle holds three small files; a directory far beyond that is not a bundle.
_MAX_BUNDLE_ENTRIES = 64
_MAX_BUNDLE_FILE = 1 << 20
#: Subdirectories are searched for keys this deep (OUT/ca/ca.key when OUT itself is given).
_SCAN_DEPTH = 2
_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----(.*?)-----END \1-----", re.DOTALL)


def validate_party_name(name: str) -> str:
    """``name`` if it is a valid party name (it becomes a CN and a DNS name)."""
    if not isinstance(name, str) or not PARTY_NAME.fullmatch(name) or name == CA_NAME:
        raise ValueError(
            f"invalid party name {name!r}: use 1-32 characters a-z, 0-9, '_' or '-', "
            "starting with a letter (and not 'ca')"
        )
    return name


def create_certificates(
    parties: list[str],
    out_dir: Path,
    valid_days: int = 30,
    *,
    overwrite: bool = False,
    keep_ca_key: bool = True,
) -> None:
    """A fresh session CA in ``out_dir/ca`` plus one bundle per party in ``out_dir/<party>``.

    Each party certificate has CN = party name, SubjectAltName DNS:localhost,
    DNS:<party>, IP:127.0.0.1 and IP:::1, and both serverAuth and clientAuth
    extended key usage (every party is a gRPC server and a client). An existing
    CA is only replaced with ``overwrite=True``, because a new CA invalidates
    every certificate issued by the old one. With ``keep_ca_key=False`` the CA
    key never reaches the disk (``launch``: no party can be added later, and
    none can be forged from a key left behind).
    """
    names = [validate_party_name(p) for p in parties]
    if not names:
        raise ValueError("no parties given: name at least one party, e.g. do t1 verifier")
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate party names in {names}: give each party once")
    if not isinstance(valid_days, int) or valid_days < 1:
        raise ValueError(f"valid_days must be a positive integer, got {valid_days!r}")
    out_dir = Path(out_dir)
    ca_dir = out_dir / CA_NAME
    if (out_dir / "ca.key").exists() or (out_dir / "ca.pem").exists():
        raise FileExistsError(
            f"{out_dir} holds certificates in the old shared layout (ca.key beside every "
            "party's key): use a new directory, and delete this one"
        )
    if (ca_dir / "ca.pem").exists() and not overwrite:
        raise FileExistsError(
            f"{ca_dir / 'ca.pem'} already exists: use another directory or overwrite it "
            "(this invalidates every certificate it issued)"
        )
    _private_dir(out_dir)
    _private_dir(ca_dir)

    now = dt.datetime.now(dt.UTC)
    not_after = now + dt.timedelta(days=valid_days)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _ca_certificate(ca_key, now - _CLOCK_SKEW, not_after)
    if keep_ca_key:
        _write_pem(ca_dir / "ca.key", _key_pem(ca_key), 0o600)
    else:
        (ca_dir / "ca.key").unlink(missing_ok=True)  # an overwritten CA's key
    for name in names:
        _write_bundle(out_dir / name, name, ca_key, ca_cert, now - _CLOCK_SKEW, not_after)
    # The CA certificate last: its presence marks a complete directory.
    _write_pem(ca_dir / "ca.pem", _cert_pem(ca_cert), 0o644)


def issue_bundle(
    ca_dir: Path, party: str, out_dir: Path, valid_days: int = 30, *, overwrite: bool = False
) -> Path:
    """A bundle for ``party`` in ``out_dir/<party>``, signed by the CA in ``ca_dir``.

    Adds a party to an existing session (``clicooper certs issue``). The
    certificate expires with the CA at the latest; the bundle's path is returned.
    """
    name = validate_party_name(party)
    if not isinstance(valid_days, int) or valid_days < 1:
        raise ValueError(f"valid_days must be a positive integer, got {valid_days!r}")
    ca_dir, bundle = Path(ca_dir), Path(out_dir) / name
    ca_cert = _load_cert(_read(ca_dir / "ca.pem"), ca_dir / "ca.pem")
    ca_key = _load_key(_read(ca_dir / "ca.key"), ca_dir / "ca.key")
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{ca_dir / 'ca.key'} is not an ECDSA key: {_INIT_HINT}")
    if _spki(ca_key.public_key()) != _spki(ca_cert.public_key()):
        raise ValueError(f"{ca_dir / 'ca.key'} does not match {ca_dir / 'ca.pem'}: {_INIT_HINT}")
    if (bundle / f"{name}.pem").exists() and not overwrite:
        raise FileExistsError(f"{bundle / f'{name}.pem'} already exists: pass --overwrite")
    now = dt.datetime.now(dt.UTC)
    not_after = min(now + dt.timedelta(days=valid_days), ca_cert.not_valid_after_utc)
    if not_after <= now:
        raise ValueError(f"{ca_dir / 'ca.pem'} has expired: {_INIT_HINT}")
    _private_dir(Path(out_dir))
    _write_bundle(bundle, name, ca_key, ca_cert, now - _CLOCK_SKEW, not_after)
    return bundle


def load_party_credentials(certs_dir: Path, party: str) -> tuple[bytes, bytes, bytes]:
    """``(ca_pem, cert_pem, key_pem)`` from ``party``'s own bundle, checked before any handshake.

    The checks turn what would be an opaque TLS handshake failure, or a party
    quietly holding powers it must not have, into a one-line reason: the
    directory holds no private key but the party's own (see the module
    docstring), the certificate names ``party`` (CN and DNS SubjectAltName),
    is signed by the bundle's CA, is within its validity period and matches the
    key, and the key file is readable by its owner only.
    """
    validate_party_name(party)
    certs_dir = Path(certs_dir)
    files = _bundle_files(certs_dir, party)
    key_path = certs_dir / f"{party}.key"
    ca_pem, cert_pem, key_pem = (
        _read(certs_dir / f) for f in ("ca.pem", f"{party}.pem", f"{party}.key")
    )
    ca = _load_cert(ca_pem, certs_dir / "ca.pem")
    cert = _load_cert(cert_pem, certs_dir / f"{party}.pem")
    key = _load_key(key_pem, key_path)
    _check_party_certificate(cert, ca, key, party, certs_dir)
    _refuse_foreign_keys(files, party, ca, cert, certs_dir)
    mode = stat.S_IMODE(key_path.stat().st_mode)
    if mode & 0o077:
        raise PermissionError(
            f"{key_path} is accessible to other users (mode {mode:o}): run `chmod 600 {key_path}`"
        )
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


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _write_bundle(
    bundle: Path,
    name: str,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    not_before: dt.datetime,
    not_after: dt.datetime,
) -> None:
    """``bundle`` (0700) with a fresh key (0600), its CA-signed certificate and ``ca.pem``."""
    _private_dir(bundle)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _party_certificate(name, key, ca_key, ca_cert, not_before, not_after)
    _write_pem(bundle / f"{name}.key", _key_pem(key), 0o600)
    _write_pem(bundle / f"{name}.pem", _cert_pem(cert), 0o644)
    _write_pem(bundle / "ca.pem", _cert_pem(ca_cert), 0o644)


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
        raise FileNotFoundError(f"missing {path}: {_INIT_HINT}") from None


def _load_key(pem: bytes, path: Path) -> PrivateKeyTypes:
    try:
        return serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ValueError(f"{path} is not an unencrypted PEM private key: {exc}") from None


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
        raise ValueError(f"{path} is not signed by {certs_dir / 'ca.pem'}: {_INIT_HINT}") from None
    now = dt.datetime.now(dt.UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise ValueError(
            f"{path} is valid only from {cert.not_valid_before_utc:%Y-%m-%d %H:%M} to "
            f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC: {_INIT_HINT}"
        )
    if _spki(key.public_key()) != _spki(cert.public_key()):
        raise ValueError(f"{certs_dir / f'{party}.key'} does not match {path}: {_INIT_HINT}")
    if party not in _dns_names(cert):
        raise ValueError(
            f"{path} has no SubjectAltName DNS:{party}, which its peers check in the TLS "
            f"handshake: {_INIT_HINT}"
        )


def _spki(public_key: PublicKeyTypes) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _dns_names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(san.get_values_for_type(x509.DNSName))


# -- what a party's bundle may hold -----------------------------------------------------------


def _bundle_hint(certs_dir: Path, party: str) -> str:
    """How to fix a refused bundle: the party's own bundle (its path when it is nearby)."""
    if certs_dir.name == party and (certs_dir / f"{party}.key").is_file():
        return f"keep only {party}.key, {party}.pem and ca.pem in {certs_dir}"
    near = [
        d / party for d in (certs_dir, certs_dir.parent) if (d / party / f"{party}.key").is_file()
    ]
    where = str(near[0]) if near else f"OUT/{party}/ of `clicooper certs init`"
    return f"pass {party}'s own bundle ({where}) and keep the CA key with the operator"


def _bundle_files(certs_dir: Path, party: str) -> list[tuple[Path, bytes]]:
    """Every regular file of ``certs_dir`` (searched ``_SCAN_DEPTH`` levels down), with its bytes.

    Refuses by name first: ``ca.key`` anywhere, and any ``*.key`` but the
    party's own ``<certs_dir>/<party>.key``. Symbolic links to directories,
    FIFOs and sockets are not followed (nothing can block the scan).
    """
    if not certs_dir.is_dir():
        return []  # the missing file is named by _read
    own_key = certs_dir / f"{party}.key"
    found: list[tuple[Path, bytes]] = []
    pending, entries = deque([(certs_dir, 0)]), 0
    while pending:
        directory, depth = pending.popleft()
        with os.scandir(directory) as scan:
            listing = sorted(scan, key=lambda e: e.name)
        for entry in listing:
            entries += 1
            path = Path(entry.path)
            if entries > _MAX_BUNDLE_ENTRIES or (
                entry.is_dir(follow_symlinks=False) and depth >= _SCAN_DEPTH
            ):
                raise ValueError(
                    f"{certs_dir} is not a party bundle (a bundle holds only {party}.key, "
                    f"{party}.pem and ca.pem): {_bundle_hint(certs_dir, party)}"
                )
            if entry.is_dir(follow_symlinks=False):
                pending.append((path, depth + 1))
                continue
            if entry.name.endswith(".key") and path != own_key:
                raise ValueError(
                    f"{path} is {_key_owner(entry.name[:-4], party)} private key, and a party "
                    f"may hold only its own: {_bundle_hint(certs_dir, party)}"
                )
            if entry.is_file():
                found.append((path, _read_small(path, certs_dir, party)))
    return found


def _key_owner(stem: str, party: str) -> str:
    """Whose key a file named ``<stem>.key`` is, by its name."""
    if stem == CA_NAME:
        return "the session CA's"
    if stem == party:
        return f"a copy of {party}'s"
    return f"{stem}'s" if PARTY_NAME.fullmatch(stem) else "a"


def _read_small(path: Path, certs_dir: Path, party: str) -> bytes:
    with open(path, "rb") as fh:
        data = fh.read(_MAX_BUNDLE_FILE + 1)
    if len(data) > _MAX_BUNDLE_FILE:
        raise ValueError(
            f"{path} is over {_MAX_BUNDLE_FILE} bytes: not part of a party bundle; "
            f"{_bundle_hint(certs_dir, party)}"
        )
    return data


def _refuse_foreign_keys(
    files: list[tuple[Path, bytes]],
    party: str,
    ca: x509.Certificate,
    cert: x509.Certificate,
    certs_dir: Path,
) -> None:
    """ValueError for the first private key in ``files`` that is not ``party``'s own.

    By content, so a renamed file is caught too: every PEM block labelled
    ``... PRIVATE KEY`` and every file that parses as a DER private key must
    have the public key of ``party``'s certificate. A key that cannot be read
    (encrypted, unknown format) cannot be shown to be the party's, so it is
    refused as well. Certificates found beside a key name its owner.
    """
    own, ca_spki = _spki(cert.public_key()), _spki(ca.public_key())
    owners = {ca_spki: "the session CA's"}
    keys: list[tuple[Path, bytes | None]] = []
    for path, data in files:
        blocks = list(_PEM_BLOCK.finditer(data))
        for block in blocks:
            label = block.group(1)
            if label.endswith(b"PRIVATE KEY"):
                keys.append((path, _key_spki(block.group(0), label)))
            elif label == b"CERTIFICATE":
                other = _certificate(block.group(0))
                if other is not None:
                    owners.setdefault(_spki(other.public_key()), f"{common_name(other)}'s")
        if not blocks:
            keys.extend((path, spki) for spki in _der_key_spki(data))
    for path, spki in keys:
        if spki != own:
            whose = owners.get(spki, "another party's") if spki else "an unreadable"
            raise ValueError(
                f"{path} holds {whose} private key, not {party}'s, and a party may hold only "
                f"its own: {_bundle_hint(certs_dir, party)}"
            )


def _key_spki(block: bytes, label: bytes) -> bytes | None:
    """The public key of the PEM private key ``block`` (None when it cannot be read)."""
    try:
        if label == b"OPENSSH PRIVATE KEY":
            key: PrivateKeyTypes = serialization.load_ssh_private_key(block, None)
        else:
            key = serialization.load_pem_private_key(block, None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return None
    return _spki(key.public_key())


def _der_key_spki(data: bytes) -> list[bytes | None]:
    """``[public key]`` when ``data`` is a DER private key, ``[None]`` if encrypted, else []."""
    try:
        return [_spki(serialization.load_der_private_key(data, None).public_key())]
    except TypeError:  # encrypted: a key, but not one that can be shown to be the party's
        return [None]
    except (ValueError, UnsupportedAlgorithm):
        return []


def _certificate(block: bytes) -> x509.Certificate | None:
    try:
        return x509.load_pem_x509_certificate(block)
    except ValueError:
        return None
