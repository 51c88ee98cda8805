"""Node state and two-phase admission (issue 13, point 1): capacity, all-or-none, expiry,
a restart that remembers every session, and ``clicooper node``'s own commands."""

from __future__ import annotations

import re
import time

import pytest
from cc_helpers import quick_config
from conftest import wait_for
from nodes import LocalPool
from typer.testing import CliRunner

from clicooper.cli.main import app
from clicooper.common.messages import ProtocolError
from clicooper.node.client import AdmissionRefused
from clicooper.node.state import (
    ABORTED,
    ACTIVE,
    FINISHED,
    RESERVED,
    MemoryState,
    SessionRecord,
    SqliteState,
)

VANILLA = {"mode": "vanilla", "transport": "grpc", "epochs": 1, "train_subset": 64}


def _record(session="s1", state=RESERVED, expires=10.0):
    return SessionRecord(
        session, "alice", "t1", {"do": "alice", "t1": "n1"}, {"do": "127.0.0.1:1"},
        {"seed": 0}, state, expires, created=1.0, updated=1.0,
    )  # fmt: skip


@pytest.fixture(params=["memory", "sqlite"])
def store(request, tmp_path):
    s = MemoryState() if request.param == "memory" else SqliteState(tmp_path / "state")
    yield s
    s.close()


def test_state_moves_sessions_forward_only(store):
    """An id is inserted once; a transition happens only from the states it names, so an
    abort that won a race makes the commit fail (and the other way round)."""
    assert store.insert(_record())
    assert not store.insert(_record())  # the id is taken, whatever its state
    assert store.transition("s1", (RESERVED,), ABORTED, 2.0, "aborted by its owner")
    assert not store.transition("s1", (RESERVED,), ACTIVE, 3.0)  # the commit lost
    record = store.get("s1")
    assert (record.state, record.reason, record.updated) == (ABORTED, "aborted by its owner", 2.0)
    assert store.insert(_record("s2"))
    assert store.transition("s2", (RESERVED,), ACTIVE, 4.0)
    assert store.get("s2").expires is None  # a committed session does not lapse
    assert [r.session for r in store.holding()] == ["s2"]
    assert store.get("nope") is None


def test_sqlite_state_survives_a_restart(tmp_path):
    state = SqliteState(tmp_path / "state")
    state.insert(_record())
    state.insert(_record("s2"))
    state.transition("s2", (RESERVED,), ACTIVE, 5.0)
    state.close()
    again = SqliteState(tmp_path / "state")
    try:
        assert [(r.session, r.state) for r in again.sessions()] == [
            ("s1", RESERVED),
            ("s2", ACTIVE),
        ]
        assert again.get("s1") == _record()  # every field read back
        assert again._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert (tmp_path / "state" / "node.sqlite").stat().st_mode & 0o077 == 0
    finally:
        again.close()


@pytest.fixture
def pool(tmp_path):
    p = LocalPool(tmp_path, trainers=2, owners=["alice", "bob"], capacity=1, verifier=False)
    p.start()
    try:
        yield p
    finally:
        p.stop()


def _states(pool, node):
    return {r.session: (r.owner, r.state, r.reason) for r in pool.nodes[node].state.sessions()}


def test_a_full_node_refuses_and_no_reservation_is_left_behind(pool):
    """bob's chain is trainer-1 then trainer-2, which alice fills: trainer-1 granted bob's
    reservation, trainer-2 refused, so bob aborts the one on trainer-1; nothing is held."""
    cfg1, cfg2 = quick_config(**VANILLA, trainers=1), quick_config(**VANILLA, trainers=2)
    alice = pool.admit("alice", cfg1, trainers=["trainer-2"])
    with pytest.raises(AdmissionRefused, match="trainer-2 is full: 1 of its capacity 1"):
        pool.admit("bob", cfg2, session="bobs")
    assert _states(pool, "trainer-1") == {"bobs": ("bob", ABORTED, "aborted by its owner")}
    assert _states(pool, "trainer-2") == {alice: ("alice", ACTIVE, "")}
    assert pool.nodes["trainer-1"].state.holding() == []
    # and the slot bob left is free: a new session of bob's is admitted there
    pool.admit("bob", cfg1, trainers=["trainer-1"])


def test_a_reservation_that_is_not_committed_lapses(pool):
    """An owner that dies between reserve and commit leaves a reservation that expires."""
    cfg = quick_config(**VANILLA, trainers=1)
    chain = pool.chain(cfg, ["trainer-1"])
    bob, node = pool.owners["bob"], chain["t1"]
    identities, peers = {"do": "bob", "t1": node.name}, {"do": bob.address, "t1": node.address}
    settings = pool.settings(cfg, chain)["t1"]
    bob.request(node, "reserve", session="late", party="t1", identities=identities,
                peers=peers, settings=settings, ttl=0.3)  # fmt: skip
    assert _states(pool, "trainer-1")["late"][1] == RESERVED
    wait_for(lambda: _states(pool, "trainer-1")["late"][1] == ABORTED, 5, "the expiry")
    assert _states(pool, "trainer-1")["late"][2] == "reservation expired"
    with pytest.raises(Exception, match="cannot be committed: reservation expired"):
        bob.request(node, "commit", session="late")
    assert pool.nodes["trainer-1"].state.holding() == []


