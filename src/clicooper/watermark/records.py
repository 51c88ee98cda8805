"""Signed ledger records and their canonical encoding.

``canonical(r)`` is the UTF-8 of ``json.dumps(obj, sort_keys=True,
separators=(",", ":"), ensure_ascii=True, allow_nan=False)`` where ``obj``
holds every field except ``signature`` plus ``"format": "clicooper-v1/record"``
(so a record signature can never be mistaken for a signature in another
protocol). The signature is Ed25519 over those bytes, and the record's link is
``SHA-256(canonical(r) | signature)`` (the signature has a fixed 64 bytes, so
the concatenation is unambiguous).

Body fields (JSON scalars; more keys may be added, and are signed too):

- ``do``: ``head_hash`` (hex SHA-256), ``label_commitment`` (hex SHA-256), ``steps``, ``time``
- trainer: ``segment_hash``, ``bits_hash`` (hex SHA-256), ``ber``, ``loss_mean``,
  ``loss_last``, ``steps``, ``time``, ``param`` (the marked tensor's name: signed,
  so verification and claims read the watermark from the tensor the trainer named)
- attestation: ``subject`` (trainer name), ``subject_link`` (hex), ``ber`` (or null),
  ``verdict`` (``"ok"`` / ``"fail"``), ``time``
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from clicooper.watermark.keys import PartyKey

FORMAT = "clicooper-v1/record"
KINDS = {"do": "do", "verifier": "attestation"}  # every other party (t1..tn) is a "trainer"
TRAINER_NAME = re.compile(r"t[1-9][0-9]{0,8}")
MAX_STAGE = 10**9  # stages are numbered 1 .. MAX_STAGE (a bound on tampered input)
MAX_CANONICAL_BYTES = 1 << 16  # an honest record's canonical bytes are under 1 KiB
_HEX = re.compile(r"(?:[0-9a-f]{2})+")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_SIG_HEX = re.compile(r"(?:[0-9a-f]{128})?")

Scalar = str | int | float | bool | None


def kind_of(party: str) -> str:
    """Record kind of a party: ``do`` -> do, ``verifier`` -> attestation, ``ti`` -> trainer."""
    if party in KINDS:
        return KINDS[party]
    if TRAINER_NAME.fullmatch(party):
        return "trainer"
    raise ValueError(f"unknown party {shown(party)}: use do, t1..tn or verifier")


def trainer_index(party: str) -> int:
    """``i`` of trainer ``ti``."""
    if not TRAINER_NAME.fullmatch(party):
        raise ValueError(f"{shown(party)} is not a trainer name (t1..tn)")
    return int(party[1:])


def shown(value: Any) -> str:
    """``repr`` cut short, so that a message about tampered input stays one short line."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_hex64(value: Any) -> bool:
    return isinstance(value, str) and _HEX64.fullmatch(value) is not None


def _check_ber(value: Any) -> bool:
    return _is_number(value) and 0.0 <= value <= 1.0


_BODY_RULES: dict[str, dict[str, Any]] = {
    "do": {
        "head_hash": _check_hex64,
        "label_commitment": _check_hex64,
        "steps": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
        "time": _is_number,
    },
    "trainer": {
        "segment_hash": _check_hex64,
        "bits_hash": _check_hex64,
        "ber": _check_ber,
        "loss_mean": _is_number,
        "loss_last": _is_number,
        "steps": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
        "time": _is_number,
        "param": lambda v: isinstance(v, str) and 0 < len(v) <= 256,
    },
    "attestation": {
        "subject": lambda v: isinstance(v, str) and TRAINER_NAME.fullmatch(v) is not None,
        "subject_link": _check_hex64,
        "ber": lambda v: v is None or _check_ber(v),
        "verdict": lambda v: v in ("ok", "fail"),
        "time": _is_number,
    },
}


def _check_body(kind: str, body: Any) -> None:
    if not isinstance(body, dict):
        raise ValueError("record body must be a dict")
    for key, value in body.items():
        if not isinstance(key, str):
            raise ValueError(f"record body keys must be strings, got {shown(key)}")
        if not isinstance(value, Scalar):
            raise ValueError(
                f"body field {shown(key)} must be a JSON scalar, got {type(value).__name__}"
            )
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"body field {shown(key)} must be finite, got {value}")
    for key, rule in _BODY_RULES[kind].items():
        if key not in body:
            raise ValueError(f"a {kind} record body needs {key!r}")
        if not rule(body[key]):
            raise ValueError(
                f"body field {key!r} of a {kind} record is invalid: {shown(body[key])}"
            )


