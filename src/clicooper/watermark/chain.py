"""Chain arithmetic: genesis link, per-stage target bits, canonical segment bytes.

Encoding of multi-field hash inputs. ``frame(f_1, ..., f_k)`` is the
concatenation of ``u32be(len(f_j)) | f_j`` for each field, so no two different
field lists share an encoding. Integers are framed as their decimal ASCII
digits (``7`` -> ``b"7"``).

- Genesis: ``L_0 = SHA-256(frame(b"clicooper-v2/genesis", session_id, nonce, B,
  pk_1, c_1, ..., pk_m, c_m))`` with the parties in order (``do``, ``t1`` .. ``tn``,
  ``verifier``), ``pk_j`` the raw public key, ``c_j`` the watermark commitment of a
  trainer (``b""`` for the others) and ``B`` the watermark bit count. Every record
  chains from ``L_0`` and is signed, so every signature covers the keys, the
  commitments and B. Fields come in fixed positions, then in pairs: no two inputs
  share an encoding.
- Target bits of trainer ``i`` for stage ``t`` after the previous stage's last
  link ``L``: with ``m = frame(L, i, t)``, block 0 is ``HMAC-SHA256(w_i, m)`` and
  block ``k >= 1`` is ``HMAC-SHA256(w_i, m | frame(k))``; the bits are the
  first ``B`` bits of ``block_0 | block_1 | ...``, most significant bit of each
  byte first. For ``B <= 256`` this is exactly the first ``B`` bits of
  ``HMAC-SHA256(w_i, L | i | t)`` (DESIGN section 5).
- A segment's hash is SHA-256 of its canonical safetensors bytes: keys sorted,
  contiguous CPU tensors, no metadata.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from cryptography.hazmat.primitives import hashes, hmac
from safetensors.torch import load_file
from safetensors.torch import save as st_save

GENESIS_DOMAIN = b"clicooper-v2/genesis"
LINK_BYTES = 32
MAX_WATERMARK_BITS = 65536  # B is bounded so a tampered ledger cannot ask for 1e12 bits
_BLOCK_BITS = 256


def frame(*fields: bytes | int) -> bytes:
    """Length-prefixed concatenation ``u32be(len(f)) | f`` of each field (ints as decimal ASCII)."""
    out = bytearray()
    for field in fields:
        raw = str(field).encode("ascii") if isinstance(field, int) else bytes(field)
        out += len(raw).to_bytes(4, "big") + raw
    return bytes(out)


def check_watermark_bits(n_bits: object) -> int:
    """``n_bits`` as an int in ``1 .. MAX_WATERMARK_BITS``; ValueError (one line) otherwise."""
    if not isinstance(n_bits, int) or isinstance(n_bits, bool):
        raise ValueError(f"watermark bits B must be an integer, got {n_bits!r}")
    if not 1 <= n_bits <= MAX_WATERMARK_BITS:
        raise ValueError(f"watermark bits B must be 1 .. {MAX_WATERMARK_BITS}, got {n_bits}")
    return n_bits


def genesis_link(
    session_id: bytes,
    nonce: bytes,
    public_keys: Sequence[bytes],
    commitments: Sequence[bytes | None],
    watermark_bits: int,
) -> bytes:
    """``L_0`` of the module docstring: binds session, keys, commitments and B."""
    if not session_id or not nonce:
        raise ValueError("session id and nonce must be non-empty bytes")
    if not public_keys:
        raise ValueError("genesis needs the ordered public keys of every party")
    if len(commitments) != len(public_keys):
        raise ValueError("genesis needs one commitment (or None) per public key")
    pairs = [
        field
        for key, com in zip(public_keys, commitments, strict=True)
        for field in (bytes(key), b"" if com is None else bytes(com))
    ]
    bits = check_watermark_bits(watermark_bits)
    return hashlib.sha256(frame(GENESIS_DOMAIN, session_id, nonce, bits, *pairs)).digest()


def _hmac(secret: bytes, message: bytes) -> bytes:
    mac = hmac.HMAC(secret, hashes.SHA256())
    mac.update(message)
    return mac.finalize()


def target_bits(
    secret: bytes, prev_link: bytes, party_index: int, stage: int, n_bits: int = 256
) -> torch.Tensor:
    """Float 0/1 tensor of the first ``n_bits`` bits of the HMAC stream (module docstring)."""
    if not secret:
        raise ValueError("watermark secret must be non-empty bytes")
    if len(prev_link) != LINK_BYTES:
        raise ValueError(f"prev link must be {LINK_BYTES} bytes, got {len(prev_link)}")
    if party_index < 0 or stage < 1:
        raise ValueError(f"need party_index >= 0, stage >= 1 (got {party_index}, {stage})")
    check_watermark_bits(n_bits)
    message = frame(prev_link, party_index, stage)
    n_blocks = -(-n_bits // _BLOCK_BITS)
    stream = b"".join(
        _hmac(secret, message if k == 0 else message + frame(k)) for k in range(n_blocks)
    )
    bits = np.unpackbits(np.frombuffer(stream, dtype=np.uint8), bitorder="big")[:n_bits]
    return torch.from_numpy(bits.astype(np.float32))


def bits_hash(bits: torch.Tensor) -> bytes:
    """``SHA-256(u64be(B) | packbits(bits))``, bits packed most significant first.

    ``bits`` is a 1-D tensor of 0/1 values (float or bool); the length prefix keeps
    ``[1]`` and ``[1, 0]`` apart although they pack to the same byte.
    """
    flat = torch.as_tensor(bits).detach().cpu()
    if flat.dim() != 1:
        raise ValueError(f"bits must be a 1-D tensor, got shape {tuple(flat.shape)}")
    values = flat.to(torch.float64)
    if not bool(((values == 0) | (values == 1)).all()):
        raise ValueError("bits must hold only 0 and 1")
    packed = np.packbits(values.numpy().astype(np.uint8), bitorder="big").tobytes()
    return hashlib.sha256(len(flat).to_bytes(8, "big") + packed).digest()


def _canonical_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    clean = {}
    for key in sorted(state):
        value = state[key]
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ValueError(f"a segment state maps names to tensors; bad entry {key!r}")
        clean[key] = value.detach().cpu().clone(memory_format=torch.contiguous_format)
    return clean


def segment_bytes(state: dict[str, torch.Tensor]) -> bytes:
    """Canonical safetensors bytes of ``state``: keys sorted, CPU copies, no metadata."""
    return st_save(_canonical_state(state), metadata=None)


def segment_hash(state: dict[str, torch.Tensor]) -> bytes:
    """``SHA-256(segment_bytes(state))``."""
    return hashlib.sha256(segment_bytes(state)).digest()


def save_segment(path: Path | str, state: dict[str, torch.Tensor]) -> Path:
    """Write ``segment_bytes(state)`` to ``path``, mode 0600; its SHA-256 is the hash.

    Weights are private: missing parents are created 0700, and the file is
    written by :func:`clicooper.common.files.write_private` (atomic, no symlinks).
    """
    from clicooper.common.files import ensure_dir, write_private

    path = Path(path)
    ensure_dir(path.parent)
    return write_private(path, segment_bytes(state))


def load_segment(path: Path | str) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file (``safetensors.torch.load_file``; never unpickles)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no segment file at {path}")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises several types for malformed files
        raise ValueError(f"{path} is not a readable safetensors file: {exc}") from None


def stage_for_step(step: int, steps_per_stage: int) -> int:
    """Stage of 0-based training step ``step``: ``step // steps_per_stage + 1``."""
    if steps_per_stage < 1:
        raise ValueError(f"steps_per_stage must be >= 1, got {steps_per_stage}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return step // steps_per_stage + 1
