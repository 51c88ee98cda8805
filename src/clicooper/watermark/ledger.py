"""The verifier's append-only ledger: one SQLite file (stdlib ``sqlite3``).

Schema version 2 (``PRAGMA application_id`` = 0x436C4350, "ClCP"):

- ``meta(key, value)``: ``schema_version`` = "2", ``session_id``, ``nonce`` and
  ``genesis`` (lowercase hex), and ``watermark_bits`` (B, decimal, 1 .. 65536).
  The genesis link ``L_0`` binds session id, nonce, B, every public key and every
  commitment (:func:`clicooper.watermark.chain.genesis_link`); each record chains
  from it and is signed, so none of these can change without breaking a signature.
  (Version 1 left B and the commitments out of ``L_0``.)
- ``parties(name, party_index, public_key, commitment)``: ``do`` (index 0),
  ``t1`` .. ``tn`` (index i), ``verifier`` (index n+1); hex public keys; trainers'
  watermark commitments ``SHA-256(w_i)`` in hex, NULL for the others.
- ``records(seq, stage, party, kind, prev, link, canonical, signature)``: one row
  per record; the columns beside ``canonical`` are conveniences that
  :func:`clicooper.watermark.verify.verify_ledger` checks against it.

Order of records (enforced by :meth:`Ledger.append`, checked by verification):
stage 1, 2, ... in turn, each stage being ``do``, ``t1``, attestation of ``t1``,
``t2``, attestation of ``t2``, ..., ``tn``, attestation of ``tn``. Each append is
one transaction, so a crash leaves the ledger as it was before the append.
Triggers refuse UPDATE and DELETE (a guard against accidents; integrity rests on
signatures and links, not on the file). Reading is strict about types and sizes
(every column, every meta value), so a tampered file gives a one-line
:class:`LedgerError`, never another exception.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from clicooper.watermark.chain import check_watermark_bits, genesis_link
from clicooper.watermark.keys import PUBLIC_KEY_BYTES, verify_signature
from clicooper.watermark.records import (
    MAX_CANONICAL_BYTES,
    MAX_STAGE,
    Record,
    canonical,
    from_canonical,
    link,
    shown,
)

SCHEMA_VERSION = 2
APPLICATION_ID = 0x436C4350
COMMITMENT_BYTES = 32
DEFAULT_WATERMARK_BITS = 256
MAX_PARTIES = 1026  # do, up to 1024 trainers, verifier: far more than any chain needs
MAX_META_ROWS = 64
MAX_META_VALUE = 1024  # characters of one meta value (hex ids are 32 to 64)
_ROW_TYPES = (int, int, str, str, str, str, bytes, bytes)

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE parties (name TEXT PRIMARY KEY, party_index INTEGER NOT NULL UNIQUE,
                      public_key TEXT NOT NULL UNIQUE, commitment TEXT);
CREATE TABLE records (seq INTEGER PRIMARY KEY, stage INTEGER NOT NULL, party TEXT NOT NULL,
                      kind TEXT NOT NULL, prev TEXT NOT NULL, link TEXT NOT NULL,
                      canonical BLOB NOT NULL, signature BLOB NOT NULL);
CREATE TRIGGER records_no_update BEFORE UPDATE ON records
    BEGIN SELECT RAISE(ABORT, 'ledger records are append-only'); END;
CREATE TRIGGER records_no_delete BEFORE DELETE ON records
    BEGIN SELECT RAISE(ABORT, 'ledger records are append-only'); END;
CREATE TRIGGER meta_no_update BEFORE UPDATE ON meta
    BEGIN SELECT RAISE(ABORT, 'ledger meta is immutable'); END;
CREATE TRIGGER parties_no_update BEFORE UPDATE ON parties
    BEGIN SELECT RAISE(ABORT, 'ledger parties are immutable'); END;
"""
_COLUMNS = {
    "meta": ["key", "value"],
    "parties": ["name", "party_index", "public_key", "commitment"],
    "records": ["seq", "stage", "party", "kind", "prev", "link", "canonical", "signature"],
}


class LedgerError(Exception):
    """A ledger that cannot be opened, or a record it refuses."""


