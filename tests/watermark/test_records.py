"""Records: canonical bytes, signatures, links, strict parsing."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from clicooper.watermark.keys import PartyKey, verify_signature
from clicooper.watermark.records import (
    Record,
    canonical,
    from_canonical,
    link,
    link_of,
    sign,
)

KEY = PartyKey.generate()
HEX = "ab" * 32


def trainer_record(**changes: object) -> Record:
    fields = {
        "session_id": os.urandom(16).hex(),
        "stage": 2,
        "party": "t1",
        "kind": "trainer",
        "public_key": KEY.public_bytes().hex(),
        "prev": HEX,
        "body": {
            "segment_hash": HEX,
            "bits_hash": HEX,
            "ber": 0.0,
            "loss_mean": 1.25,
            "loss_last": 0.5,
            "steps": 10,
            "time": 1700000000.5,
            "param": "weight",
        },
    }
    fields.update(changes)
    return Record(**fields)  # type: ignore[arg-type]


def test_canonical_is_sorted_compact_and_excludes_the_signature() -> None:
    rec = trainer_record()
    data = canonical(rec)
    assert data == canonical(trainer_record(session_id=rec.session_id))
    parsed = json.loads(data)
    assert "signature" not in parsed and parsed["format"] == "clicooper-v1/record"
    assert data == json.dumps(parsed, sort_keys=True, separators=(",", ":")).encode()
    signed = sign(rec, KEY)
    assert canonical(signed) == data


def test_sign_link_and_round_trip() -> None:
    signed = sign(trainer_record(), KEY)
    sig = bytes.fromhex(signed.signature)
    assert verify_signature(KEY.public_bytes(), sig, canonical(signed))
    assert link(signed) == link_of(canonical(signed), sig)
    again = from_canonical(canonical(signed), sig)
    assert again == signed and link(again) == link(signed)
    other = dataclasses.replace(signed, body={**signed.body, "ber": 0.5})
    assert link(other) != link(signed)


def test_sign_refuses_a_key_other_than_the_declared_one() -> None:
    with pytest.raises(ValueError, match="not the public key declared"):
        sign(trainer_record(), PartyKey.generate())
    with pytest.raises(ValueError, match="unsigned"):
        link(trainer_record())


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"party": "t1", "kind": "do"}, "writes trainer records"),
        ({"party": "mallory", "kind": "trainer"}, "unknown party"),
        ({"stage": 0}, "stage must be"),
        ({"stage": True}, "stage must be"),
        ({"stage": 10**300}, "stage must be an int in 1 .. 1000000000"),
        ({"party": "t" + "9" * 300, "kind": "trainer"}, "unknown party 't99999"),
        ({"prev": "AB" * 32}, "prev must be"),
        ({"public_key": "ab"}, "public_key must be"),
        ({"session_id": ""}, "session_id"),
        ({"signature": "00" * 10}, "signature must be"),
        ({"body": {"segment_hash": HEX}}, "needs 'bits_hash'"),
        (  # the marked tensor's name is signed: verification and claims read it from here
            {"body": {k: v for k, v in trainer_record().body.items() if k != "param"}},
            "needs 'param'",
        ),
        (
            {
                "body": {
                    "segment_hash": HEX,
                    "bits_hash": HEX,
                    "ber": 1.5,
                    "loss_mean": 0,
                    "loss_last": 0,
                    "steps": 1,
                    "time": 0,
                    "param": "weight",
                }
            },
            "'ber'",
        ),
        (
            {
                "body": {
                    "segment_hash": HEX,
                    "bits_hash": HEX,
                    "ber": 0.1,
                    "loss_mean": float("nan"),
                    "loss_last": 0,
                    "steps": 1,
                    "time": 0,
                    "param": "weight",
                }
            },
            "finite",
        ),
        (
            {
                "body": {
                    "segment_hash": HEX,
                    "bits_hash": HEX,
                    "ber": 0.1,
                    "loss_mean": [1],
                    "loss_last": 0,
                    "steps": 1,
                    "time": 0,
                    "param": "weight",
                }
            },
            "JSON scalar",
        ),
    ],
)
def test_invalid_records_are_refused(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        trainer_record(**changes)


def test_attestation_and_do_bodies_are_checked() -> None:
    common = {"session_id": "00ff", "stage": 1, "public_key": HEX, "prev": HEX}
    Record(
        **common,
        party="verifier",
        kind="attestation",
        body={"subject": "t2", "subject_link": HEX, "ber": None, "verdict": "fail", "time": 1},
    )
    with pytest.raises(ValueError, match="verdict"):
        Record(
            **common,
            party="verifier",
            kind="attestation",
            body={"subject": "t2", "subject_link": HEX, "ber": 0.0, "verdict": "maybe", "time": 1},
        )
    with pytest.raises(ValueError, match="subject"):
        Record(
            **common,
            party="verifier",
            kind="attestation",
            body={"subject": "do", "subject_link": HEX, "ber": 0.0, "verdict": "ok", "time": 1},
        )
    with pytest.raises(ValueError, match="label_commitment"):
        Record(**common, party="do", kind="do", body={"head_hash": HEX, "steps": 1, "time": 1})


def test_from_canonical_refuses_malformed_and_non_canonical_bytes() -> None:
    signed = sign(trainer_record(), KEY)
    data, sig = canonical(signed), bytes.fromhex(signed.signature)
    payload = json.loads(data)
    bad = {
        "not json": b"{oops",
        "not ascii": b"\xff\xfe",
        "not canonical": json.dumps(payload, sort_keys=True).encode(),  # spaces
        "duplicate key": data[:-1] + b',"stage":3}',
        "missing field": json.dumps(
            {k: v for k, v in payload.items() if k != "prev"}, sort_keys=True, separators=(",", ":")
        ).encode(),
        "extra field": json.dumps(
            {**payload, "extra": 1}, sort_keys=True, separators=(",", ":")
        ).encode(),
        "other format": json.dumps(
            {**payload, "format": "other/v9"}, sort_keys=True, separators=(",", ":")
        ).encode(),
        "array": b"[]",
        "deep nesting": b"[" * 100_000,
        "too large": data[:-1] + b',"pad":"' + b"x" * 70_000 + b'"}',
        "huge integer": data.replace(b'"stage":2', b'"stage":' + b"9" * 5000),
    }
    for name, blob in bad.items():
        with pytest.raises(ValueError):
            from_canonical(blob, sig)
            pytest.fail(f"accepted {name}")
