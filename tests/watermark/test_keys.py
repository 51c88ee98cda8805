"""Party keys: signatures verify only for the exact data, key and signature."""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from clicooper.watermark.keys import (
    PartyKey,
    commitment,
    new_watermark_secret,
    verify_signature,
)


def test_sign_verify_and_tamper() -> None:
    key, other = PartyKey.generate(), PartyKey.generate()
    data = b"stage 3 record"
    sig = key.sign(data)
    assert len(key.public_bytes()) == 32 and len(sig) == 64
    assert verify_signature(key.public_bytes(), sig, data)
    assert not verify_signature(key.public_bytes(), sig, data + b"!")
    assert not verify_signature(other.public_bytes(), sig, data)
    flipped = bytes([sig[0] ^ 1]) + sig[1:]
    assert not verify_signature(key.public_bytes(), flipped, data)


@pytest.mark.parametrize(
    ("public", "signature"),
    [
        (b"", b""),
        (b"\x00" * 31, b"\x00" * 64),
        (b"\x00" * 32, b"\x00" * 63),
        (None, None),
        ("ab", 3),
    ],
)
def test_verify_never_raises_on_bad_input(public: object, signature: object) -> None:
    assert verify_signature(public, signature, b"data") is False  # type: ignore[arg-type]


def test_save_load_round_trip_with_private_modes(tmp_path: Path) -> None:
    key = PartyKey.generate()
    path = key.save(tmp_path / "keys" / "t1.pem")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    loaded = PartyKey.load(path)
    assert loaded.public_bytes() == key.public_bytes()
    assert verify_signature(key.public_bytes(), loaded.sign(b"x"), b"x")


def test_save_tightens_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    path.write_bytes(b"old")
    path.chmod(0o644)
    PartyKey.generate().save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_load_rejects_missing_garbage_and_foreign_keys(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no key file"):
        PartyKey.load(tmp_path / "absent.pem")
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
    with pytest.raises(ValueError, match="not an unencrypted PEM"):
        PartyKey.load(garbage)
    foreign = tmp_path / "ec.pem"
    foreign.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(ValueError, match="expected an Ed25519 key"):
        PartyKey.load(foreign)


def test_watermark_secret_and_commitment() -> None:
    a, b = new_watermark_secret(), new_watermark_secret()
    assert len(a) == 32 and a != b
    assert commitment(a) == hashlib.sha256(a).digest()
    assert commitment(a) != commitment(b)
