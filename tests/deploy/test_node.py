"""Trainer and verifier nodes serving many owners' sessions (issue 13, points 1 and 3).

Real nodes on 127.0.0.1 (:mod:`nodes`), real certificates, real SQLite state, real
training on digits.
"""

from __future__ import annotations

import stat
import threading

import pytest
import torch
from cc_helpers import quick_config
from conftest import WM
from nodes import LocalPool

from clicooper.models.assembly import preset_split
from clicooper.node.artifacts import party_files
from clicooper.node.state import FINISHED, SqliteState
from clicooper.runtime.session import run
from clicooper.runtime.verification import verify_run

CHAIN = {**WM, "watermark.bits": 128, "trainers": 2, "epochs": 1, "batch_size": 16,
         "train_subset": 160, "transport": "grpc"}  # fmt: skip


@pytest.fixture
def pool(tmp_path):
    p = LocalPool(tmp_path, trainers=2, owners=["alice", "bob"]).start()
    try:
        yield p
    finally:
        p.stop()


def test_two_owners_train_at_once_on_the_same_nodes(pool, tmp_path, digits):
    """Two sessions in flight on the same two trainer nodes and verifier node: each
    trains, each ledger verifies, each lives in its own 0700 directory on every node."""
    data = digits.limit(160, 100, seed=0)
    results, errors = {}, []

    def owner(name, seed):
        try:
            cfg = quick_config(**CHAIN, seed=seed)
            results[name] = pool.run(name, cfg, tmp_path / f"run-{name}", data)
        except Exception as exc:  # reported below
            errors.append(f"{name}: {exc!r}")

    threads = [threading.Thread(target=owner, args=(n, s)) for n, s in (("alice", 0), ("bob", 1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert not errors, errors
    for name in ("alice", "bob"):
        session = results[name]
        assert session.results["transport"]["steps_applied"] == {"t1": 10, "t2": 10}
        assert session.results["watermark"]["verified"], session.results["watermark"]
        assert verify_run(tmp_path / f"run-{name}").ok
        assert len(session.results["history"]) == 1
    for node in pool.node_names:
        state = SqliteState(pool.state(node), readonly=True)
        sessions = state.sessions()
        state.close()
        assert sorted(r.owner for r in sessions) == ["alice", "bob"]
        assert all(r.state == FINISHED for r in sessions)
        for record in sessions:
            directory = pool.state(node) / "sessions" / record.session
            assert stat.S_IMODE(directory.stat().st_mode) == 0o700
            # every artifact came to the owner's run directory over Fetch, byte for byte
            run_dir = tmp_path / f"run-{record.owner}"
            files = list(party_files(directory, record.party))
            assert files and all((run_dir / rel).read_bytes() == f.read_bytes() for rel, f in files)


def test_a_session_on_nodes_trains_as_it_does_in_process(pool, tmp_path, digits):
    """Vanilla split learning has no secret randomness: the same seed gives the same
    weights over two trainer nodes as in one process."""
    data = digits.limit(160, 100, seed=0)
    cfg = quick_config(mode="vanilla", trainers=2, epochs=1, batch_size=16, train_subset=160)
    local = run(cfg, tmp_path / "local", data=data)
    served = pool.run("alice", cfg.model_copy(update={"transport": "grpc"}), tmp_path / "n", data)
    for a, b in zip(local.model.parameters(), served.model.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    assert served.results["accuracy"] == local.results["accuracy"]


def test_sessions_set_up_at_once_get_the_weights_of_their_seeds():
    """A node builds the segments of several sessions in threads of one process; each must
    get exactly the weights its seed gives (the owner relies on it, as in-process)."""
    cfgs = [quick_config(model="cnn", seed=seed) for seed in range(8)]
    expected = [preset_split(cfg, (1, 8, 8), 10) for cfg in cfgs]
    barrier, built = threading.Barrier(len(cfgs)), {}

    def build(i):
        barrier.wait()
        built[i] = preset_split(cfgs[i], (1, 8, 8), 10)

    threads = [threading.Thread(target=build, args=(i,)) for i in range(len(cfgs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, split in enumerate(expected):
        for a, b in zip(split.full().parameters(), built[i].full().parameters(), strict=True):
            assert torch.equal(a, b), f"seed {i}"
