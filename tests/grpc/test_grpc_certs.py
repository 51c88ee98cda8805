"""Session certificates: layout, permissions, X.509 content and load-time checks.

What a bundle may hold (no CA key, no other party's key) is in test_bundles.py.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import shutil
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from clicooper.runtime.certs import create_certificates, load_party_credentials

pytestmark = pytest.mark.timeout(30)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_layout_and_permissions(tmp_path: Path) -> None:
    """One bundle per party (its key, its certificate, the CA's) and the CA kept apart."""
    out = tmp_path / "certs"
    parties = ("do", "t1", "verifier")
    create_certificates(list(parties), out)
    assert {p.name for p in out.iterdir()} == {"ca", *parties}
    assert {p.name for p in (out / "ca").iterdir()} == {"ca.key", "ca.pem"}
    for party in parties:
        assert {p.name for p in (out / party).iterdir()} == {
            f"{party}.key",
            f"{party}.pem",
            "ca.pem",
        }
        assert (out / party / "ca.pem").read_bytes() == (out / "ca/ca.pem").read_bytes()
    for directory in (out, out / "ca", *(out / p for p in parties)):
        assert _mode(directory) == 0o700, directory
    keys = list(out.rglob("*.key"))
    assert len(keys) == 4 and all(_mode(key) == 0o600 for key in keys)
    assert [k for k in keys if k.name == "ca.key"] == [out / "ca/ca.key"]


def test_the_ca_key_can_stay_unwritten(tmp_path: Path) -> None:
    create_certificates(["t1"], tmp_path, keep_ca_key=False)
    assert not list(tmp_path.rglob("ca.key"))
    assert (tmp_path / "ca/ca.pem").is_file()
    load_party_credentials(tmp_path / "t1", "t1")


def test_party_certificate_content(tmp_path: Path) -> None:
    create_certificates(["t1"], tmp_path, valid_days=3)
    ca, cert = _cert(tmp_path / "ca/ca.pem"), _cert(tmp_path / "t1/t1.pem")
    cert.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "t1"
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "t1"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    }
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    lifetime = cert.not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert dt.timedelta(days=2, hours=23) < lifetime <= dt.timedelta(days=3)


def test_every_run_gets_fresh_keys(tmp_path: Path) -> None:
    create_certificates(["t1"], tmp_path / "a")
    create_certificates(["t1"], tmp_path / "b")
    assert (tmp_path / "a/t1/t1.key").read_bytes() != (tmp_path / "b/t1/t1.key").read_bytes()
    assert (
        _cert(tmp_path / "a/ca/ca.pem").serial_number
        != _cert(tmp_path / "b/ca/ca.pem").serial_number
    )


@pytest.mark.parametrize(
    "parties", [["T1"], ["1t"], ["t" * 33], ["ca"], ["t 1"], ["t1", "t1"], [], ["t1\n"]]
)
def test_bad_party_names_are_refused_in_one_line(tmp_path: Path, parties: list[str]) -> None:
    with pytest.raises(ValueError) as err:
        create_certificates(parties, tmp_path / "c")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "c").exists()


def test_existing_ca_is_only_replaced_on_request(tmp_path: Path) -> None:
    create_certificates(["t1"], tmp_path)
    before = (tmp_path / "ca/ca.pem").read_bytes()
    with pytest.raises(FileExistsError, match="already exists"):
        create_certificates(["t1"], tmp_path)
    assert (tmp_path / "ca/ca.pem").read_bytes() == before
    create_certificates(["t1"], tmp_path, overwrite=True)
    assert (tmp_path / "ca/ca.pem").read_bytes() != before
    load_party_credentials(tmp_path / "t1", "t1")  # the bundle was reissued by the new CA


def test_a_directory_of_the_old_shared_layout_is_refused(tmp_path: Path) -> None:
    (tmp_path / "ca.key").write_bytes(b"old")
    with pytest.raises(FileExistsError, match="old shared layout"):
        create_certificates(["t1"], tmp_path, overwrite=True)
    assert not (tmp_path / "t1").exists()


def test_load_returns_the_pem_files(tmp_path: Path) -> None:
    create_certificates(["t1", "t2"], tmp_path)
    ca, cert, key = load_party_credentials(tmp_path / "t2", "t2")
    assert ca == (tmp_path / "ca/ca.pem").read_bytes()
    assert cert == (tmp_path / "t2/t2.pem").read_bytes()
    assert key == (tmp_path / "t2/t2.key").read_bytes()


