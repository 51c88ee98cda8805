"""Issue 9: verify and claim never raise or hang on a tampered run directory.

Each case edits a copy of a real run (digits, 3 trainers, 3 stages) the way an attacker
with write access to the files could, then runs ``clicooper verify`` (with and without
the anchor) and ``clicooper claim`` (anchored). Each must end within 5 s with exit
status 1 and a one-line error, never a traceback.
"""

from __future__ import annotations

import random
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from clicooper.watermark.keys import PartyKey
from clicooper.watermark.records import link_of

COLUMNS = {
    "meta": ["key", "value"],
    "parties": ["name", "party_index", "public_key", "commitment"],
    "records": ["seq", "stage", "party", "kind", "prev", "link", "canonical", "signature"],
}
# one row a table: B's meta row, t1's party row, t2's stage-1 record (do, t1, attest, t2)
WHERE = {"meta": "key = 'watermark_bits'", "parties": "name = 't1'", "records": "seq = 4"}
CELLS = [(table, column) for table, columns in COLUMNS.items() for column in columns]
SECONDS = 5.0


def edit(run_dir: Path, *statements: tuple[str, tuple]) -> None:
    """Run SQL on the ledger with its append-only triggers dropped."""
    conn = sqlite3.connect(run_dir / "ledger.sqlite", isolation_level=None)
    for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'"):
        conn.execute(f"DROP TRIGGER {name}")
    for sql, params in statements:
        conn.execute(sql, params)
    conn.close()


def without_constraints(run_dir: Path, table: str) -> None:
    """Rebuild ``table`` with the same columns and no NOT NULL / key constraints."""
    edit(
        run_dir,
        (f"CREATE TABLE loose AS SELECT * FROM {table}", ()),
        (f"DROP TABLE {table}", ()),
        (f"ALTER TABLE loose RENAME TO {table}", ()),
    )


def checks_fail_in_one_line(run_dir: Path, anchor: str, cli_inprocess) -> list[str]:
    """verify (anchored and not) and an anchored claim: each exit 1, one line, in time."""
    segment = str(run_dir / "segments" / "t2.safetensors")
    calls = [
        ("verify", str(run_dir), "--anchor", anchor),
        ("verify", str(run_dir)),
        ("claim", str(run_dir), "--party", "t2", "--segment", segment, "--anchor", anchor),
    ]
    lines = []
    for args in calls:
        start = time.monotonic()
        code, err, _ = cli_inprocess(*args)
        elapsed = time.monotonic() - start
        assert elapsed < SECONDS, f"{args[0]} took {elapsed:.1f} s"
        assert "Traceback" not in err, err
        last = err.strip().splitlines()[-1]
        assert code == 1, f"{args[0]}: exit {code}: {err[-500:]}"
        assert last.startswith(
            "error: chain does not hold: " if args[0] == "verify" else "error: claim refused: "
        ), last
        assert err.count("error:") == 1
        lines.append(last)
    return lines


def resign_t2(run_dir: Path, canonical: bytes) -> tuple[str, tuple]:
    """t2 signs bytes of its choosing with its own key and stores them as its stage-1 record."""
    key = PartyKey.load(run_dir / "parties" / "t2" / "party.key")
    signature = key.sign(canonical)
    return (
        "UPDATE records SET canonical = ?, signature = ?, link = ? WHERE seq = 4",
        (canonical, signature, link_of(canonical, signature).hex()),
    )


def t2_stage1(run_dir: Path) -> bytes:
    conn = sqlite3.connect(run_dir / "ledger.sqlite")
    (blob,) = conn.execute("SELECT canonical FROM records WHERE seq = 4").fetchone()
    conn.close()
    assert b'"party":"t2"' in blob and blob.endswith(b'"stage":1}')
    return blob


