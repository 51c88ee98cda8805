"""verify_ledger on a real three-stage chain, honest and attacked."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import pytest

from clicooper.watermark.anchor import Anchor, fingerprint
from clicooper.watermark.chain import genesis_link, save_segment
from clicooper.watermark.ledger import Ledger, StoredRow
from clicooper.watermark.records import Record, canonical, from_canonical, link, sign
from clicooper.watermark.verify import NOT_RETAINED, VerifyReport, verify_ledger

# Row numbers of the fabricated chain (2 trainers, 3 stages, 5 records a stage).
T1_STAGE2, T2_STAGE2 = 7, 9


def full_verify(chain, **changes) -> VerifyReport:
    kwargs = {
        "audit_dir": chain.audit_dir,
        "final_segments_dir": chain.final_dir,
        "watermark_secrets": chain.secrets,
    }
    kwargs.update(changes)
    return verify_ledger(chain.ledger_path, **kwargs)


def failed_at(report: VerifyReport, seq: int, *words: str) -> None:
    assert not report.ok
    assert report.first_failure is not None
    assert report.first_failure.startswith(f"record {seq} "), report.first_failure
    for word in words:
        assert word in report.first_failure, report.first_failure


def as_row(record: Record, seq: int) -> StoredRow:
    return StoredRow(
        seq,
        record.stage,
        record.party,
        record.kind,
        record.prev,
        link(record).hex(),
        canonical(record),
        bytes.fromhex(record.signature),
    )


def rechain(chain, records: list[Record], start: int) -> list[StoredRow]:
    """Re-sign records[start:] with their parties' keys so every link is consistent again.

    This is what a coalition holding *every* key could do; it is used to isolate
    one lie (e.g. a wrong bits_hash) from the link breaks it would otherwise cause.
    """
    out = list(records[:start])
    for record in records[start:]:
        prev = link(out[-1]).hex()
        body = dict(record.body)
        if record.kind == "attestation":
            body["subject_link"] = prev
        out.append(
            sign(dataclasses.replace(record, prev=prev, body=body), chain.keys[record.party])
        )
    return [as_row(r, i) for i, r in enumerate(out, start=1)]


def records_of(chain) -> list[Record]:
    with Ledger.open(chain.ledger_path, readonly=True) as ledger:
        return ledger.records()


# ---- the honest chain -------------------------------------------------------------------
def test_honest_chain_verifies(chain) -> None:
    report = full_verify(chain)
    assert report.ok, report.failures
    assert report.first_failure is None and len(report.lines) == 15
    assert all(line.verdict == "ok" and line.signature_ok and line.link_ok for line in report.lines)
    trainers = [line for line in report.lines if line.kind == "trainer"]
    assert len(trainers) == 6 and all(t.hash_ok and t.ber == 0.0 for t in trainers)
    assert verify_ledger(chain.ledger_path).ok  # signatures and links only


def test_pruned_audit_stages_are_not_retained_but_the_last_is_required(chain) -> None:
    shutil.rmtree(chain.audit_dir / "1")
    report = full_verify(chain)
    assert report.ok, report.failures
    stage1 = [line for line in report.lines if line.kind == "trainer" and line.stage == 1]
    assert [line.verdict for line in stage1] == [NOT_RETAINED, NOT_RETAINED]
    shutil.rmtree(chain.audit_dir / "3")
    failed_at(full_verify(chain), 12, "audit copy", "missing")


# ---- changed records ----------------------------------------------------------------------
def test_changed_field_in_stored_canonical(chain, tamper) -> None:
    rows = tamper.read_rows(chain.ledger_path)
    row = rows[T1_STAGE2 - 1]
    record = from_canonical(row.canonical, row.signature)
    changed = dataclasses.replace(record, body={**record.body, "loss_mean": 0.001})
    conn = tamper.raw_db(chain.ledger_path)
    conn.execute(
        "UPDATE records SET canonical = ?, link = ? WHERE seq = ?",
        (canonical(changed), link(changed).hex(), T1_STAGE2),
    )
    conn.close()
    report = full_verify(chain)
    failed_at(report, T1_STAGE2, "signature does not verify against t1's registered key")
    assert not report.lines[T1_STAGE2 - 1].signature_ok


@pytest.mark.parametrize(
    ("column", "value"),
    [("stage", 3), ("party", "t2"), ("kind", "do"), ("prev", "00" * 32), ("link", "11" * 32)],
)
def test_changed_stored_column(chain, tamper, column: str, value: object) -> None:
    conn = tamper.raw_db(chain.ledger_path)
    conn.execute(f"UPDATE records SET {column} = ? WHERE seq = ?", (value, T1_STAGE2))
    conn.close()
    report = full_verify(chain)
    failed_at(report, T1_STAGE2, f"stored column {column}=")
    assert len(report.failures) == 1  # the canonical record and the chain are intact


def test_malformed_canonical_bytes(chain, tamper) -> None:
    conn = tamper.raw_db(chain.ledger_path)
    conn.execute("UPDATE records SET canonical = ? WHERE seq = 4", (b"\x00not json",))
    conn.close()
    failed_at(full_verify(chain), 4, "malformed record")


# ---- reordered, dropped, inserted, replayed ------------------------------------------------
def test_reordered_records(chain, tamper) -> None:
    rows = tamper.read_rows(chain.ledger_path)
    rows[1], rows[3] = rows[3], rows[1]  # t2's stage-1 record before t1's
    tamper.write_rows(chain.ledger_path, rows)
    failed_at(full_verify(chain), 2, "prev is not the link of the record before it", "out of order")


def test_reordered_stages(chain, tamper) -> None:
    rows = tamper.read_rows(chain.ledger_path)
    tamper.write_rows(chain.ledger_path, rows[5:10] + rows[:5] + rows[10:])
    failed_at(full_verify(chain), 1, "prev is not the genesis link")


@pytest.mark.parametrize("dropped", [1, 4, 6, 8])
def test_dropped_record(chain, tamper, dropped: int) -> None:
    rows = tamper.read_rows(chain.ledger_path)
    tamper.write_rows(chain.ledger_path, rows[: dropped - 1] + rows[dropped:])
    report = full_verify(chain)
    failed_at(report, dropped, "prev is not the")


def test_inserted_record(chain, tamper) -> None:
    rows = tamper.read_rows(chain.ledger_path)
    t1 = from_canonical(rows[1].canonical, rows[1].signature)
    extra = sign(
        dataclasses.replace(t1, prev=link(t1).hex(), body={**t1.body, "steps": 1}), chain.keys["t1"]
    )  # validly signed by t1, chained right after its own record
    tamper.write_rows(chain.ledger_path, [*rows[:2], as_row(extra, 3), *rows[2:]])
    report = full_verify(chain)
    failed_at(report, 3, "out of order: expected the attestation of t1 at stage 1")
    assert any(f.startswith("record 4 ") and "prev" in f for f in report.failures)


def test_replayed_record_from_another_session(chain, tamper) -> None:
    rows = tamper.read_rows(chain.ledger_path)
    original = from_canonical(rows[5].canonical, rows[5].signature)  # the owner's stage-2 record
    # the same owner key signed this record in another session; it is replayed here
    replayed = sign(
        dataclasses.replace(original, session_id=os.urandom(16).hex()), chain.keys["do"]
    )
    tamper.write_rows(
        chain.ledger_path,
        rechain(
            chain,
            [
                *(from_canonical(r.canonical, r.signature) for r in rows[:5]),
                replayed,
                *(from_canonical(r.canonical, r.signature) for r in rows[6:]),
            ],
            6,
        ),
    )
    failed_at(full_verify(chain), 6, "record of session")


def test_truncated_ledger_is_rejected_before_reading_segments(chain, tamper) -> None:
    for keep in (14, 12, 11):
        rows = tamper.read_rows(chain.ledger_path)[:keep]
        tamper.write_rows(chain.ledger_path, rows)
        report = full_verify(chain)
        assert not report.ok
        assert report.first_failure.startswith("stage 3 is incomplete"), report.first_failure
        assert "truncated" in report.first_failure
        assert all(line.hash_ok is None for line in report.lines)


def test_ledger_cut_at_a_stage_boundary_needs_an_anchor(chain, tamper) -> None:
    tamper.write_rows(chain.ledger_path, tamper.read_rows(chain.ledger_path)[:10])
    assert full_verify(chain, final_segments_dir=None).ok  # nothing inside says stage 3 existed
    cut = full_verify(chain)  # the final weights are stage 3's, not stage 2's
    assert cut.first_failure.startswith("final segment") and "stage 2 record" in cut.first_failure
    short = full_verify(chain, final_segments_dir=None, expected_stages=3)
    assert short.first_failure == "ledger ends after stage 2, expected 3 stages"


def test_empty_ledger_fails(tmp_path: Path, chain, tamper) -> None:
    tamper.write_rows(chain.ledger_path, [])
    report = full_verify(chain)
    assert not report.ok and report.first_failure == "ledger has no records"


# ---- signatures and keys -------------------------------------------------------------------
def test_forged_signature(chain, tamper) -> None:
    conn = tamper.raw_db(chain.ledger_path)
    conn.execute("UPDATE records SET signature = ? WHERE seq = ?", (os.urandom(64), T2_STAGE2))
    conn.close()
    failed_at(full_verify(chain), T2_STAGE2, "signature does not verify against t2's")


def test_record_signed_with_another_partys_key(chain, tamper) -> None:
    rows = tamper.read_rows(chain.ledger_path)
    record = from_canonical(rows[T1_STAGE2 - 1].canonical, rows[T1_STAGE2 - 1].signature)
    # t2 writes t1's record under its own public key
    own_key = sign(
        dataclasses.replace(record, public_key=chain.keys["t2"].public_bytes().hex()),
        chain.keys["t2"],
    )
    rows[T1_STAGE2 - 1] = as_row(own_key, T1_STAGE2)
    tamper.write_rows(chain.ledger_path, rows)
    failed_at(full_verify(chain), T1_STAGE2, "its public key is not t1's registered key")
    # ... or keeps t1's public key but can only sign with t2's private key
    with_t2_sig = dataclasses.replace(
        record, signature=chain.keys["t2"].sign(canonical(record)).hex()
    )
    rows[T1_STAGE2 - 1] = as_row(with_t2_sig, T1_STAGE2)
    tamper.write_rows(chain.ledger_path, rows)
    failed_at(
        full_verify(chain), T1_STAGE2, "signature does not verify against t1's registered key"
    )


def test_tampered_meta_breaks_the_genesis(chain, tamper) -> None:
    conn = tamper.raw_db(chain.ledger_path)
    conn.execute("UPDATE meta SET value = ? WHERE key = 'nonce'", (os.urandom(16).hex(),))
    conn.close()
    report = full_verify(chain)
    assert report.first_failure.startswith("ledger meta: stored genesis link does not match")


# ---- segments and watermarks ---------------------------------------------------------------
def test_audit_segment_not_matching_its_hash(chain) -> None:
    save_segment(chain.audit_dir / "2" / "t1.safetensors", chain.stage_states[(1, "t1")])
    report = full_verify(chain)
    failed_at(report, T1_STAGE2, "does not match the record's segment hash")
    assert report.lines[T1_STAGE2 - 1].hash_ok is False


def test_unreadable_audit_copy(chain) -> None:
    (chain.audit_dir / "2" / "t1.safetensors").write_bytes(b"\x80\x04garbage")
    failed_at(full_verify(chain), T1_STAGE2, "not a readable safetensors file")


def test_trainer_that_kept_old_weights(chain_factory, tmp_path: Path) -> None:
    stale = chain_factory(tmp_path / "stale", steps=150, stale=frozenset({(2, "t1")}))
    report = full_verify(stale)
    failed_at(report, T1_STAGE2, "BER", "above 0.05")
    ber = report.lines[T1_STAGE2 - 1].ber
    assert ber is not None and 0.35 < ber < 0.65
    assert report.lines[T1_STAGE2 - 1].hash_ok  # its record is honest about the weights
    assert any(f.startswith("record 8 ") and "attested failure of t1" in f for f in report.failures)


def test_lie_about_bits_hash(chain, tamper) -> None:
    records = records_of(chain)
    t1 = records[T1_STAGE2 - 1]
    records[T1_STAGE2 - 1] = dataclasses.replace(t1, body={**t1.body, "bits_hash": "ee" * 32})
    tamper.write_rows(chain.ledger_path, rechain(chain, records, T1_STAGE2 - 1))
    report = full_verify(chain)
    failed_at(report, T1_STAGE2, "bits_hash is not the hash of stage 2's target bits")
    # chaining: rewriting stage 2 changed the link L_2 that stage 3's bits derive from,
    # so the stage-3 segments (trained for the true L_2) no longer carry the bits either
    later = report.failures[1:]
    assert [f.split(" (")[0] for f in later] == ["record 12", "record 14"]
    assert all("BER" in f and "bits_hash" in f for f in later)


def test_wrong_watermark_secret(chain) -> None:
    secrets = {**chain.secrets, "t2": os.urandom(32)}
    report = full_verify(chain, watermark_secrets=secrets)
    assert report.first_failure == "watermark secret of t2 does not match its ledger commitment"
    missing = full_verify(chain, watermark_secrets={"t1": chain.secrets["t1"]})
    failed_at(missing, 4, "no watermark secret for t2")


def test_final_segments_must_match_the_last_stage(chain) -> None:
    save_segment(chain.final_dir / "t2.safetensors", chain.stage_states[(2, "t2")])
    report = full_verify(chain)
    assert report.first_failure.startswith("final segment"), report.first_failure
    assert "t2's stage 3 record (record 14)" in report.first_failure
    (chain.final_dir / "t2.safetensors").unlink()
    assert "no segment file" in full_verify(chain).first_failure


def test_not_a_ledger_gives_a_failing_report(tmp_path: Path) -> None:
    path = tmp_path / "x.sqlite"
    path.write_bytes(os.urandom(4096))
    report = verify_ledger(path)
    assert not report.ok and "not a readable clicooper ledger" in report.first_failure


# ---- issue 9: anchor, signed B and commitments, signed param, unchecked BERs ---------------
def test_anchor_is_checked_and_reported(chain) -> None:
    key = chain.keys["verifier"].public_bytes()
    report = full_verify(chain, anchor=Anchor(key))
    assert report.ok and report.anchored and report.bers_checked
    assert report.verifier_fingerprint == fingerprint(key)
    assert not full_verify(chain).anchored  # self-consistent, unanchored
    wrong = full_verify(chain, anchor=Anchor(os.urandom(32)))
    assert not wrong.ok and not wrong.anchored
    assert wrong.first_failure.startswith("trust anchor mismatch: the ledger's verifier key")
    assert all(line.hash_ok is None for line in wrong.lines)  # no segment read on a bad head


@pytest.mark.parametrize(
    ("sql", "params"),
    [
        ("UPDATE meta SET value = '128' WHERE key = 'watermark_bits'", ()),
        (
            "UPDATE parties SET commitment = (SELECT commitment FROM parties WHERE name = 't2') "
            "WHERE name = 't1'",
            (),
        ),
        ("UPDATE parties SET commitment = ? WHERE name = 't2'", ("ab" * 32,)),
    ],
)
def test_b_and_commitments_are_bound_into_the_genesis(chain, tamper, sql, params) -> None:
    conn = tamper.raw_db(chain.ledger_path)
    conn.execute(sql, params)
    conn.close()
    report = full_verify(chain, watermark_secrets=None)
    assert report.first_failure.startswith("ledger meta: stored genesis link does not match")
    assert all(line.hash_ok is None for line in report.lines)
    # rewriting the stored genesis too only moves the failure to the first signed record
    with Ledger.open(chain.ledger_path, readonly=True) as ledger:
        parties = ledger.parties()
        forged = genesis_link(
            ledger.session_id,
            ledger.nonce,
            [p.public_key for p in parties],
            [p.commitment for p in parties],
            ledger.watermark_bits,
        )
    conn = tamper.raw_db(chain.ledger_path)
    conn.execute("UPDATE meta SET value = ? WHERE key = 'genesis'", (forged.hex(),))
    conn.close()
    failed_at(full_verify(chain, watermark_secrets=None), 1, "prev is not the genesis link")


def test_the_marked_tensor_is_the_signed_param(chain) -> None:
    assert full_verify(chain, param_names={"t1": "weight"}).ok
    report = full_verify(chain, param_names={"t1": "bias"})
    failed_at(report, 2, "param_names gives 'bias', the signed record names 'weight'")


def test_without_secrets_the_report_says_bers_were_not_checked(chain) -> None:
    report = full_verify(chain, watermark_secrets=None)
    assert report.ok and not report.bers_checked
    assert all(line.ber is None for line in report.lines)
    assert full_verify(chain).bers_checked