def test_load_names_the_missing_file_and_the_fix(tmp_path: Path) -> None:
    create_certificates(["t1"], tmp_path)
    (tmp_path / "t1/t1.pem").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"missing .*t1\.pem: create .*`clicooper certs init`"
    ):
        load_party_credentials(tmp_path / "t1", "t1")


def test_load_refuses_a_certificate_of_another_ca(tmp_path: Path) -> None:
    create_certificates(["t1"], tmp_path / "a")
    create_certificates(["t1"], tmp_path / "b")
    shutil.copy(tmp_path / "b/ca/ca.pem", tmp_path / "a/t1/ca.pem")
    with pytest.raises(ValueError, match="is not signed by"):
        load_party_credentials(tmp_path / "a/t1", "t1")


def test_load_refuses_a_certificate_issued_to_another_party(tmp_path: Path) -> None:
    create_certificates(["t1", "t2"], tmp_path)
    shutil.copy(tmp_path / "t2/t2.pem", tmp_path / "t1/t1.pem")
    shutil.copy(tmp_path / "t2/t2.key", tmp_path / "t1/t1.key")
    with pytest.raises(ValueError, match="issued to 't2', not 't1'"):
        load_party_credentials(tmp_path / "t1", "t1")


def test_load_refuses_a_certificate_without_the_party_in_its_san(tmp_path: Path) -> None:
    """CN t1 but SubjectAltName without DNS:t1: peers would fail the handshake opaquely."""
    create_certificates(["t1"], tmp_path)
    ca_key = serialization.load_pem_private_key((tmp_path / "ca/ca.key").read_bytes(), None)
    old = _cert(tmp_path / "t1/t1.pem")
    san = x509.SubjectAlternativeName([x509.DNSName("localhost")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(old.subject)
        .issuer_name(old.issuer)
        .public_key(old.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(old.not_valid_before_utc)
        .not_valid_after(old.not_valid_after_utc)
        .add_extension(san, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    (tmp_path / "t1/t1.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(ValueError, match="no SubjectAltName DNS:t1"):
        load_party_credentials(tmp_path / "t1", "t1")


def test_load_refuses_a_key_that_does_not_match(tmp_path: Path) -> None:
    create_certificates(["t1", "t2"], tmp_path)
    shutil.copy(tmp_path / "t2/t2.key", tmp_path / "t1/t1.key")
    with pytest.raises(ValueError, match="does not match"):
        load_party_credentials(tmp_path / "t1", "t1")


def test_load_refuses_garbage_files(tmp_path: Path) -> None:
    create_certificates(["t1"], tmp_path)
    (tmp_path / "t1/t1.key").write_bytes(b"not a key")
    with pytest.raises(ValueError, match="not an unencrypted PEM private key"):
        load_party_credentials(tmp_path / "t1", "t1")
    (tmp_path / "t1/t1.pem").write_bytes(b"not a cert")
    with pytest.raises(ValueError, match="not a PEM certificate"):
        load_party_credentials(tmp_path / "t1", "t1")


def test_load_refuses_an_expired_certificate(tmp_path: Path) -> None:
    create_certificates(["t1"], tmp_path)
    ca_key = serialization.load_pem_private_key((tmp_path / "ca/ca.key").read_bytes(), None)
    old = _cert(tmp_path / "t1/t1.pem")
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=2)
    expired = (
        x509.CertificateBuilder()
        .subject_name(old.subject)
        .issuer_name(old.issuer)
        .public_key(old.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(past - dt.timedelta(days=1))
        .not_valid_after(past)
        .sign(ca_key, hashes.SHA256())
    )
    (tmp_path / "t1/t1.pem").write_bytes(expired.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(ValueError, match="is valid only from"):
        load_party_credentials(tmp_path / "t1", "t1")


def test_a_shared_existing_directory_is_not_used_for_keys(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    (shared / "notes.txt").write_text("someone else's file")
    shared.chmod(0o755)
    with pytest.raises(PermissionError, match="accessible to other users"):
        create_certificates(["t1"], shared)
    assert _mode(shared) == 0o755 and not (shared / "t1.key").exists()
    shared.chmod(0o700)
    create_certificates(["t1"], shared)
    assert (shared / "t1/t1.key").exists()
