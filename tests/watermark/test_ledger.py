"""The append-only ledger: what it stores, what it refuses, what it will not open."""

from __future__ import annotations

import dataclasses
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from clicooper.watermark.chain import genesis_link
from clicooper.watermark.keys import PartyKey, commitment, new_watermark_secret
from clicooper.watermark.ledger import Ledger, LedgerError
from clicooper.watermark.records import Record, link, sign

HEX = "cd" * 32
NAMES = ["do", "t1", "t2", "verifier"]


@dataclasses.dataclass
class Kit:
    """A ledger for two trainers plus the keys to write records for it."""

    path: Path
    ledger: Ledger
    keys: dict[str, PartyKey]
    session_id: bytes

    def record(
        self,
        party: str,
        stage: int,
        *,
        prev: bytes | None = None,
        key: PartyKey | None = None,
        session_id: bytes | None = None,
        **body: object,
    ) -> Record:
        signer = key or self.keys[party]
        kind = {"do": "do", "verifier": "attestation"}.get(party, "trainer")
        defaults = {
            "do": {"head_hash": HEX, "label_commitment": HEX, "steps": 1, "time": 1.0},
            "trainer": {
                "segment_hash": HEX,
                "bits_hash": HEX,
                "ber": 0.0,
                "loss_mean": 1.0,
                "loss_last": 1.0,
                "steps": 1,
                "time": 1.0,
                "param": "weight",
            },
            "attestation": {
                "subject": "t1",
                "subject_link": self.ledger.tip().hex(),
                "ber": 0.0,
                "verdict": "ok",
                "time": 1.0,
            },
        }[kind]
        unsigned = Record(
            session_id=(session_id or self.session_id).hex(),
            stage=stage,
            party=party,
            kind=kind,
            public_key=signer.public_bytes().hex(),
            prev=(prev or self.ledger.tip()).hex(),
            body={**defaults, **body},
        )
        return sign(unsigned, signer)

    def stage(self, stage: int) -> None:
        """Append one complete, valid stage."""
        self.ledger.append(self.record("do", stage))
        for trainer in ("t1", "t2"):
            self.ledger.append(self.record(trainer, stage))
            self.ledger.append(self.record("verifier", stage, subject=trainer))


def make_kit(path: Path) -> Kit:
    keys = {name: PartyKey.generate() for name in NAMES}
    session_id = os.urandom(16)
    parties = [
        (
            name,
            keys[name].public_bytes(),
            commitment(new_watermark_secret()) if name[0] == "t" else None,
        )
        for name in NAMES
    ]
    ledger = Ledger.create(path, session_id, os.urandom(16), parties)
    return Kit(path, ledger, keys, session_id)


@pytest.fixture()
def kit(tmp_path: Path) -> Kit:
    return make_kit(tmp_path / "ledger.sqlite")


def test_create_append_and_reopen(kit: Kit) -> None:
    assert kit.ledger.tip() == kit.ledger.genesis
    keys = [kit.keys[name].public_bytes() for name in NAMES]
    commitments = [entry.commitment for entry in kit.ledger.parties()]
    assert kit.ledger.watermark_bits == 256
    assert kit.ledger.genesis == genesis_link(
        kit.session_id, kit.ledger.nonce, keys, commitments, 256
    )
    kit.stage(1)
    kit.stage(2)
    records = kit.ledger.records()
    tip = kit.ledger.tip()
    kit.ledger.close()
    with Ledger.open(kit.path) as again:
        assert again.records() == records and len(records) == 10
        assert again.tip() == tip == link(records[-1])
        assert [p.name for p in again.parties()] == NAMES
        assert [p.index for p in again.parties()] == [0, 1, 2, 3]
        assert again.party("t1").public_key == kit.keys["t1"].public_bytes()
        assert again.party("do").commitment is None and again.party("t2").commitment is not None
        assert again.session_id == kit.session_id
        assert [r.prev for r in records[1:]] == [link(r).hex() for r in records[:-1]]


