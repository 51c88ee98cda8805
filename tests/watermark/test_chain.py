"""Chain arithmetic: genesis, fresh target bits, canonical segment hashes."""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from clicooper.watermark.chain import (
    MAX_WATERMARK_BITS,
    bits_hash,
    frame,
    genesis_link,
    load_segment,
    save_segment,
    segment_bytes,
    segment_hash,
    stage_for_step,
    target_bits,
)

KEYS = [os.urandom(32) for _ in range(4)]


def test_genesis_is_deterministic_and_binds_every_input() -> None:
    sid, nonce = b"session-1", b"nonce-1"
    coms = [None, os.urandom(32), os.urandom(32), None]  # do, t1, t2, verifier
    base = genesis_link(sid, nonce, KEYS, coms, 256)
    assert base == genesis_link(sid, nonce, list(KEYS), list(coms), 256) and len(base) == 32
    pairs = [f for k, c in zip(KEYS, coms, strict=True) for f in (k, c or b"")]
    assert base == hashlib.sha256(frame(b"clicooper-v2/genesis", sid, nonce, 256, *pairs)).digest()
    variants = [
        genesis_link(b"session-2", nonce, KEYS, coms, 256),
        genesis_link(sid, b"nonce-2", KEYS, coms, 256),
        genesis_link(sid, nonce, KEYS[::-1], coms, 256),
        genesis_link(sid, nonce, KEYS[:-1], coms[:-1], 256),
        genesis_link(sid, nonce, KEYS, [None, coms[2], coms[1], None], 256),  # commitments
        genesis_link(sid, nonce, KEYS, [None, os.urandom(32), coms[2], None], 256),
        genesis_link(sid, nonce, KEYS, coms, 255),  # B
    ]
    assert base not in variants and len(set(variants)) == len(variants)


def test_genesis_refuses_unbounded_or_mismatched_inputs() -> None:
    coms = [None] * len(KEYS)
    for bits in (0, -1, MAX_WATERMARK_BITS + 1, 10**12, True):
        with pytest.raises(ValueError, match="watermark bits B must be"):
            genesis_link(b"s", b"n", KEYS, coms, bits)
    with pytest.raises(ValueError, match="one commitment"):
        genesis_link(b"s", b"n", KEYS, coms[:-1], 256)
    with pytest.raises(ValueError, match="watermark bits B must be"):
        target_bits(os.urandom(32), os.urandom(32), 1, 1, 10**12)  # never a hang


def test_framing_is_unambiguous() -> None:
    coms = [None] * len(KEYS)
    assert genesis_link(b"ab", b"c", KEYS, coms, 8) != genesis_link(b"a", b"bc", KEYS, coms, 8)
    assert frame(b"ab", b"c") != frame(b"a", b"bc")
    assert frame(7) == b"\x00\x00\x00\x017"


def test_target_bits_are_the_documented_hmac_bits() -> None:
    secret, prev = os.urandom(32), os.urandom(32)
    bits = target_bits(secret, prev, 2, 5, 256)
    mac = hmac.new(secret, frame(prev, 2, 5), hashlib.sha256).digest()
    expected = np.unpackbits(np.frombuffer(mac, dtype=np.uint8))  # big-endian bit order
    assert bits.dtype == torch.float32 and bits.shape == (256,)
    assert torch.equal(bits, torch.from_numpy(expected.astype(np.float32)))
    assert torch.equal(target_bits(secret, prev, 2, 5, 10), bits[:10])
    longer = target_bits(secret, prev, 2, 5, 600)
    assert torch.equal(longer[:256], bits) and longer.shape == (600,)
    block1 = hmac.new(secret, frame(prev, 2, 5) + frame(1), hashlib.sha256).digest()
    assert torch.equal(
        longer[256:512],
        torch.from_numpy(np.unpackbits(np.frombuffer(block1, np.uint8)).astype(np.float32)),
    )


def test_bits_are_fresh_per_link_party_and_stage() -> None:
    secret, prev = os.urandom(32), os.urandom(32)
    bits = target_bits(secret, prev, 1, 2)
    assert torch.equal(bits, target_bits(secret, prev, 1, 2))
    for other in (
        target_bits(secret, os.urandom(32), 1, 2),
        target_bits(secret, prev, 2, 2),
        target_bits(secret, prev, 1, 3),
        target_bits(os.urandom(32), prev, 1, 2),
    ):
        differ = float((other != bits).float().mean())
        assert 0.35 < differ < 0.65


@pytest.mark.parametrize(
    ("secret", "prev", "index", "stage", "n"),
    [
        (b"", b"\x00" * 32, 1, 1, 8),
        (b"k", b"\x00" * 31, 1, 1, 8),
        (b"k", b"\x00" * 32, 1, 0, 8),
        (b"k", b"\x00" * 32, -1, 1, 8),
        (b"k", b"\x00" * 32, 1, 1, 0),
    ],
)
def test_target_bits_reject_bad_input(
    secret: bytes, prev: bytes, index: int, stage: int, n: int
) -> None:
    with pytest.raises(ValueError):
        target_bits(secret, prev, index, stage, n)


def test_bits_hash_packs_bits_with_their_length() -> None:
    bits = target_bits(os.urandom(32), os.urandom(32), 1, 1)
    assert bits_hash(bits) == bits_hash(bits.bool())
    flipped = bits.clone()
    flipped[17] = 1 - flipped[17]
    assert bits_hash(flipped) != bits_hash(bits)
    assert bits_hash(torch.tensor([1.0])) != bits_hash(torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="only 0 and 1"):
        bits_hash(torch.tensor([0.0, 0.5]))
    with pytest.raises(ValueError, match="1-D"):
        bits_hash(torch.zeros(2, 2))


def test_segment_bytes_are_canonical(tmp_path: Path) -> None:
    w = torch.randn(4, 6)
    a = {"weight": w, "bias": torch.randn(4)}
    b = {"bias": a["bias"].clone(), "weight": w.t().contiguous().t()}  # other order, non-contiguous
    assert not b["weight"].is_contiguous()
    assert segment_bytes(a) == segment_bytes(b)
    assert segment_hash(a) == hashlib.sha256(segment_bytes(a)).digest()
    c = {"weight": w.clone(), "bias": a["bias"].clone()}
    c["weight"][0, 0] += 1e-6
    assert segment_hash(c) != segment_hash(a)
    path = save_segment(tmp_path / "s" / "t1.safetensors", a)
    assert hashlib.sha256(path.read_bytes()).digest() == segment_hash(a)
    assert segment_hash(load_segment(path)) == segment_hash(a)
    with pytest.raises(ValueError, match="bad entry"):
        segment_bytes({"w": [1, 2]})  # type: ignore[dict-item]


def test_load_segment_rejects_non_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"\x80\x04pickle")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_segment(path)
    with pytest.raises(ValueError, match="no segment file"):
        load_segment(tmp_path / "absent.safetensors")


def test_stage_for_step() -> None:
    assert [stage_for_step(s, 3) for s in range(7)] == [1, 1, 1, 2, 2, 2, 3]
    with pytest.raises(ValueError):
        stage_for_step(0, 0)
    with pytest.raises(ValueError):
        stage_for_step(-1, 3)
