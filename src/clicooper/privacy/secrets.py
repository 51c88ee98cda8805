"""The data owner's secret and the sub-secrets derived from it.

The owner secret is 32 bytes from the OS CSPRNG, stored only in the owner's
directory (mode 0700, file mode 0600, written by :mod:`clicooper.common.files`). Every sub-secret is
HKDF-SHA256(owner secret, info = "clicooper-v1/" + label), so sub-secrets for
different purposes are independent and none reveals the owner secret.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from clicooper.common.files import UnsafePathError, private_dir, write_private

__all__ = ["OwnerSecret", "UnsafePathError", "private_dir", "write_private"]

SECRET_BYTES = 32
SECRET_FILE = "owner.secret"


class OwnerSecret:
    """32 secret bytes and HKDF derivation of labelled sub-secrets."""

    def __init__(self, value: bytes) -> None:
        if len(value) != SECRET_BYTES:
            raise ValueError(f"an owner secret is {SECRET_BYTES} bytes, got {len(value)}")
        self._value = value

    @classmethod
    def generate(cls) -> OwnerSecret:
        return cls(os.urandom(SECRET_BYTES))

    def derive(self, label: str, length: int = 32) -> bytes:
        """HKDF-SHA256 sub-secret for ``label`` (no salt: the input is already uniform)."""
        hkdf = HKDF(
            algorithm=hashes.SHA256(),
            length=length,
            salt=None,
            info=b"clicooper-v1/" + label.encode(),
        )
        return hkdf.derive(self._value)

    def derive_seed(self, label: str) -> int:
        """A 63-bit generator seed derived for ``label``."""
        return int.from_bytes(self.derive(label, 8), "big") >> 1

    def commitment(self) -> bytes:
        """SHA-256 of a derived value: binds to the secret without revealing it."""
        return hashlib.sha256(self.derive("commitment")).digest()

    def save(self, directory: Path) -> Path:
        """Write the secret to ``directory/owner.secret`` (dir 0700, file 0600; no symlinks)."""
        return write_private(private_dir(directory) / SECRET_FILE, self._value)

    @classmethod
    def read(cls, path: Path) -> OwnerSecret:
        """The secret in file ``path`` (e.g. an earlier run's owner/owner.secret)."""
        try:
            value = Path(path).read_bytes()
        except OSError as exc:
            raise ValueError(
                f"cannot read the owner secret {path} ({exc.strerror}): give the "
                f"owner/{SECRET_FILE} file of an earlier run"
            ) from None
        if len(value) != SECRET_BYTES:
            raise ValueError(
                f"{path} holds {len(value)} bytes, not a {SECRET_BYTES}-byte owner secret: "
                f"give the owner/{SECRET_FILE} file of an earlier run"
            )
        return cls(value)

    @classmethod
    def load(cls, directory: Path) -> OwnerSecret:
        path = directory / SECRET_FILE
        try:
            return cls(path.read_bytes())
        except FileNotFoundError:
            raise ValueError(
                f"no owner secret at {path}: is this the data owner's directory?"
            ) from None
