"""Party signing keys and watermark secrets.

Each party signs its ledger records with an Ed25519 key (RFC 8032): a
signature is 64 bytes, a raw public key 32 bytes. Each trainer also holds a
32-byte watermark secret ``w`` from the OS CSPRNG; only its commitment
``SHA-256(w)`` is published in the ledger, and the secret is revealed to the
verifier (or in an ownership claim), who checks it against the commitment.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from clicooper.common.files import ensure_dir, write_private

PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
SECRET_BYTES = 32


class PartyKey:
    """An Ed25519 private key of one party."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        if not isinstance(private_key, Ed25519PrivateKey):
            raise TypeError("PartyKey wraps an Ed25519PrivateKey")
        self._key = private_key

    @classmethod
    def generate(cls) -> PartyKey:
        """A fresh key from the OS CSPRNG."""
        return cls(Ed25519PrivateKey.generate())

    def public_bytes(self) -> bytes:
        """The raw 32-byte public key."""
        return self._key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    def sign(self, data: bytes) -> bytes:
        """The 64-byte Ed25519 signature of ``data``."""
        return self._key.sign(bytes(data))

    def save(self, path: Path | str) -> Path:
        """Write the key as unencrypted PKCS#8 PEM, file mode 0600 (parent made 0700 if missing).

        Through :func:`clicooper.common.files.write_private`: a symlink at ``path``
        or at its directory is refused (:class:`~clicooper.common.files.UnsafePathError`).
        """
        path = Path(path)
        ensure_dir(path.parent)
        pem = self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return write_private(path, pem)

    @classmethod
    def load(cls, path: Path | str) -> PartyKey:
        """Read a key written by :meth:`save`; ValueError if it is not an Ed25519 private key."""
        path = Path(path)
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except FileNotFoundError:
            raise ValueError(f"no key file at {path}: create one with PartyKey.save") from None
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise ValueError(f"{path} is not an unencrypted PEM private key") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path} holds a {type(key).__name__}, expected an Ed25519 key")
        return cls(key)


def verify_signature(public: bytes, signature: bytes, data: bytes) -> bool:
    """True iff ``signature`` is a valid Ed25519 signature of ``data`` under ``public``.

    Any bad input (wrong types or lengths, an invalid point) gives False; never raises.
    """
    try:
        if len(public) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
            return False
        Ed25519PublicKey.from_public_bytes(bytes(public)).verify(bytes(signature), bytes(data))
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
        return False
    return True


def new_watermark_secret() -> bytes:
    """32 bytes from the OS CSPRNG."""
    return os.urandom(SECRET_BYTES)


def commitment(secret: bytes) -> bytes:
    """``SHA-256(secret)``: binds the ledger to a watermark secret without revealing it."""
    return hashlib.sha256(bytes(secret)).digest()