@dataclass(frozen=True)
class PartyEntry:
    """A registered party: name, index, raw public key, watermark commitment (trainers)."""

    name: str
    index: int
    public_key: bytes
    commitment: bytes | None


@dataclass(frozen=True)
class StoredRow:
    """One ``records`` row exactly as stored (hex ``prev``/``link``, raw canonical/signature)."""

    seq: int
    stage: int
    party: str
    kind: str
    prev: str
    link: str
    canonical: bytes
    signature: bytes


Slot = tuple[str, str | None]  # (party, attestation subject or None)


def stage_slots(n_trainers: int) -> list[Slot]:
    """The records of one stage in order: do, t1, attest(t1), ..., tn, attest(tn)."""
    slots: list[Slot] = [("do", None)]
    for i in range(1, n_trainers + 1):
        slots += [(f"t{i}", None), ("verifier", f"t{i}")]
    return slots


def slot_of(record: Record) -> Slot:
    """``(party, subject)`` of a record (subject only for attestations)."""
    subject = record.body.get("subject") if record.kind == "attestation" else None
    return record.party, subject if isinstance(subject, str) else None


def next_slot(last: Record | None, n_trainers: int) -> tuple[int, Slot]:
    """Stage and slot the record after ``last`` must fill (``None``: the first record)."""
    if last is None:
        return 1, stage_slots(n_trainers)[0]
    return following(last.stage, slot_of(last), n_trainers)


def following(stage: int, slot: Slot, n_trainers: int) -> tuple[int, Slot]:
    """Stage and slot after ``slot`` of ``stage``; ValueError if ``slot`` is not a stage slot."""
    slots = stage_slots(n_trainers)
    if slot not in slots:
        raise ValueError(f"{slot[0]}'s record does not fit a stage of {n_trainers} trainers")
    pos = slots.index(slot)
    return (stage + 1, slots[0]) if pos == len(slots) - 1 else (stage, slots[pos + 1])


def describe_slot(slot: Slot) -> str:
    party, subject = slot
    return f"the attestation of {subject}" if subject else f"{party}'s record"


def _check_parties(parties: Sequence[tuple[str, bytes, bytes | None]]) -> None:
    if len(parties) > MAX_PARTIES:
        raise LedgerError(f"a ledger registers at most {MAX_PARTIES} parties")
    names = [name for name, _, _ in parties]
    n = len(names) - 2
    expected = ["do", *(f"t{i}" for i in range(1, n + 1)), "verifier"]
    if n < 1 or names != expected:
        raise LedgerError(f"parties must be do, t1..tn, verifier in that order; got {names}")
    keys = [bytes(key) for _, key, _ in parties]
    if any(len(key) != PUBLIC_KEY_BYTES for key in keys) or len(set(keys)) != len(keys):
        raise LedgerError("each party needs its own raw 32-byte Ed25519 public key")
    for name, _, com in parties:
        is_trainer = name.startswith("t")
        if is_trainer and (com is None or len(com) != COMMITMENT_BYTES):
            raise LedgerError(f"trainer {name} needs a 32-byte watermark commitment")
        if not is_trainer and com is not None:
            raise LedgerError(f"{name} has no watermark: its commitment must be None")


@contextmanager
def _sqlite_errors(path: Path) -> Iterator[None]:
    try:
        yield
    except sqlite3.Error as exc:
        raise LedgerError(f"{path} is not a readable clicooper ledger ({exc})") from None


def _read_meta(conn: sqlite3.Connection, path: Path) -> dict[str, str]:
    rows = conn.execute("SELECT key, value FROM meta").fetchmany(MAX_META_ROWS + 1)
    if len(rows) > MAX_META_ROWS:
        raise LedgerError(f"{path}: ledger meta has more than {MAX_META_ROWS} rows")
    meta: dict[str, str] = {}
    for key, value in rows:
        if not isinstance(key, str) or not isinstance(value, str) or len(value) > MAX_META_VALUE:
            raise LedgerError(f"{path}: malformed ledger meta row {shown(key)}")
        meta[key] = value
    return meta


