"""A small but real watermark chain, built the way the parties will build one.

``build_chain`` plays every party in one process: the data owner (DO), trainers
t1..tn that each train a tiny ``nn.Linear`` with the stage's watermark
regulariser, and the verifier, which checks each trainer's segment, keeps the
audit copy, appends the trainer's record and then its own attestation. The lead
engineer's party code follows the same sequence per stage:

    L = ledger.tip()                                 # link that closed the stage before
    DO:  append(sign(do record, prev = L))
    for trainer i:  mark = StageWatermark.derive(w_i, L, i, stage, param, dim)
                    train with loss + mark.regulariser(segment)
                    record(prev = ledger.tip(), segment_hash, bits_hash, ber, ...)
         verifier:  check hash, BER; save audit/<stage>/<ti>.safetensors;
                    append(trainer record); append(attestation, subject_link = tip)
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
import torch
from torch import nn

from clicooper.watermark.chain import bits_hash, save_segment, segment_hash
from clicooper.watermark.embed import StageWatermark, select_weight
from clicooper.watermark.keys import PartyKey, commitment, new_watermark_secret
from clicooper.watermark.ledger import Ledger, StoredRow
from clicooper.watermark.records import Record, sign

IN, OUT = 32, 32  # a 1024-entry weight carries 256 bits comfortably
N_BITS = 256
STRENGTH = 0.01
BER_THRESHOLD = 0.05


@dataclass
class Chain:
    """Everything a verifier or claimant needs from a fabricated run."""

    root: Path
    n_trainers: int
    n_stages: int
    keys: dict[str, PartyKey]
    secrets: dict[str, bytes]
    session_id: bytes
    nonce: bytes
    stage_states: dict[tuple[int, str], dict[str, torch.Tensor]] = field(default_factory=dict)

    @property
    def ledger_path(self) -> Path:
        return self.root / "ledger.sqlite"

    @property
    def audit_dir(self) -> Path:
        return self.root / "audit"

    @property
    def final_dir(self) -> Path:
        return self.root / "segments"

    def relocated(self, root: Path) -> Chain:
        shutil.copytree(self.root, root, dirs_exist_ok=True)
        return replace(self, root=root)


def _record(chain: Chain, ledger: Ledger, stage: int, party: str, body: dict) -> Record:
    kind = {"do": "do", "verifier": "attestation"}.get(party, "trainer")
    key = chain.keys[party]
    unsigned = Record(
        session_id=chain.session_id.hex(),
        stage=stage,
        party=party,
        kind=kind,
        public_key=key.public_bytes().hex(),
        prev=ledger.tip().hex(),
        body=body,
    )
    return sign(unsigned, key)


def _train(segment: nn.Linear, mark: StageWatermark, steps: int, seed: int) -> list[float]:
    """Fit a fixed random linear map (the task) while embedding ``mark``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(64, IN, generator=gen)
    y = x @ torch.randn(IN, OUT, generator=gen) * 0.1
    opt = torch.optim.Adam(segment.parameters(), lr=1e-3)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        task = nn.functional.mse_loss(segment(x), y)
        (task + mark.regulariser(segment)).backward()
        opt.step()
        losses.append(float(task.detach()))
    return losses


def build_chain(
    root: Path,
    n_trainers: int = 2,
    n_stages: int = 3,
    steps: int = 150,
    stale: frozenset[tuple[int, str]] = frozenset(),
) -> Chain:
    """Run ``n_stages`` stages; a (stage, party) in ``stale`` skips that training."""
    torch.manual_seed(1234)
    trainers = [f"t{i}" for i in range(1, n_trainers + 1)]
    names = ["do", *trainers, "verifier"]
    chain = Chain(
        root=root,
        n_trainers=n_trainers,
        n_stages=n_stages,
        keys={name: PartyKey.generate() for name in names},
        secrets={name: new_watermark_secret() for name in trainers},
        session_id=os.urandom(16),
        nonce=os.urandom(16),
    )
    root.mkdir(parents=True, exist_ok=True)
    registrations = [  # trainers register the commitment of their watermark secret
        (
            name,
            chain.keys[name].public_bytes(),
            commitment(chain.secrets[name]) if name in chain.secrets else None,
        )
        for name in names
    ]
    ledger = Ledger.create(chain.ledger_path, chain.session_id, chain.nonce, registrations)
    head = nn.Linear(8, IN)
    segments = {name: nn.Linear(IN, OUT) for name in trainers}
    label_commitment = hashlib.sha256(os.urandom(32)).hexdigest()
    for stage in range(1, n_stages + 1):
        stage_link = ledger.tip()  # L_{stage-1}
        do_body = {
            "head_hash": segment_hash(head.state_dict()).hex(),
            "label_commitment": label_commitment,
            "steps": steps * stage,
            "time": time.time(),
        }
        ledger.append(_record(chain, ledger, stage, "do", do_body))
        for i, party in enumerate(trainers, start=1):
            segment = segments[party]
            param = select_weight(segment)
            mark = StageWatermark.derive(
                chain.secrets[party],
                stage_link,
                i,
                stage,
                param,
                segment.weight.numel(),
                N_BITS,
                STRENGTH,
            )
            if (stage, party) in stale:
                losses = [0.0]  # skipped training; claims a loss and a perfect watermark
                claimed_ber = 0.0
            else:
                losses = _train(segment, mark, steps, seed=100 * stage + i)
                claimed_ber = mark.ber(segment)
            state = {k: v.detach().clone() for k, v in segment.state_dict().items()}
            chain.stage_states[(stage, party)] = state
            trainer_body = {
                "segment_hash": segment_hash(state).hex(),
                "bits_hash": bits_hash(mark.bits).hex(),
                "ber": claimed_ber,
                "loss_mean": sum(losses) / len(losses),
                "loss_last": losses[-1],
                "steps": steps,
                "time": time.time(),
                "param": param,
            }
            record = _record(chain, ledger, stage, party, trainer_body)
            _verifier_audit(chain, ledger, record, state, mark)
    for party in trainers:
        save_segment(chain.final_dir / f"{party}.safetensors", segments[party].state_dict())
    ledger.close()
    return chain


