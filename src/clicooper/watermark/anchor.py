"""The trust anchor of a session: its verifier's Ed25519 public key, held apart from the ledger.

A ledger is self-consistent when its signatures and links check out, but whoever
controls the run directory can write a wholly new one with fresh keys. What ties a
ledger to the session that really ran is the verifier's public key, published when
the session runs (printed at the end of ``clicooper run``, and written to
``verifier/anchor.txt``): the ledger's registered verifier key must be that key.
The verifier signs an attestation of every trainer record, each chained from
``L_0``, so the anchor pins every record, commitment and B of the ledger.

The fingerprint is ``SHA-256(raw public key)`` in lowercase hex. An anchor given
as 64 hex digits matches a key equal to it or whose fingerprint is equal to it:
forging either would take an Ed25519 private key for a chosen public key, or a
SHA-256 preimage.

``anchor.txt`` (text, one ``name value`` a line, ``#`` comments)::

    verifier-public-key <64 hex digits>
    fingerprint sha256:<64 hex digits>
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

ANCHOR_FILE = "anchor.txt"
_MAX_FILE_BYTES = 4096
_HEX64 = re.compile(r"(?:sha256:)?([0-9a-f]{64})")
_KEY64 = re.compile(r"[0-9a-f]{64}")


def fingerprint(public_key: bytes) -> str:
    """``SHA-256(public_key)`` in lowercase hex."""
    return hashlib.sha256(bytes(public_key)).hexdigest()


def anchor_text(public_key: bytes) -> str:
    """The contents of ``anchor.txt`` for the verifier key ``public_key``."""
    return (
        "# clicooper trust anchor: the verifier's Ed25519 public key of this session.\n"
        "# Publish the fingerprint when the session runs; check a ledger with\n"
        "#   clicooper verify RUN_DIR --anchor FINGERPRINT\n"
        f"verifier-public-key {bytes(public_key).hex()}\n"
        f"fingerprint sha256:{fingerprint(public_key)}\n"
    )


@dataclass(frozen=True)
class Anchor:
    """An expected verifier key: a fingerprint or raw key, as 32 bytes (see module docstring)."""

    value: bytes

    @classmethod
    def parse(cls, text: str) -> Anchor:
        """An anchor from 64 hex digits (``sha256:`` optional) or from an anchor file's path.

        ValueError (one line, saying what to pass) when it is neither.
        """
        match = _HEX64.fullmatch(text.strip().lower())
        if match:
            return cls(bytes.fromhex(match.group(1)))
        path = Path(text)
        if not path.is_file():
            raise ValueError(
                f"--anchor {text[:80]!r} is neither 64 hex digits (the verifier key's "
                "fingerprint or the key) nor an anchor file"
            )
        return cls.from_file(path)

    @classmethod
    def from_file(cls, path: Path) -> Anchor:
        """The key of an ``anchor.txt``; its fingerprint line, when present, must agree."""
        with open(path, "rb") as handle:
            raw = handle.read(_MAX_FILE_BYTES + 1)
        if len(raw) > _MAX_FILE_BYTES:
            raise ValueError(f"{path} is larger than an anchor file ({_MAX_FILE_BYTES} bytes)")
        fields: dict[str, str] = {}
        for line in raw.decode("ascii", errors="replace").splitlines():
            name, _, value = line.strip().partition(" ")
            if name and not name.startswith("#"):
                fields[name] = value.strip().lower()
        key = fields.get("verifier-public-key", "")
        if not _KEY64.fullmatch(key):
            raise ValueError(f"{path} is not an anchor file: no verifier-public-key line")
        public_key = bytes.fromhex(key)
        stated = _HEX64.fullmatch(fields.get("fingerprint", fingerprint(public_key)))
        if stated is None or stated.group(1) != fingerprint(public_key):
            raise ValueError(f"{path}: its fingerprint is not the SHA-256 of its public key")
        return cls(public_key)

    def matches(self, public_key: bytes) -> bool:
        """True when ``public_key`` is this anchor or has it as its fingerprint."""
        key = bytes(public_key)
        return self.value in (key, hashlib.sha256(key).digest())

    def __str__(self) -> str:
        return self.value.hex()


def write_anchor(directory: Path, public_key: bytes) -> Path:
    """Write ``directory/anchor.txt`` (public: mode 0644) and return its path."""
    path = Path(directory) / ANCHOR_FILE
    path.write_text(anchor_text(public_key))
    path.chmod(0o644)
    return path