def _hex_value(meta: dict[str, str], key: str) -> bytes:
    value = bytes.fromhex(meta[key])
    if not value:
        raise ValueError(f"meta {key} is empty")
    return value


def _bits_value(value: str | None) -> int:
    if value is None:
        raise ValueError("meta watermark_bits is missing")
    if not value.isascii() or not value.isdigit() or len(value) > 6:
        raise ValueError(f"meta watermark_bits {shown(value)} is not a small decimal integer")
    return check_watermark_bits(int(value))


def _party_entry(name: object, index: object, key: object, com: object) -> PartyEntry:
    if not isinstance(name, str) or len(name) > 16:
        raise ValueError(f"party name {shown(name)} is not a short string")
    if not isinstance(index, int) or not 0 <= index < MAX_PARTIES:
        raise ValueError(f"party index {shown(index)} of {name} is not 0 .. {MAX_PARTIES - 1}")
    if not isinstance(key, str) or len(key) != 2 * PUBLIC_KEY_BYTES:
        raise ValueError(f"public key of {name} is not {2 * PUBLIC_KEY_BYTES} hex digits")
    if com is not None and (not isinstance(com, str) or len(com) != 2 * COMMITMENT_BYTES):
        raise ValueError(f"commitment of {name} is not {2 * COMMITMENT_BYTES} hex digits")
    return PartyEntry(name, index, bytes.fromhex(key), None if com is None else bytes.fromhex(com))


def _stored_row(row: tuple) -> StoredRow:
    """A ``records`` row with each column of its schema type (the file may have been edited)."""
    for name, want, value in zip(_COLUMNS["records"], _ROW_TYPES, row, strict=True):
        if not isinstance(value, want) or isinstance(value, bool):
            raise LedgerError(
                f"record row {shown(row[0])}: column {name} holds {type(value).__name__}, "
                f"not {want.__name__}"
            )
    stage, canonical_bytes = row[1], row[6]
    if not 1 <= stage <= MAX_STAGE:
        raise LedgerError(f"record row {row[0]}: stage {shown(stage)} is not 1 .. {MAX_STAGE}")
    if len(canonical_bytes) > MAX_CANONICAL_BYTES:
        raise LedgerError(
            f"record row {row[0]}: {len(canonical_bytes)} canonical bytes, "
            f"more than {MAX_CANONICAL_BYTES}"
        )
    if any(len(value) > 256 for value in row[2:6]):
        raise LedgerError(f"record row {row[0]}: a text column is longer than 256 characters")
    return StoredRow(*row)