def _verifier_audit(
    chain: Chain, ledger: Ledger, record: Record, state: dict, mark: StageWatermark
) -> None:
    """What V does on a trainer's end-of-stage message: check, keep, append, attest."""
    hash_ok = segment_hash(state).hex() == record.body["segment_hash"]
    ber = mark.ber(state)
    save_segment(chain.audit_dir / str(record.stage) / f"{record.party}.safetensors", state)
    trainer_link = ledger.append(record)
    body = {
        "subject": record.party,
        "subject_link": trainer_link.hex(),
        "ber": ber,
        "verdict": "ok" if hash_ok and ber <= BER_THRESHOLD else "fail",
        "time": time.time(),
    }
    ledger.append(_record(chain, ledger, record.stage, "verifier", body))


# ---- tampering helpers (an attacker with write access to the file) -------------------------
def raw_db(path: Path) -> sqlite3.Connection:
    """A connection to the ledger file with the append-only triggers dropped."""
    conn = sqlite3.connect(path, isolation_level=None)
    for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall():
        conn.execute(f"DROP TRIGGER {name}")
    return conn


def read_rows(path: Path) -> list[StoredRow]:
    with Ledger.open(path, readonly=True) as ledger:
        return ledger.rows()


def write_rows(path: Path, rows: list[StoredRow]) -> None:
    """Replace every record row by ``rows``, renumbered 1..n in the given order."""
    conn = raw_db(path)
    conn.execute("DELETE FROM records")
    conn.executemany(
        "INSERT INTO records VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (seq, r.stage, r.party, r.kind, r.prev, r.link, r.canonical, r.signature)
            for seq, r in enumerate(rows, start=1)
        ],
    )
    conn.close()


@contextmanager
def one_thread() -> Iterator[None]:
    """Tiny tensors: one torch thread avoids oversubscribing a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with one_thread():
        yield


class Tamper:
    """The tampering helpers as a fixture (test modules cannot import conftest)."""

    raw_db = staticmethod(raw_db)
    read_rows = staticmethod(read_rows)
    write_rows = staticmethod(write_rows)


@pytest.fixture()
def tamper() -> type[Tamper]:
    return Tamper


@pytest.fixture()
def chain_factory() -> Callable[..., Chain]:
    """``build_chain`` itself, for tests that need a chain built differently."""
    return build_chain


@pytest.fixture(scope="session")
def built_chain(tmp_path_factory: pytest.TempPathFactory) -> Chain:
    with one_thread():
        return build_chain(tmp_path_factory.mktemp("chain") / "run")


@pytest.fixture()
def chain(built_chain: Chain, tmp_path: Path) -> Chain:
    """A private copy of the session's chain that a test may tamper with."""
    return built_chain.relocated(tmp_path / "run")


# ---- real runs on digits, anchored (issue 9: forgery, fabricated ledgers, tampering) -------
@dataclass(frozen=True)
class AnchoredRuns:
    """Run A (B = 16 bits, 3 trainers, 3 stages), an unrelated run B, and A's trust anchor."""

    a: Path
    b: Path
    anchor: str  # A's verifier key fingerprint, as printed at the end of the run


@pytest.fixture(scope="session")
def anchored_runs(tmp_path_factory: pytest.TempPathFactory) -> AnchoredRuns:
    from cc_helpers import quick_config

    from clicooper.data import load_dataset
    from clicooper.runtime.session import run

    root = tmp_path_factory.mktemp("anchored")
    data = load_dataset("digits", seed=0).limit(300, 100, seed=0)
    settings = {
        "trainers": 3,
        "batch_size": 10,
        "watermark.bits": 16,
        "watermark.strength": 0.01,
        "privacy.noise_multiplier": 0.1,
        "labels.mode": "keyed",
    }
    with one_thread():
        session = run(quick_config(epochs=3, **settings), root / "a", data=data)
        run(quick_config(epochs=1, seed=7, **settings), root / "b", data=data)
    wm = session.results["watermark"]
    assert wm["verified"] and wm["anchored"] and wm["stages"] == 3
    return AnchoredRuns(root / "a", root / "b", wm["anchor"])


@pytest.fixture()
def run_a(anchored_runs: AnchoredRuns, tmp_path: Path) -> Path:
    """A private copy of run A that a test may tamper with."""
    return Path(shutil.copytree(anchored_runs.a, tmp_path / "a"))