def test_create_validates_its_inputs(tmp_path: Path, kit: Kit) -> None:
    key = kit.keys["do"].public_bytes()
    good = [(n, kit.keys[n].public_bytes(), (b"c" * 32 if n[0] == "t" else None)) for n in NAMES]
    size = kit.path.stat().st_size
    with pytest.raises(LedgerError, match="already exists"):
        Ledger.create(kit.path, b"s", b"n", good)
    assert kit.path.stat().st_size == size and kit.ledger.records() == []
    with pytest.raises(LedgerError, match="cannot create"):
        Ledger.create(tmp_path / "no" / "such" / "dir.sqlite", b"s", b"n", good)
    bad_lists = {
        "in that order": [good[1], good[0], *good[2:]],
        "own raw 32-byte": [good[0], ("t1", key, b"c" * 32), *good[2:]],
        "needs a 32-byte watermark commitment": [good[0], ("t1", good[1][1], None), *good[2:]],
        "must be None": [("do", key, b"c" * 32), *good[1:]],
    }
    for message, parties in bad_lists.items():
        path = tmp_path / f"{hash(message)}.sqlite"
        with pytest.raises(LedgerError, match=message):
            Ledger.create(path, b"s", b"n", parties)
        assert not path.exists()


def _refused(kit: Kit, record: Record, message: str) -> None:
    before = kit.ledger.records()
    with pytest.raises(LedgerError, match=message):
        kit.ledger.append(record)
    assert kit.ledger.records() == before


def test_refuses_bad_signatures_and_keys(kit: Kit) -> None:
    good = kit.record("do", 1)
    forged = dataclasses.replace(good, signature=bytes(64).hex())
    _refused(kit, forged, "signature does not verify")
    tampered = dataclasses.replace(good, body={**good.body, "steps": 99})
    _refused(kit, tampered, "signature does not verify")
    _refused(kit, dataclasses.replace(good, signature=""), "not signed")
    kit.ledger.append(good)
    # t2 writes a record in t1's name with its own key: the key is not t1's
    _refused(kit, kit.record("t1", 1, key=kit.keys["t2"]), "not t1's registered key")
    # ... or claims t1's key but can only sign with its own
    impostor = kit.record("t1", 1)
    sig = kit.keys["t2"].sign(bytes.fromhex("00"))  # any signature not made by t1
    _refused(kit, dataclasses.replace(impostor, signature=sig.hex()), "signature does not verify")
    outsider = PartyKey.generate()
    _refused(kit, kit.record("t1", 1, key=outsider), "registered key")
    unregistered = dataclasses.replace(kit.record("t2", 1), party="t3")
    _refused(kit, sign(unregistered, kit.keys["t2"]), "t3 is not a registered party")


def test_refuses_wrong_prev_and_replays(kit: Kit, tmp_path: Path) -> None:
    first = kit.record("do", 1)
    kit.ledger.append(first)
    _refused(kit, kit.record("t1", 1, prev=kit.ledger.genesis), "prev is not the ledger tip")
    _refused(kit, first, "prev is not the ledger tip")  # the same record again
    other = make_kit(tmp_path / "other.sqlite")
    other.keys = kit.keys  # same parties, another session
    other_record = other.record("t1", 1, prev=kit.ledger.tip(), session_id=other.session_id)
    _refused(kit, other_record, "belongs to session")


def test_refuses_out_of_order_and_backwards_stages(kit: Kit) -> None:
    kit.stage(1)
    kit.ledger.append(kit.record("do", 2))
    _refused(kit, kit.record("t1", 1), "stage goes backwards")
    _refused(kit, kit.record("t2", 2), "out of order, expected t1's record at stage 2")
    _refused(kit, kit.record("t1", 3), "out of order")
    kit.ledger.append(kit.record("t1", 2))
    _refused(kit, kit.record("verifier", 2, subject="t2"), "expected the attestation of t1")
    _refused(kit, kit.record("verifier", 2, subject="t1", subject_link=HEX), "subject_link")
    kit.ledger.append(kit.record("verifier", 2, subject="t1"))


def test_first_record_must_be_the_owners_stage_one(kit: Kit) -> None:
    _refused(kit, kit.record("t1", 1), "expected do's record at stage 1")
    _refused(kit, kit.record("do", 2), "expected do's record at stage 1")


def test_racing_appends_of_the_same_slot_store_exactly_one(kit: Kit) -> None:
    kit.ledger.append(kit.record("do", 1))
    candidates = [kit.record("t1", 1, steps=n) for n in range(8)]  # all chain to the same tip
    outcomes: list[str] = []

    def attempt(record: Record) -> None:
        try:
            kit.ledger.append(record)
            outcomes.append("stored")
        except LedgerError as exc:
            outcomes.append(str(exc))

    threads = [threading.Thread(target=attempt, args=(r,)) for r in candidates]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count("stored") == 1
    assert all("prev is not the ledger tip" in o for o in outcomes if o != "stored")
    assert len(kit.ledger.records()) == 2


