"""``clicooper pool up / status / down`` and ``run --pool`` (issue 13, point 2): real node
processes on 127.0.0.1, two owners' runs at once, both ledgers verified."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest
from conftest import alive, checkpoint_at_least, cli, env, wait_for
from nodes import CONFIG
from typer.testing import CliRunner

from clicooper.cli.main import app
from clicooper.node.pool import Pool

RUN = ["--dataset", "digits", "--model", "mlp", "--trainers", "2", "--epochs", "2",
       "--train-subset", "160", "--test-subset", "100", "--batch-size", "16",
       "--checkpoint-steps", "3"]  # fmt: skip
STEPS = 2 * 160 // 16


@pytest.fixture
def pool_dir(tmp_path):
    root = tmp_path / "pool"
    try:
        yield root
    finally:  # whatever happened: no node process outlives the test
        if (root / "pool.toml").exists():
            for node in Pool.load(root).nodes.values():
                if node.running():
                    os.killpg(node.pid, signal.SIGKILL)


class _Result:
    def __init__(self, result):
        self.returncode, self.stdout, self.stderr = result.exit_code, result.output, ""


def _cli(*args):
    """A command in this process (a CLI process takes seconds to start on a busy machine)."""
    return _Result(CliRunner().invoke(app, list(args), env={"COLUMNS": "200"}))


def _sessions_past(node_state, step):
    """Whether two sessions on the node have checkpointed ``step``."""
    dirs = list((node_state / "sessions").glob("*/checkpoints/t*"))
    return len(dirs) == 2 and all(checkpoint_at_least(d, step)() for d in dirs)


def test_two_owners_on_a_pool_survive_a_killed_node_and_down_stops_every_node(pool_dir, tmp_path):
    """pool up; two owners run at once; trainer-1 gets kill -9 mid-epoch and `pool restart`:
    both sessions resume and finish, both ledgers verify; pool down leaves no process."""
    up = _cli("pool", "up", "--trainers", "2", "--dir", str(pool_dir), "--capacity", "2")
    assert up.returncode == 0, up.stdout + up.stderr
    pool = Pool.load(pool_dir / "pool.toml")
    config = tmp_path / "run.toml"
    config.write_text(CONFIG)
    assert sorted(pool.nodes) == ["trainer-1", "trainer-2", "verifier-1"]
    assert all(n.running() for n in pool.nodes.values())
    # bob's bundle is issued by the pool's operator; alice's run issues its own
    issued = _cli("certs", "issue", "--ca", str(pool_dir / "certs" / "ca"), "--party", "bob",
                  "--out", str(tmp_path / "bobs"))  # fmt: skip
    assert issued.returncode == 0, issued.stdout
    own = {"alice": [], "bob": ["--certs", str(tmp_path / "bobs" / "bob")]}
    owners = {
        name: subprocess.Popen(
            cli(
                "run",
                "--pool",
                str(pool_dir / "pool.toml"),
                *RUN,
                "--config",
                str(config),
                "--seed",
                str(seed),
                "--out",
                str(tmp_path / name),
                *own[name],
            ),  # fmt: skip
            env=env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for seed, name in enumerate(("alice", "bob"))
    }
    killed = pool.nodes["trainer-1"]
    wait_for(lambda: _sessions_past(killed.state, 3), 240, "both sessions' first checkpoints")
    os.kill(killed.pid, signal.SIGKILL)
    wait_for(lambda: not alive(killed.pid), 10, "trainer-1 to die")
    restart = _cli("pool", "restart", str(pool_dir), "trainer-1")
    assert restart.returncode == 0, restart.stdout
    pool = Pool.load(pool_dir)
    assert pool.nodes["trainer-1"].pid != killed.pid and pool.nodes["trainer-1"].running()
    outputs = {name: proc.communicate(timeout=300)[0] for name, proc in owners.items()}
    anchors = {}
    for name, proc in owners.items():
        assert proc.returncode == 0, outputs[name]
        results = json.loads((tmp_path / name / "results.json").read_text())
        assert results["watermark"]["verified"], results["watermark"]
        assert results["transport"]["steps_applied"] == {"t1": STEPS, "t2": STEPS}
        assert results["transport"]["recoveries"], f"{name} did not notice the failure"
        assert set(results["transport"]["pool"]["chain"]) == {"t1", "t2", "verifier"}
        anchors[name] = results["watermark"]["anchor"]
        check = _cli("verify", str(tmp_path / name), "--anchor", anchors[name])
        assert check.returncode == 0, check.stdout + check.stderr
        owner = results["transport"]["pool"]["owner"]
        if name == "bob":
            assert owner == "bob"
        else:  # the owner's own certificate, issued by the pool's CA for this run
            assert owner.startswith("owner-")
            assert (tmp_path / name / "certs" / owner / f"{owner}.pem").is_file()
    assert anchors["alice"] != anchors["bob"]  # one verifier node, a key per session
    status = _cli("pool", "status", str(pool_dir))
    assert status.returncode == 0, status.stderr
    shown = status.stdout + status.stderr
    assert shown.count("finished") == 6 and shown.count("running") == 3, shown
    down = _cli("pool", "down", str(pool_dir))
    assert down.returncode == 0, down.stderr
    assert not any(alive(n.pid) for n in pool.nodes.values())
    status = _cli("pool", "status", str(pool_dir))
    assert (status.stdout + status.stderr).count("stopped") == 3


def test_pool_commands_refuse_bad_input_in_one_line(tmp_path):
    for args, message in (
        (["pool", "status", str(tmp_path)], "does not exist: start a pool"),
        (["pool", "up", "--trainers", "0", "--dir", str(tmp_path / "p")], "--trainers must be"),
        (["run", "--pool", str(tmp_path / "none.toml"), "--dataset", "digits"], "does not exist"),
    ):
        result = _cli(*args)
        assert result.returncode == 2, result.stdout + result.stderr
        assert message in result.stdout + result.stderr
        assert "Traceback" not in result.stdout + result.stderr
