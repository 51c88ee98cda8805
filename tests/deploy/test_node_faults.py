"""A trainer or verifier node that dies mid-epoch with two sessions in flight (issue 13, point 4).

The node is stopped where it stands (no checkpoint, no goodbye: what it leaves on disk is
what kill -9 would leave) and started again on the same --state and address. It serves
both active sessions again from their checkpoints; each owner notices the failure, rolls
its chain back to the last common checkpoint and finishes; no step is lost or applied
twice and both ledgers verify. (The same with a killed process: test_pool.py.)
"""

from __future__ import annotations

import json
import os
import signal
import threading

import pytest
from cc_helpers import quick_config
from conftest import WM, checkpoint_at_least, cli, ledger_steps, wait_for
from nodes import CONFIG, LocalPool
from typer.testing import CliRunner

from clicooper.cli.main import app
from clicooper.node.pool import Pool, PoolNode
from clicooper.node.state import ACTIVE, FINISHED, SqliteState
from clicooper.runtime.verification import verify_run

STEPS = 2 * 160 // 16  # 20 steps, 10 per epoch
CFG = {**WM, "watermark.bits": 128, "trainers": 2, "epochs": 2, "batch_size": 16,
       "train_subset": 160, "checkpoint_steps": 3, "transport": "grpc"}  # fmt: skip


@pytest.mark.parametrize(("node", "party"), [("trainer-2", "t2"), ("verifier-1", "verifier")])
def test_a_node_restarted_mid_epoch_resumes_every_session(tmp_path, digits, node, party):
    pool = LocalPool(tmp_path, trainers=2, owners=["alice", "bob"]).start()
    data = digits.limit(160, 100, seed=0)
    sessions, results, errors = {}, {}, []

    def owner(name, seed):
        try:
            cfg = quick_config(**CFG, seed=seed)
            results[name] = pool.run(name, cfg, tmp_path / name, data, sessions.get(name))
        except Exception as exc:  # reported below
            errors.append(f"{name}: {exc!r}")

    try:
        sessions.update(alice="alicesession", bob="bobsession")
        threads = [threading.Thread(target=owner, args=(n, i)) for i, n in enumerate(sessions)]
        for t in threads:
            t.start()
        for name in sessions.values():  # both past their first checkpoint on the node
            directory = pool.state(node) / "sessions" / name / "checkpoints" / party
            wait_for(checkpoint_at_least(directory, 3), 300, f"{name}'s checkpoint")
        pool.nodes[node].stop()
        pool.start_node(node)
        for t in threads:
            t.join(timeout=300)
        assert not errors, errors
    finally:
        pool.stop()
    for name in ("alice", "bob"):
        r = results[name].results
        assert r["transport"]["recoveries"], f"{name} did not notice the failure"
        assert r["transport"]["steps"] == STEPS
        assert r["transport"]["steps_applied"] == {"t1": STEPS, "t2": STEPS}
        assert ledger_steps(tmp_path / name)["do"] == [10, 20]
        assert r["watermark"]["verified"], r["watermark"]
        assert verify_run(tmp_path / name).ok
    for name in pool.node_names:
        state = SqliteState(pool.state(name), readonly=True)
        assert {r.session: r.state for r in state.sessions()} == dict.fromkeys(
            sessions.values(), FINISHED
        ), name
        state.close()


def test_a_killed_owner_resumes_on_its_nodes_and_the_others_go_on(tmp_path, digits, procs):
    """alice's `run --pool` process gets kill -9 mid-epoch while bob trains on the same
    nodes: bob finishes untouched, alice's session waits on its nodes, and `run --resume`
    continues it there (each node serves it afresh from its checkpoints) to a verified end."""
    pool = LocalPool(tmp_path, trainers=2, owners=["bob"]).start()
    nodes = {
        name: PoolNode(name, "verifier" if name.startswith("verifier") else "trainer",
                       node.listen, 4, pool.state(name), 0)
        for name, node in pool.nodes.items()
    }  # fmt: skip
    Pool(tmp_path, nodes).write()
    (tmp_path / "run.toml").write_text(CONFIG)
    alice = tmp_path / "alice"
    flags = ["--pool", str(tmp_path / "pool.toml"), "--config", str(tmp_path / "run.toml"),
             "--dataset", "digits", "--model", "mlp", "--trainers", "2", "--epochs", "2",
             "--train-subset", "160", "--test-subset", "100", "--batch-size", "16",
             "--checkpoint-steps", "3", "--out", str(alice)]  # fmt: skip
    results, errors = {}, []

    def bob():
        try:
            cfg = quick_config(**CFG, seed=1)
            results["bob"] = pool.run("bob", cfg, tmp_path / "bob", digits.limit(160, 100, seed=0))
        except Exception as exc:  # reported below
            errors.append(repr(exc))

    try:
        owner = procs.start(cli("run", *flags), tmp_path / "alice.log")
        wait_for(checkpoint_at_least(alice / "owner" / "checkpoints", 3), 120, "alice's steps")
        thread = threading.Thread(target=bob)
        thread.start()
        os.killpg(owner.pid, signal.SIGKILL)
        owner.wait(timeout=10)
        session = json.loads((alice / "deploy" / "pool.json").read_text())["session"]
        assert all(pool.nodes[n].state.get(session).state == ACTIVE for n in nodes)
        resumed = CliRunner().invoke(app, ["run", "--resume", str(alice)])
        thread.join(timeout=300)
        assert resumed.exit_code == 0, resumed.output
        assert not errors, errors
    finally:
        pool.stop()
    r = json.loads((alice / "results.json").read_text())
    assert r["transport"]["steps_applied"] == {"t1": STEPS, "t2": STEPS}
    assert ledger_steps(alice)["do"] == [10, 20]
    assert r["watermark"]["verified"], r["watermark"]
    assert results["bob"].results["watermark"]["verified"]
    assert results["bob"].results["transport"]["recoveries"] == []  # bob never noticed
    for name in nodes:
        state = SqliteState(pool.state(name), readonly=True)
        assert state.get(session).state == FINISHED
        state.close()