class Ledger:
    """An open ledger file; make one with :meth:`create` or :meth:`open`."""

    def __init__(self, conn: sqlite3.Connection, path: Path, readonly: bool) -> None:
        self._conn = conn
        self.path = path
        self.readonly = readonly
        self._lock = threading.RLock()  # one connection, shared safely by server threads
        with _sqlite_errors(path):
            self._load()

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with self._lock, _sqlite_errors(self.path):
            yield

    # ---- creation and opening -------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: Path | str,
        session_id: bytes,
        nonce: bytes,
        parties: Sequence[tuple[str, bytes, bytes | None]],
        watermark_bits: int = DEFAULT_WATERMARK_BITS,
    ) -> Ledger:
        """A new ledger at ``path`` (which must not exist) for the given session and parties."""
        path = Path(path)
        if not session_id or not nonce:
            raise LedgerError("session id and nonce must be non-empty bytes")
        _check_parties(parties)
        try:  # claim the path exclusively: never overwrite (or later delete) another file
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
        except FileExistsError:
            raise LedgerError(
                f"{path} already exists: a ledger is created once, then opened"
            ) from None
        except OSError as exc:
            raise LedgerError(f"cannot create {path} ({exc.strerror})") from None
        try:
            bits = check_watermark_bits(watermark_bits)
        except ValueError as exc:
            raise LedgerError(str(exc)) from None
        genesis = genesis_link(
            session_id,
            nonce,
            [bytes(key) for _, key, _ in parties],
            [None if com is None else bytes(com) for _, _, com in parties],
            bits,
        )
        meta = {
            "schema_version": str(SCHEMA_VERSION),
            "session_id": session_id.hex(),
            "nonce": nonce.hex(),
            "genesis": genesis.hex(),
            "watermark_bits": str(bits),
        }
        conn = None
        try:
            with _sqlite_errors(path):
                conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
                conn.execute("BEGIN IMMEDIATE")
                conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                for statement in _SCHEMA.split(";\n"):
                    if statement.strip():
                        conn.execute(statement)
                conn.executemany("INSERT INTO meta VALUES (?, ?)", meta.items())
                conn.executemany(
                    "INSERT INTO parties VALUES (?, ?, ?, ?)",
                    [
                        (name, i, bytes(key).hex(), None if com is None else bytes(com).hex())
                        for i, (name, key, com) in enumerate(parties)
                    ],
                )
                conn.execute("COMMIT")
        except BaseException:
            if conn is not None:
                conn.close()
            path.unlink(missing_ok=True)
            raise
        return cls(conn, path, readonly=False)

    @classmethod
    def open(cls, path: Path | str, readonly: bool = False) -> Ledger:
        """Open an existing ledger; LedgerError (one line) if the file is not one."""
        path = Path(path)
        if not path.is_file():
            raise LedgerError(f"no ledger at {path}")
        uri = f"{path.resolve().as_uri()}?mode={'ro' if readonly else 'rw'}"
        try:
            conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot open {path} ({exc})") from None
        try:
            return cls(conn, path, readonly)
        except BaseException:
            conn.close()
            raise

    def _load(self) -> None:
        conn = self._conn
        if conn.execute("PRAGMA application_id").fetchone()[0] != APPLICATION_ID:
            raise LedgerError(f"{self.path} is an SQLite database but not a clicooper ledger")
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        if self.path.stat().st_size % page_size:
            raise LedgerError(f"{self.path} is truncated: its size is not a whole number of pages")
        problems = [row[0] for row in conn.execute("PRAGMA quick_check")]
        if problems != ["ok"]:
            raise LedgerError(f"{self.path} is corrupt: {problems[0]}")
        for table, columns in _COLUMNS.items():
            found = [row[1] for row in conn.execute(f"PRAGMA table_info({table})")]
            if found != columns:
                raise LedgerError(f"{self.path}: table {table} has columns {found}, want {columns}")
        meta = _read_meta(conn, self.path)
        if meta.get("schema_version") != str(SCHEMA_VERSION):
            raise LedgerError(
                f"{self.path} has ledger schema version {shown(meta.get('schema_version'))}; "
                f"this build reads version {SCHEMA_VERSION}"
            )
        try:
            self.session_id = _hex_value(meta, "session_id")
            self.nonce = _hex_value(meta, "nonce")
            self.genesis = _hex_value(meta, "genesis")
            self.watermark_bits = _bits_value(meta.get("watermark_bits"))
            rows = conn.execute("SELECT * FROM parties ORDER BY party_index").fetchmany(
                MAX_PARTIES + 1
            )
            if len(rows) > MAX_PARTIES:
                raise ValueError(f"more than {MAX_PARTIES} parties")
            self._parties = [_party_entry(*row) for row in rows]
        except (KeyError, ValueError, TypeError, OverflowError) as exc:
            raise LedgerError(f"{self.path}: malformed ledger meta or parties ({exc})") from None
        if not self._parties:
            raise LedgerError(f"{self.path}: ledger has no registered parties")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- reading ---------------------------------------------------------------------------
    def parties(self) -> list[PartyEntry]:
        """Registered parties in index order."""
        return list(self._parties)

    def party(self, name: str) -> PartyEntry:
        for entry in self._parties:
            if entry.name == name:
                return entry
        raise LedgerError(f"party {name!r} is not registered in this ledger")

    @property
    def n_trainers(self) -> int:
        return sum(1 for entry in self._parties if entry.commitment is not None)

    def rows(self) -> list[StoredRow]:
        """Every stored row, by ``seq``, exactly as stored; LedgerError for a mistyped column."""
        with self._locked():
            rows = self._conn.execute("SELECT * FROM records ORDER BY seq").fetchall()
        return [_stored_row(row) for row in rows]

    def records(self) -> list[Record]:
        """Every record in order (parsed from its canonical bytes and signature)."""
        out = []
        for row in self.rows():
            try:
                out.append(from_canonical(row.canonical, row.signature))
            except (ValueError, TypeError) as exc:
                raise LedgerError(f"record {row.seq} is malformed: {exc}") from None
        return out

    def step_counts(self) -> dict[str, list[int]]:
        """The ``steps`` field of every do and trainer record, per party, in ledger order."""
        out: dict[str, list[int]] = {}
        for record in self.records():
            if record.kind in ("do", "trainer"):
                out.setdefault(record.party, []).append(int(record.body["steps"]))
        return out

    def _last(self) -> StoredRow | None:
        row = self._conn.execute("SELECT * FROM records ORDER BY seq DESC LIMIT 1").fetchone()
        return None if row is None else _stored_row(row)

    def tip(self) -> bytes:
        """Link of the last record, or the genesis link of an empty ledger."""
        with self._locked():
            last = self._last()
        return self.genesis if last is None else bytes.fromhex(last.link)

    # ---- appending -------------------------------------------------------------------------
    def append(self, record: Record) -> bytes:
        """Check ``record`` against registered parties and the tip; store it; return its link."""
        if self.readonly:
            raise LedgerError("ledger was opened read-only")
        if not isinstance(record, Record):
            raise LedgerError(f"can append only a Record, got {type(record).__name__}")
        with self._locked():
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                new_link = self._validate(record)
                self._insert(record, new_link)
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
        return new_link

    def check(self, record: Record) -> bytes:
        """The link :meth:`append` would give ``record``; LedgerError where it would refuse."""
        if not isinstance(record, Record):
            raise LedgerError(f"can check only a Record, got {type(record).__name__}")
        with self._locked():
            return self._validate(record)

    def _validate(self, record: Record) -> bytes:
        who = f"{record.party}'s stage {record.stage} record refused"
        if not record.signature:
            raise LedgerError(f"{who}: it is not signed")
        if record.session_id != self.session_id.hex():
            raise LedgerError(f"{who}: it belongs to session {record.session_id}, not this one")
        names = [entry.name for entry in self._parties]
        if record.party not in names:
            raise LedgerError(f"{who}: {record.party} is not a registered party")
        registered = self.party(record.party).public_key
        if record.public_key != registered.hex():
            raise LedgerError(f"{who}: its public key is not {record.party}'s registered key")
        if not verify_signature(registered, bytes.fromhex(record.signature), canonical(record)):
            raise LedgerError(f"{who}: signature does not verify against {record.party}'s key")
        last_row = self._last()
        tip = self.genesis if last_row is None else bytes.fromhex(last_row.link)
        if record.prev != tip.hex():
            raise LedgerError(f"{who}: prev is not the ledger tip (stale, replayed or reordered)")
        try:
            last = (
                None if last_row is None else from_canonical(last_row.canonical, last_row.signature)
            )
            if last is not None and record.stage < last.stage:
                raise LedgerError(f"{who}: stage goes backwards (ledger is at stage {last.stage})")
            stage, slot = next_slot(last, self.n_trainers)
        except ValueError as exc:
            raise LedgerError(f"{who}: the ledger's last record is damaged ({exc})") from None
        if (record.stage, slot_of(record)) != (stage, slot):
            raise LedgerError(
                f"{who}: out of order, expected {describe_slot(slot)} at stage {stage}"
            )
        if record.kind == "attestation" and record.body["subject_link"] != tip.hex():
            raise LedgerError(f"{who}: subject_link is not the link of the record it attests")
        return link(record)

    def _insert(self, record: Record, new_link: bytes) -> None:
        self._conn.execute(
            "INSERT INTO records (stage, party, kind, prev, link, canonical, signature) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                record.stage,
                record.party,
                record.kind,
                record.prev,
                new_link.hex(),
                canonical(record),
                bytes.fromhex(record.signature),
            ),
        )
