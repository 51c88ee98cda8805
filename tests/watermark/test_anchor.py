"""The trust anchor: parsing what --anchor accepts, the anchor file, the key it must match."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from clicooper.watermark.anchor import Anchor, anchor_text, fingerprint, write_anchor
from clicooper.watermark.keys import PartyKey

# A fixed key: parametrised ids must be the same on every pytest-xdist worker.
KEY = PartyKey(Ed25519PrivateKey.from_private_bytes(bytes(range(32)))).public_bytes()
FP = hashlib.sha256(KEY).hexdigest()


def test_fingerprint_is_the_sha256_of_the_raw_key() -> None:
    assert fingerprint(KEY) == FP and len(FP) == 64


@pytest.mark.parametrize("text", [FP, FP.upper(), f"sha256:{FP}", f"  {FP}\n", KEY.hex()])
def test_anchor_from_hex_matches_the_key_only(text: str) -> None:
    anchor = Anchor.parse(text)
    assert anchor.matches(KEY)
    assert not anchor.matches(PartyKey.generate().public_bytes())


def test_anchor_from_file(tmp_path: Path) -> None:
    path = write_anchor(tmp_path, KEY)
    assert path.name == "anchor.txt" and oct(path.stat().st_mode & 0o777) == "0o644"
    assert f"fingerprint sha256:{FP}" in path.read_text()
    assert Anchor.parse(str(path)).matches(KEY) and Anchor.from_file(path).value == KEY


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"fingerprint sha256:" + FP.encode(), "no verifier-public-key line"),
        (anchor_text(KEY).replace(FP, "00" * 32).encode(), "fingerprint is not the SHA-256"),
        (b"\xff\x00" * 10, "no verifier-public-key line"),
        (b"#" * 5000, "larger than an anchor file"),
    ],
)
def test_bad_anchor_files_are_one_line_errors(tmp_path: Path, content: bytes, message) -> None:
    path = tmp_path / "anchor.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        Anchor.parse(str(path))


@pytest.mark.parametrize("text", ["", "abc", "zz" * 32, FP[:-1], "/no/such/anchor.txt"])
def test_neither_hex_nor_file_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="neither 64 hex digits"):
        Anchor.parse(text)


def test_run_prints_the_anchor_the_verifier_wrote(tmp_path: Path, cli_inprocess) -> None:
    out = tmp_path / "run"
    code, err, out_text = cli_inprocess(
        "run",
        "--dataset",
        "digits",
        "--mode",
        "clicooper",
        "--trainers",
        "2",
        "--epochs",
        "1",
        "--train-subset",
        "200",
        "--test-subset",
        "100",
        "--batch-size",
        "8",
        "--out",
        str(out),
    )
    assert code == 0, err
    anchor = Anchor.from_file(out / "verifier" / "anchor.txt")
    printed = fingerprint(anchor.value)
    assert f"trust anchor (verifier key fingerprint): {printed}" in err + out_text
    code, err, _ = cli_inprocess("verify", str(out), "--anchor", printed)
    assert code == 0 and f"anchored to verifier key {printed}" in err.strip().splitlines()[-1]
    code, err, _ = cli_inprocess("verify", str(out), "--anchor", "not-an-anchor")
    assert code == 2 and "neither 64 hex digits" in err