def test_a_restarted_node_knows_its_sessions_and_never_reuses_an_id(pool, tmp_path):
    """Stopped and started on the same --state: the ended session is remembered (its id is
    refused), the active one is served again, and capacity counts it."""
    cfg = quick_config(**VANILLA, trainers=1)
    ended = pool.admit("alice", cfg, trainers=["trainer-1"])
    pool.owners["alice"].request(pool.address("trainer-1"), "abort", session=ended)
    active = pool.admit("alice", cfg, trainers=["trainer-1"])
    pool.nodes["trainer-1"].stop()
    node = pool.start_node("trainer-1")
    assert {s["session"]: s["state"] for s in node.sessions()} == {ended: ABORTED, active: ACTIVE}
    assert active in node._served  # routable again, in the join epoch
    with pytest.raises(AdmissionRefused, match=f"session {ended} was used on trainer-1 before"):
        pool.admit("alice", cfg, session=ended, trainers=["trainer-1"])
    with pytest.raises(AdmissionRefused, match="trainer-1 is full"):
        pool.admit("bob", cfg, trainers=["trainer-1"])


def test_a_finished_session_is_recorded_finished(pool, tmp_path, digits):
    """The owner's shutdown ends the session on its node as finished."""
    cfg = quick_config(**VANILLA, trainers=1)
    pool.run("alice", cfg, tmp_path / "run", digits.limit(64, 50, seed=0))
    (owner, state, _), = _states(pool, "trainer-1").values()  # fmt: skip
    assert (owner, state) == ("alice", FINISHED)


def test_node_status_lists_sessions(pool):
    cfg = quick_config(**VANILLA, trainers=1)
    session = pool.admit("alice", cfg, trainers=["trainer-1"])
    result = CliRunner().invoke(app, ["node", "status", "--state", str(pool.state("trainer-1"))])
    assert result.exit_code == 0, result.output
    assert session in result.output and "active" in result.output and "alice" in result.output
    result = CliRunner().invoke(app, ["node", "status", "--state", str(pool.root / "none")])
    assert result.exit_code == 2 and "holds no node state" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["gardener"], "unknown role 'gardener'"),
        (["trainer", "--capacity", "0"], "--capacity must be at least 1"),
        (["trainer", "--listen", "nowhere"], "is not host:port"),
    ],
)
def test_node_start_refuses_bad_input_in_one_line(pool, tmp_path, args, message):
    role, *rest = args
    base = {"--listen": "127.0.0.1:0", "--state": str(tmp_path / "s"),
            "--certs": str(pool.root / "certs" / "trainer-1")}  # fmt: skip
    flags = dict(zip(rest[::2], rest[1::2], strict=True))
    argv = ["node", "start", role, *(x for kv in {**base, **flags}.items() for x in kv)]
    start = time.monotonic()
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert time.monotonic() - start < 10


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"session": "../../escape"}, "session must be 1-64 of A-Z a-z 0-9 _ -"),
        ({"party": "verifier"}, "trainer-1 serves t1 .. t8, not 'verifier'"),
        ({"ttl": 10_000}, "ttl must be seconds in (0, 600.0]"),
        ({"ttl": True}, "ttl must be seconds"),
        ({"lr": -1.0}, "invalid setting lr"),
        ({"settings": {"seed": 0}}, "settings must name exactly"),
        ({"peers": {"do": "nowhere", "t1": "127.0.0.1:1"}}, "is not host:port"),
        ({"identities": {"do": "bob", "t1": "../x"}}, "invalid party name"),
    ],
)
def test_a_malformed_reservation_is_refused_and_holds_nothing(pool, change, message):
    cfg = quick_config(**VANILLA, trainers=1)
    chain = pool.chain(cfg, ["trainer-1"])
    bob, node = pool.owners["bob"], chain["t1"]
    settings = dict(pool.settings(cfg, chain)["t1"])
    if "lr" in change:
        settings["lr"] = change.pop("lr")
    meta = {"session": "s", "party": "t1", "identities": {"do": "bob", "t1": node.name},
            "peers": {"do": bob.address, "t1": node.address}, "settings": settings, "ttl": 5,
            **change}  # fmt: skip
    with pytest.raises(ProtocolError, match=f"INVALID_ARGUMENT: .*{re.escape(message)}"):
        bob.request(node, "reserve", **meta)
    assert pool.nodes["trainer-1"].state.sessions() == []


def test_a_session_whose_owner_is_gone_is_ended_and_its_slot_freed(pool):
    """Committed, then never a message (the owner died): after --session-idle the node
    aborts the session and stops serving it, so its capacity is not lost for good."""
    pool.nodes["trainer-1"].stop()
    node = pool.start_node("trainer-1", session_idle_s=0.5)
    cfg = quick_config(**VANILLA, trainers=1)
    session = pool.admit("alice", cfg, trainers=["trainer-1"])
    assert node.state.get(session).state == ACTIVE
    wait_for(lambda: node.state.get(session).state == ABORTED, 10, "the idle timeout")
    assert node.state.get(session).reason == "no message for 0.5 s: its owner is gone"
    wait_for(lambda: session not in node._served, 10, "the session to stop")
    pool.admit("bob", cfg, trainers=["trainer-1"])  # capacity 1: the slot is free again