CASES: dict[str, Callable[[Path], list[tuple[str, tuple]]]] = {
    "canonical of 100,000 [": lambda d: [
        ("UPDATE records SET canonical = ? WHERE seq = 4", (b"[" * 100_000,))
    ],
    "canonical of 60,000 [ (under the size bound)": lambda d: [
        ("UPDATE records SET canonical = ? WHERE seq = 4", (b"[" * 60_000,))
    ],
    "300-digit stage column": lambda d: [
        ("UPDATE records SET stage = ? WHERE seq = 4", ("1" + "0" * 299,))
    ],
    "300-digit stage signed by t2": lambda d: [
        resign_t2(d, t2_stage1(d).replace(b'"stage":1}', b'"stage":1' + b"0" * 299 + b"}"))
    ],
    "5,000-digit stage signed by t2": lambda d: [
        resign_t2(d, t2_stage1(d).replace(b'"stage":1}', b'"stage":1' + b"0" * 4999 + b"}"))
    ],
    "huge trainer name signed by t2": lambda d: [
        resign_t2(d, t2_stage1(d).replace(b'"party":"t2"', b'"party":"t2' + b"0" * 300 + b'"'))
    ],
    "watermark_bits 0": lambda d: [
        ("UPDATE meta SET value = '0' WHERE key = 'watermark_bits'", ())
    ],
    "watermark_bits 1e12": lambda d: [
        ("UPDATE meta SET value = '1000000000000' WHERE key = 'watermark_bits'", ())
    ],
    "watermark_bits '1e12'": lambda d: [
        ("UPDATE meta SET value = '1e12' WHERE key = 'watermark_bits'", ())
    ],
    "watermark_bits 17 (in range, not the signed B)": lambda d: [
        ("UPDATE meta SET value = '17' WHERE key = 'watermark_bits'", ())
    ],
    "party_index not an integer": lambda d: [
        ("UPDATE parties SET party_index = 'abc' WHERE name = 't1'", ())
    ],
    "party_index 2.5": lambda d: [("UPDATE parties SET party_index = 2.5 WHERE name = 't1'", ())],
    "party_index huge": lambda d: [
        ("UPDATE parties SET party_index = ? WHERE name = 't1'", (2**62,))
    ],
    "party_index 1e300": lambda d: [
        ("UPDATE parties SET party_index = 1e300 WHERE name = 't1'", ())
    ],
    "huge seq": lambda d: [("UPDATE records SET seq = ? WHERE seq = 4", (2**63 - 1,))],
    "a fresh verifier key": lambda d: [
        (
            "UPDATE parties SET public_key = ? WHERE name = 'verifier'",
            (PartyKey.generate().public_bytes().hex(),),
        )
    ],
    "commitment of t2 swapped for t1's": lambda d: [
        (
            "UPDATE parties SET commitment = (SELECT commitment FROM parties WHERE name = 't1') "
            "WHERE name = 't2'",
            (),
        )
    ],
    "stage column text": lambda d: [("UPDATE records SET stage = 'two' WHERE seq = 4", ())],
    "markup in the party column": lambda d: [
        ("UPDATE records SET party = '[/x] [red]\nt2' WHERE seq = 4", ())
    ],
}


@pytest.mark.parametrize("case", list(CASES))
def test_named_tampering(case: str, anchored_runs, run_a: Path, cli_inprocess) -> None:
    edit(run_a, *CASES[case](run_a))
    checks_fail_in_one_line(run_a, anchored_runs.anchor, cli_inprocess)


@pytest.mark.parametrize(("table", "column"), CELLS)
def test_random_bytes_in_every_column(
    table: str, column: str, anchored_runs, run_a: Path, cli_inprocess
) -> None:
    rng = random.Random(f"{table}.{column}")
    if (table, column) == ("records", "seq"):  # an INTEGER PRIMARY KEY stores integers only
        value: object = rng.getrandbits(63)
    else:
        value = rng.randbytes(rng.randint(1, 200))
    edit(run_a, (f"UPDATE {table} SET {column} = ? WHERE {WHERE[table]}", (value,)))
    checks_fail_in_one_line(run_a, anchored_runs.anchor, cli_inprocess)


@pytest.mark.parametrize(("table", "column"), CELLS)
def test_null_in_every_column(
    table: str, column: str, anchored_runs, run_a: Path, cli_inprocess
) -> None:
    where = WHERE[table]  # for commitments: t1's (NULL is the owner's and verifier's value)
    without_constraints(run_a, table)
    edit(run_a, (f"UPDATE {table} SET {column} = NULL WHERE {where}", ()))
    checks_fail_in_one_line(run_a, anchored_runs.anchor, cli_inprocess)


def test_tampered_secrets_file_and_audit_tree(anchored_runs, run_a: Path, cli_inprocess) -> None:
    secrets = run_a / "verifier" / "watermark_secrets.json"
    secrets.write_bytes(b"[" * 100_000)
    lines = checks_fail_in_one_line(run_a, anchored_runs.anchor, cli_inprocess)
    assert all("is not a verifier secrets file" in line for line in lines)
    secrets.write_text('{"t1": "00"}')  # partial: t2 and t3 missing
    lines = checks_fail_in_one_line(run_a, anchored_runs.anchor, cli_inprocess)
    assert "does not match its ledger commitment" in lines[0]


def test_missing_secrets_are_said_plainly_and_stop_a_claim(
    anchored_runs, run_a: Path, cli_inprocess
) -> None:
    (run_a / "verifier" / "watermark_secrets.json").unlink()
    code, err, _ = cli_inprocess("verify", str(run_a), "--anchor", anchored_runs.anchor)
    last = err.strip().splitlines()[-1]
    assert code == 0 and last.startswith("chain holds: 21 records verified; BERs NOT re-checked")
    assert "anchored to verifier key" in last
    segment = str(run_a / "segments" / "t2.safetensors")
    code, err, _ = cli_inprocess(
        "claim", str(run_a), "--party", "t2", "--segment", segment, "--anchor", anchored_runs.anchor
    )
    last = err.strip().splitlines()[-1]
    assert code == 1 and last.startswith("error: claim refused: BERs were not re-checked")
