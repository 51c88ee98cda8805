"""Offline verification of a whole ledger, its audit copies and the final segments.

A chain holds when, for every record ``r_k`` in ledger order:

- its stored columns (stage, party, kind, prev, link) equal what its canonical
  encoding says, ``link = SHA-256(canonical | signature)``;
- it is signed by the registered key of its party and carries that key;
- ``prev(r_1) = L_0``, recomputed from meta and parties (session id, nonce, B, every
  public key and commitment: :func:`clicooper.watermark.chain.genesis_link`), and
  ``prev(r_k) = link(r_{k-1})``; it belongs to the ledger's session;
- stages never go back and each stage is ``do, t1, attest(t1), ..., tn, attest(tn)``,
  each attestation's ``subject_link`` being the link of the record before it, and
  no attestation says ``fail``;
- for a trainer record of stage ``t``: the audit copy ``audit/<t>/<party>.safetensors``
  hashes to the record's ``segment_hash`` (a stage whose directory was pruned is
  "not retained", except the last stage); with the trainers' secrets, the record's
  ``bits_hash`` is the hash of ``b = target_bits(w_i, L_{t-1}, i, t)`` where
  ``L_{t-1}`` is the link of the last record of stage ``t-1`` (``L_0`` for t = 1),
  and the copy's watermark ``[(A w) > 0]`` with ``A = projection(w_i, t)`` has
  ``BER <= threshold``.

Also: the last stage is complete (else the ledger was truncated), every secret
matches its commitment, and each ``segments/<party>.safetensors`` hashes to the
last stage's record. The marked tensor is the one the trainer's signed record
names (``param``); a ``param_names`` entry must agree with it.

A self-consistent ledger proves nothing by itself: anyone can write one with fresh
keys. With an ``anchor`` (the verifier key published when the session ran, see
:mod:`clicooper.watermark.anchor`) the ledger's registered verifier key must match
it; since every field above is signed and chained from ``L_0``, and the verifier
attests every trainer record, a matching anchor pins the whole ledger. Segments
and watermarks are checked only once the head (anchor, ``L_0``, secrets) holds and
only for records whose signature verifies: unsigned data never names a file or B.
The report says whether it was anchored and whether BERs were re-checked
(they are not without the trainers' secrets and the audit directory).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from pathlib import Path

import torch

from clicooper.watermark.anchor import Anchor, fingerprint
from clicooper.watermark.chain import (
    bits_hash,
    check_watermark_bits,
    genesis_link,
    load_segment,
    segment_hash,
    target_bits,
)
from clicooper.watermark.embed import StageWatermark, projection
from clicooper.watermark.keys import commitment, verify_signature
from clicooper.watermark.ledger import (
    Ledger,
    LedgerError,
    Slot,
    StoredRow,
    describe_slot,
    following,
    slot_of,
    stage_slots,
)
from clicooper.watermark.records import Record, from_canonical, link_of, trainer_index

NOT_RETAINED = "not retained"


@dataclass(frozen=True)
class RecordCheck:
    """The verdict on one record: ``"ok"``, ``"not retained"`` or the reasons it fails."""

    seq: int
    stage: int
    party: str
    kind: str
    signature_ok: bool
    link_ok: bool
    hash_ok: bool | None
    ber: float | None
    verdict: str


@dataclass
class VerifyReport:
    """``ok`` iff no failure; ``first_failure`` names record, stage, party and reason.

    ``anchored``: the ledger's verifier key matched the given anchor (``ok`` then means
    the ledger is the anchored session's; without an anchor, only that it is
    self-consistent). ``bers_checked``: every retained audit copy's watermark was
    re-extracted with the trainers' secrets. ``verifier_fingerprint``: of the key
    the ledger registers, to compare with the one published.
    """

    ok: bool
    lines: list[RecordCheck]
    first_failure: str | None
    failures: list[str] = field(default_factory=list)
    anchored: bool = False
    bers_checked: bool = False
    verifier_fingerprint: str | None = None


@dataclass
class _Settings:
    audit_dir: Path | None
    secrets: dict[str, bytes] | None
    n_bits: int | None  # None: the ledger's signed B
    ber_threshold: float
    param_names: dict[str, str]


@dataclass
class _Row:
    """Working state of one row while it is checked."""

    stored: StoredRow
    record: Record | None
    link: bytes
    signature_ok: bool = False
    link_ok: bool = True
    hash_ok: bool | None = None
    ber: float | None = None
    retained: bool = True
    reasons: list[str] = field(default_factory=list)


def verify_ledger(
    ledger: Ledger | Path | str,
    audit_dir: Path | None = None,
    final_segments_dir: Path | None = None,
    watermark_secrets: dict[str, bytes] | None = None,
    n_bits: int | None = None,
    ber_threshold: float = 0.05,
    param_names: dict[str, str] | None = None,
    expected_stages: int | None = None,
    anchor: Anchor | None = None,
) -> VerifyReport:
    """Check the whole chain (module docstring); never raises on a bad ledger.

    A ledger cut cleanly after a complete stage is only detectable against an anchor
    outside it: the final segments (which match the true last stage) or ``expected_stages``.
    """
    settings = _Settings(
        audit_dir=None if audit_dir is None else Path(audit_dir),
        secrets=watermark_secrets,
        n_bits=n_bits,
        ber_threshold=ber_threshold,
        param_names=dict(param_names or {}),
    )
    final_dir = None if final_segments_dir is None else Path(final_segments_dir)
    try:
        if isinstance(ledger, Ledger):
            return _verify(ledger, settings, final_dir, expected_stages, anchor)
        with Ledger.open(ledger, readonly=True) as opened:
            return _verify(opened, settings, final_dir, expected_stages, anchor)
    except (LedgerError, ValueError, OSError) as exc:  # a last guard; checks name their record
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return VerifyReport(ok=False, lines=[], first_failure=message, failures=[message])


def _verify(
    ledger: Ledger,
    settings: _Settings,
    final_dir: Path | None,
    expected_stages: int | None,
    anchor: Anchor | None,
) -> VerifyReport:
    wanted = ledger.watermark_bits if settings.n_bits is None else settings.n_bits
    settings.n_bits = check_watermark_bits(wanted)
    head_failures, genesis, n_trainers = _check_head(ledger, settings.secrets, anchor)
    rows = _check_structure(ledger, genesis, n_trainers)
    tail_failures = _check_complete(rows, n_trainers, expected_stages)
    head_ok = not head_failures and bool(rows) and rows[0].link_ok and rows[0].record is not None
    checked = head_ok and not tail_failures  # a truncated ledger: no segment is read
    if checked:
        _check_segments(ledger, rows, genesis, settings)
        if final_dir is not None:
            tail_failures += _check_final(rows, final_dir)
    failures = head_failures + [_failure(row) for row in rows if row.reasons] + tail_failures
    verifier = next((e for e in ledger.parties() if e.name == "verifier"), None)
    anchored = verifier is not None and anchor is not None and anchor.matches(verifier.public_key)
    return VerifyReport(
        ok=not failures,
        lines=[_line(row) for row in rows],
        first_failure=failures[0] if failures else None,
        failures=failures,
        anchored=anchored,
        bers_checked=checked and settings.secrets is not None and settings.audit_dir is not None,
        verifier_fingerprint=None if verifier is None else fingerprint(verifier.public_key),
    )


def _failure(row: _Row) -> str:
    s = row.stored
    return f"record {s.seq} (stage {s.stage}, {s.party}): {'; '.join(row.reasons)}"


def _line(row: _Row) -> RecordCheck:
    s = row.stored
    verdict = "; ".join(row.reasons) if row.reasons else ("ok" if row.retained else NOT_RETAINED)
    return RecordCheck(
        s.seq,
        s.stage,
        s.party,
        s.kind,
        row.signature_ok,
        row.link_ok,
        row.hash_ok,
        row.ber,
        verdict,
    )


# ---- ledger head: parties, genesis, secrets ------------------------------------------------
def _check_head(
    ledger: Ledger, secrets: dict[str, bytes] | None, anchor: Anchor | None
) -> tuple[list[str], bytes, int]:
    failures = []
    parties = ledger.parties()
    by_name = {entry.name: entry for entry in parties}
    if anchor is not None:
        verifier = by_name.get("verifier")
        if verifier is None:
            failures.append("trust anchor: the ledger registers no verifier key")
        elif not anchor.matches(verifier.public_key):
            failures.append(
                f"trust anchor mismatch: the ledger's verifier key has fingerprint "
                f"{fingerprint(verifier.public_key)}, not the anchor {anchor}"
            )
    names = [entry.name for entry in parties]
    n_trainers = len(names) - 2
    expected = ["do", *(f"t{i}" for i in range(1, n_trainers + 1)), "verifier"]
    if names != expected or [e.index for e in parties] != list(range(len(parties))):
        failures.append(f"ledger parties: {names} are not do, t1..tn, verifier in index order")
    genesis = genesis_link(
        ledger.session_id,
        ledger.nonce,
        [e.public_key for e in parties],
        [e.commitment for e in parties],
        ledger.watermark_bits,
    )
    if genesis != ledger.genesis:
        failures.append(
            "ledger meta: stored genesis link does not match session, nonce, B, keys "
            "and commitments"
        )
    for name, secret in sorted((secrets or {}).items()):
        entry = by_name.get(name)
        if entry is None or entry.commitment is None:
            failures.append(f"watermark secret for {name}: not a registered trainer")
        elif not hmac.compare_digest(commitment(secret), entry.commitment):
            failures.append(f"watermark secret of {name} does not match its ledger commitment")
    return failures, genesis, n_trainers


# ---- structure: signatures, links, columns, order ------------------------------------------
def _check_structure(ledger: Ledger, genesis: bytes, n_trainers: int) -> list[_Row]:
    keys = {entry.name: entry.public_key for entry in ledger.parties()}
    session = ledger.session_id.hex()
    rows: list[_Row] = []
    prev_link, expected = genesis, (1, stage_slots(n_trainers)[0])
    for stored in ledger.rows():
        row = _parse(stored)
        rec = row.record
        if rec is not None:
            _check_signature(row, keys)
            _check_columns(row)
            _check_links(row, prev_link, first=not rows)
            if rec.session_id != session:
                row.reasons.append(
                    f"record of session {rec.session_id}, not this ledger's {session}"
                )
            _check_order(row, rows[-1] if rows else None, expected)
        expected = _advance(row, expected, n_trainers)
        prev_link = row.link
        rows.append(row)
    return rows


def _parse(stored: StoredRow) -> _Row:
    row_link = link_of(stored.canonical, stored.signature)
    try:
        record = from_canonical(stored.canonical, stored.signature)
    except (ValueError, TypeError) as exc:
        row = _Row(stored, None, row_link, link_ok=False)
        row.reasons.append(f"malformed record ({exc})")
        return row
    row = _Row(stored, record, row_link)
    if not record.signature:
        row.reasons.append("record is not signed")
    return row


def _check_signature(row: _Row, keys: dict[str, bytes]) -> None:
    rec = row.record
    assert rec is not None
    key = keys.get(rec.party)
    if key is None:
        row.reasons.append(f"{rec.party} is not a registered party")
    elif rec.public_key != key.hex():
        row.reasons.append(f"its public key is not {rec.party}'s registered key")
    elif not verify_signature(key, row.stored.signature, row.stored.canonical):
        row.reasons.append(f"signature does not verify against {rec.party}'s registered key")
    else:
        row.signature_ok = True


def _check_columns(row: _Row) -> None:
    rec, s = row.record, row.stored
    assert rec is not None
    pairs = [
        ("stage", s.stage, rec.stage),
        ("party", s.party, rec.party),
        ("kind", s.kind, rec.kind),
        ("prev", s.prev, rec.prev),
        ("link", s.link, row.link.hex()),
    ]
    for name, stored, actual in pairs:
        if stored != actual:
            row.reasons.append(
                f"stored column {name}={stored!r} differs from the record's {actual!r}"
            )
            row.link_ok = row.link_ok and name not in ("prev", "link")


def _check_links(row: _Row, prev_link: bytes, first: bool) -> None:
    rec = row.record
    assert rec is not None
    if rec.prev != prev_link.hex():
        row.link_ok = False
        row.reasons.append(
            "prev is not the genesis link (foreign or replayed record)"
            if first
            else "prev is not the link of the record before it "
            "(record dropped, inserted, reordered or replayed)"
        )


def _check_order(row: _Row, before: _Row | None, expected: tuple[int, Slot]) -> None:
    rec = row.record
    assert rec is not None
    before_rec = before.record if before else None
    if before_rec is not None and rec.stage < before_rec.stage:
        row.reasons.append(f"stage goes backwards (after stage {before_rec.stage})")
    elif (rec.stage, slot_of(rec)) != expected:
        row.reasons.append(
            f"out of order: expected {describe_slot(expected[1])} at stage {expected[0]}"
        )
    if rec.kind == "attestation":
        if before is None or rec.body["subject_link"] != before.link.hex():
            row.reasons.append("subject_link is not the link of the record before it")
        if rec.body["verdict"] != "ok":
            row.reasons.append(f"the verifier attested failure of {rec.body['subject']}")


def _advance(row: _Row, expected: tuple[int, Slot], n_trainers: int) -> tuple[int, Slot]:
    """The slot after this row: after its own slot when that is valid, else after ``expected``."""
    rec = row.record
    if rec is not None:
        try:
            return following(rec.stage, slot_of(rec), n_trainers)
        except ValueError:
            pass
    return following(*expected, n_trainers)


def _check_complete(rows: list[_Row], n_trainers: int, expected_stages: int | None) -> list[str]:
    if not rows:
        return ["ledger has no records"]
    last = rows[-1]
    s = last.stored
    final_slot = stage_slots(n_trainers)[-1]
    if last.record is not None and slot_of(last.record) == final_slot:
        if expected_stages is not None and s.stage != expected_stages:
            return [f"ledger ends after stage {s.stage}, expected {expected_stages} stages"]
        return []
    return [
        f"stage {s.stage} is incomplete: the ledger ends at record {s.seq} ({s.party}) "
        f"before {describe_slot(final_slot)} (truncated ledger?)"
    ]


# ---- segments: audit copies, watermarks, final weights -------------------------------------
def _stage_end_links(rows: list[_Row], genesis: bytes) -> dict[int, bytes]:
    ends = {0: genesis}
    for row in rows:
        ends[row.stored.stage if row.record is None else row.record.stage] = row.link
    return ends


def _check_segments(ledger: Ledger, rows: list[_Row], genesis: bytes, cfg: _Settings) -> None:
    ends = _stage_end_links(rows, genesis)
    last_stage = max(ends)
    commitments = {e.name: e.commitment for e in ledger.parties()}
    for row in rows:
        rec = row.record
        if rec is None or rec.kind != "trainer" or not row.signature_ok:
            continue
        state = _audit_state(row, cfg.audit_dir, rec.stage == last_stage)
        secret = None if cfg.secrets is None else cfg.secrets.get(rec.party)
        if cfg.secrets is not None and secret is None:
            row.reasons.append(f"no watermark secret for {rec.party}")
        elif secret is not None and commitment(secret) == commitments.get(rec.party):
            _check_watermark(row, secret, ends.get(rec.stage - 1), state, cfg)


def _audit_state(
    row: _Row, audit_dir: Path | None, required: bool
) -> dict[str, torch.Tensor] | None:
    rec = row.record
    if audit_dir is None or rec is None:
        return None
    stage_dir = audit_dir / str(rec.stage)
    if not stage_dir.is_dir() and not required:
        row.retained = False
        return None
    path = stage_dir / f"{rec.party}.safetensors"
    if not path.is_file():
        row.reasons.append(f"audit copy {path} is missing")
        return None
    try:
        state = load_segment(path)
    except ValueError as exc:
        row.reasons.append(str(exc))
        return None
    row.hash_ok = segment_hash(state).hex() == rec.body["segment_hash"]
    if not row.hash_ok:
        row.reasons.append(f"audit copy {path} does not match the record's segment hash")
        return None
    return state


def _check_watermark(
    row: _Row,
    secret: bytes,
    prev_link: bytes | None,
    state: dict[str, torch.Tensor] | None,
    cfg: _Settings,
) -> None:
    rec = row.record
    assert rec is not None
    if prev_link is None:
        row.reasons.append(f"no record closes stage {rec.stage - 1}: cannot derive the bits")
        return
    bits = target_bits(secret, prev_link, trainer_index(rec.party), rec.stage, cfg.n_bits)
    if bits_hash(bits).hex() != rec.body["bits_hash"]:
        row.reasons.append(f"bits_hash is not the hash of stage {rec.stage}'s target bits")
    if state is None:
        return
    name = rec.body["param"]
    override = cfg.param_names.get(rec.party)
    if override is not None and override != name:
        row.reasons.append(f"param_names gives {override!r}, the signed record names {name!r}")
        return
    if not isinstance(state.get(name), torch.Tensor):
        row.reasons.append(f"the audit copy has no tensor {name!r} to read the watermark from")
        return
    matrix = projection(secret, rec.stage, cfg.n_bits, state[name].numel())
    row.ber = StageWatermark(name, matrix, bits, 0.0).ber(state)
    if row.ber > cfg.ber_threshold:
        row.reasons.append(
            f"BER {row.ber:.3f} on stage {rec.stage}'s bits is above {cfg.ber_threshold} "
            "(training skipped or weights swapped?)"
        )


def _check_final(rows: list[_Row], final_dir: Path) -> list[str]:
    last_stage = max(row.stored.stage for row in rows)
    failures = []
    for row in rows:
        rec = row.record
        if rec is None or rec.kind != "trainer" or rec.stage != last_stage:
            continue
        path = final_dir / f"{rec.party}.safetensors"
        try:
            matches = segment_hash(load_segment(path)).hex() == rec.body["segment_hash"]
        except ValueError as exc:
            failures.append(f"final segment of {rec.party}: {exc}")
            continue
        if not matches:
            failures.append(
                f"final segment {path} does not match {rec.party}'s stage {last_stage} record "
                f"(record {row.stored.seq})"
            )
    return failures