@dataclass(frozen=True)
class Record:
    """One ledger entry; hex strings are lowercase, ``signature`` is empty until signed."""

    session_id: str
    stage: int
    party: str
    kind: str
    public_key: str
    prev: str
    body: dict[str, Scalar] = field(default_factory=dict)
    signature: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.session_id, str) or not _HEX.fullmatch(self.session_id):
            raise ValueError("session_id must be a non-empty lowercase hex string")
        stage = self.stage
        if not isinstance(stage, int) or isinstance(stage, bool) or not 1 <= stage <= MAX_STAGE:
            raise ValueError(f"stage must be an int in 1 .. {MAX_STAGE}, got {shown(stage)}")
        if not isinstance(self.party, str):
            raise ValueError(f"party must be a string, got {shown(self.party)}")
        if kind_of(self.party) != self.kind:
            raise ValueError(
                f"party {self.party} writes {kind_of(self.party)} records, not {self.kind!r}"
            )
        if not _check_hex64(self.public_key):
            raise ValueError("public_key must be 64 lowercase hex digits (raw Ed25519 key)")
        if not _check_hex64(self.prev):
            raise ValueError("prev must be 64 lowercase hex digits (a SHA-256 link)")
        if not isinstance(self.signature, str) or not _SIG_HEX.fullmatch(self.signature):
            raise ValueError("signature must be empty or 128 lowercase hex digits")
        _check_body(self.kind, self.body)
        object.__setattr__(self, "body", dict(self.body))


_FIELDS = tuple(f.name for f in dataclasses.fields(Record) if f.name != "signature")


def _payload(record: Record) -> dict[str, Any]:
    payload = {name: getattr(record, name) for name in _FIELDS}
    payload["format"] = FORMAT
    return payload


def canonical(record: Record) -> bytes:
    """Deterministic JSON of every field but the signature (module docstring)."""
    text = json.dumps(
        _payload(record), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )
    return text.encode("ascii")


def sign(record: Record, key: PartyKey) -> Record:
    """``record`` with ``signature = Ed25519(key, canonical(record))``.

    ValueError if ``key`` is not the record's declared ``public_key``.
    """
    if key.public_bytes().hex() != record.public_key:
        raise ValueError(
            f"the signing key is not the public key declared in {record.party}'s record"
        )
    return dataclasses.replace(record, signature=key.sign(canonical(record)).hex())


def link(record: Record) -> bytes:
    """``SHA-256(canonical(record) | signature)``; ValueError for an unsigned record."""
    if not record.signature:
        raise ValueError("an unsigned record has no link: sign it first")
    return link_of(canonical(record), bytes.fromhex(record.signature))


def link_of(canonical_bytes: bytes, signature: bytes) -> bytes:
    """``SHA-256(canonical_bytes | signature)``: the link of stored bytes, parsed or not."""
    return hashlib.sha256(bytes(canonical_bytes) + bytes(signature)).digest()


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if len(keys) != len(set(keys)):
        raise ValueError("duplicate key in record JSON")
    return dict(pairs)


def from_canonical(canonical_bytes: bytes, signature: bytes) -> Record:
    """The record whose canonical encoding is exactly ``canonical_bytes``.

    ValueError for anything malformed: not JSON, duplicate or missing or extra keys,
    a wrong format tag, invalid fields, bytes that are not in canonical form, more
    than ``MAX_CANONICAL_BYTES`` bytes, or nesting deeper than Python's parser takes.
    """
    if len(canonical_bytes) > MAX_CANONICAL_BYTES:
        raise ValueError(
            f"record has {len(canonical_bytes)} bytes, more than {MAX_CANONICAL_BYTES}"
        )
    try:
        payload = json.loads(
            bytes(canonical_bytes).decode("ascii"), object_pairs_hook=_no_duplicates
        )
    except ValueError as exc:  # not ASCII, not JSON, or an integer of over 4,300 digits
        raise ValueError(f"record is not ASCII JSON: {str(exc)[:80]}") from None
    except RecursionError:
        raise ValueError("record JSON is nested too deeply") from None
    if not isinstance(payload, dict):
        raise ValueError("record JSON must be an object")
    if payload.pop("format", None) != FORMAT:
        raise ValueError(f"record JSON lacks format {FORMAT!r}")
    if set(payload) != set(_FIELDS):
        raise ValueError(f"record JSON must have exactly the fields {', '.join(_FIELDS)}")
    try:
        record = Record(**payload, signature=bytes(signature).hex())
    except TypeError as exc:
        raise ValueError(f"malformed record: {exc}") from None
    if canonical(record) != bytes(canonical_bytes):
        raise ValueError("record bytes are not in canonical form")
    return record