def test_read_only_ledger_refuses_appends(kit: Kit) -> None:
    record = kit.record("do", 1)
    kit.ledger.close()
    with Ledger.open(kit.path, readonly=True) as ro, pytest.raises(LedgerError, match="read-only"):
        ro.append(record)


def test_triggers_forbid_rewriting_records(kit: Kit) -> None:
    kit.stage(1)
    kit.ledger.close()
    conn = sqlite3.connect(kit.path)
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.execute("DELETE FROM records WHERE seq = 2")
    conn.close()


@pytest.fixture()
def full_ledger_bytes(kit: Kit) -> bytes:
    kit.stage(1)
    kit.stage(2)
    kit.ledger.close()
    return kit.path.read_bytes()


@pytest.mark.parametrize("fraction", [0.0, 0.01, 0.03, 0.25, 0.5, 0.75, 0.99])
def test_open_rejects_truncated_files(
    tmp_path: Path, full_ledger_bytes: bytes, fraction: float
) -> None:
    path = tmp_path / "cut.sqlite"
    path.write_bytes(full_ledger_bytes[: int(len(full_ledger_bytes) * fraction)])
    with pytest.raises(LedgerError) as info:
        Ledger.open(path)
    assert "\n" not in str(info.value)


def test_open_rejects_files_cut_at_a_page_boundary(
    tmp_path: Path, full_ledger_bytes: bytes
) -> None:
    page = int.from_bytes(full_ledger_bytes[16:18], "big")
    path = tmp_path / "cut.sqlite"
    for pages in range(1, len(full_ledger_bytes) // page):
        path.write_bytes(full_ledger_bytes[: pages * page])
        with pytest.raises(LedgerError):
            Ledger.open(path)


def test_open_rejects_things_that_are_not_ledgers(tmp_path: Path, kit: Kit, tamper) -> None:
    with pytest.raises(LedgerError, match="no ledger at"):
        Ledger.open(tmp_path / "absent.sqlite")
    noise = tmp_path / "noise.sqlite"
    noise.write_bytes(os.urandom(8192))
    with pytest.raises(LedgerError, match="not a readable clicooper ledger"):
        Ledger.open(noise)
    foreign = tmp_path / "foreign.sqlite"
    conn = sqlite3.connect(foreign)
    conn.execute("CREATE TABLE records (x)")
    conn.commit()
    conn.close()
    with pytest.raises(LedgerError, match="not a clicooper ledger"):
        Ledger.open(foreign)
    kit.ledger.close()
    conn = tamper.raw_db(kit.path)
    conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    conn.close()
    with pytest.raises(LedgerError, match="schema version '1'"):
        Ledger.open(kit.path)
    conn = tamper.raw_db(kit.path)
    conn.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    conn.execute("ALTER TABLE records ADD COLUMN extra TEXT")
    conn.close()
    with pytest.raises(LedgerError, match="table records has columns"):
        Ledger.open(kit.path)


CRASH = textwrap.dedent(
    """
    import os, sys
    from clicooper.watermark import ledger as mod
    from clicooper.watermark.records import from_canonical
    real = mod.Ledger._insert
    def insert_then_die(self, record, new_link):
        real(self, record, new_link)
        os._exit(3)  # the process dies after the INSERT, before the COMMIT
    mod.Ledger._insert = insert_then_die
    data = sys.stdin.buffer.read()
    canonical, signature = data[:-64], data[-64:]
    mod.Ledger.open(sys.argv[1]).append(from_canonical(canonical, signature))
    """
)


def test_a_crash_mid_append_leaves_the_ledger_as_it_was(kit: Kit) -> None:
    kit.stage(1)
    before, tip = kit.ledger.records(), kit.ledger.tip()
    record = kit.record("do", 2)
    kit.ledger.close()
    from clicooper.watermark.records import canonical

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    done = subprocess.run(
        [sys.executable, "-c", CRASH, str(kit.path)],
        input=canonical(record) + bytes.fromhex(record.signature),
        env=env,
        capture_output=True,
        timeout=120,
    )
    assert done.returncode == 3, done.stderr.decode()
    with Ledger.open(kit.path) as again:
        assert again.records() == before and again.tip() == tip
        again.append(record)  # and it still takes the next record
        assert len(again.records()) == len(before) + 1
