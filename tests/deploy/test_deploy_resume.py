"""Crash and resume with real processes: kill -9 a trainer or the verifier mid-epoch.

The data owner notices the failure, waits for the party to come back, rolls
every party back to the last common checkpoint and finishes. The step
counters (each trainer's ``steps_applied``, the ``steps`` of every ledger
record) show that no step was lost or applied twice, and the ledger verifies.
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import sys
from pathlib import Path

import pytest
from cc_helpers import quick_config
from conftest import (
    WM,
    alive,
    checkpoint_at_least,
    cli,
    launched_checkpoint,
    ledger_steps,
    pids,
    wait_for,
)

from clicooper.node.pool import Pool, PoolNode
from clicooper.node.processes import free_ports
from clicooper.privacy import accounting
from clicooper.runtime.certs import create_certificates
from clicooper.runtime.deploy.launcher import LaunchPool, session_dir
from clicooper.runtime.deploy.peers import config_toml, write_peers
from clicooper.runtime.resume import save_run_config
from clicooper.runtime.rundirs import RunDir
from clicooper.runtime.session import run

SMALL = {"epochs": 3, "batch_size": 16, "train_subset": 480, "test_subset": 200}
STEPS = 3 * 480 // 16  # 90 steps, 30 per epoch


def _check_steps(run_dir: Path, results: dict) -> None:
    transport = results["transport"]
    assert transport["steps"] == STEPS
    assert transport["steps_applied"] == {"t1": STEPS, "t2": STEPS}
    steps = ledger_steps(run_dir)
    assert steps["do"] == [30, 60, 90]  # cumulative steps at each stage end
    assert steps["t1"] == steps["t2"] == [30, 30, 30]  # steps applied within each stage


def _verify(run_dir: Path, cli_inprocess) -> None:
    code, err, out = cli_inprocess("verify", str(run_dir))
    assert code == 0, err + out
    assert "chain holds: 15 records" in err + out


def test_trainer_killed_mid_epoch_and_restarted_resumes(tmp_path, procs, cli_inprocess):
    """Parties served by hand (`clicooper serve`); t2 gets kill -9 and the same command again."""
    run_dir = tmp_path / "run"
    cfg = quick_config(trainers=2, checkpoint_steps=5, **SMALL, **WM)
    create_certificates(["do", "t1", "t2", "verifier"], tmp_path / "certs")
    ports = free_ports(4)
    peers = dict(
        zip(["do", "t1", "t2", "verifier"], (f"127.0.0.1:{p}" for p in ports), strict=True)
    )
    write_peers(tmp_path / "peers.toml", "killtest", peers, {"send": 3, "step": 30, "resume": 90})
    (tmp_path / "config.toml").write_text(config_toml(cfg))
    common = ["--config", str(tmp_path / "config.toml")]
    common += ["--peers", str(tmp_path / "peers.toml"), "--out", str(run_dir)]
    common += ["--send-timeout", "3"]

    def serve(name: str):
        role = "verifier" if name == "verifier" else "trainer"
        bundle = str(tmp_path / "certs" / name)  # each party only its own bundle
        argv = cli("serve", role, "--name", name, "--listen", peers[name], *common)
        argv += ["--certs", bundle]
        return procs.start(argv, tmp_path / f"{name}.log")

    servers = {name: serve(name) for name in ("t1", "t2", "verifier")}
    owner = procs.start(
        cli(
            "run",
            "--config",
            str(tmp_path / "config.toml"),
            "--transport",
            "grpc",
            "--peers",
            str(tmp_path / "peers.toml"),
            "--certs",
            str(tmp_path / "certs" / "do"),
            "--out",
            str(run_dir),
        ),
        tmp_path / "do.log",
    )
    # Step 10 is common once every party saved it (the owner asks them in turn).
    layout = RunDir(run_dir)
    for party in ("t1", "t2", "verifier", "do"):
        wait_for(checkpoint_at_least(layout.checkpoints(party), 10), 120, f"{party} at step 10")
    os.kill(servers["t2"].pid, signal.SIGKILL)  # mid-epoch 1 (30 steps)
    servers["t2"].wait(timeout=10)
    servers["t2"] = serve("t2")  # the same command again
    assert owner.wait(timeout=150) == 0, (tmp_path / "do.log").read_text()[-3000:]

    results = json.loads((run_dir / "results.json").read_text())
    recoveries = results["transport"]["recoveries"]
    assert len(recoveries) == 1
    assert 10 <= recoveries[0]["resumed_from_step"] <= recoveries[0]["failed_at_step"] < 30
    _check_steps(run_dir, results)
    _verify(run_dir, cli_inprocess)
    assert results["accuracy"]["test"] > 0.2  # it trained (chance 0.1; one run gave 0.275)
    assert "t2: set up (resumed)" in (tmp_path / "t2.log").read_text()


def test_verifier_killed_mid_epoch_is_restarted_by_launch_and_resumes(
    tmp_path, procs, cli_inprocess
):
    """`clicooper launch` end to end, and it restarts a node process that died (on its
    own state: it serves the session again from its checkpoints).

    The verifier resumes its ledger; the run directory is the one `run` writes.
    """
    out = tmp_path / "run"
    flags = ["--dataset", "digits", "--model", "mlp", "--trainers", "2", "--epochs", "3"]
    flags += ["--train-subset", "480", "--test-subset", "200", "--batch-size", "16"]
    flags += ["--noise-multiplier", "0.1", "--label-mode", "keyed", "--checkpoint-steps", "5"]
    flags += ["--send-timeout", "3", "--step-timeout", "30"]
    (tmp_path / "wm.toml").write_text("[watermark]\nstrength = 0.01\n")
    argv = cli("launch", *flags, "--config", str(tmp_path / "wm.toml"), "--out", str(out))
    launcher = procs.start(argv, tmp_path / "launch.log")
    # every party past step 35 (the owner too: the run resumes from the last step that
    # every party checkpointed, and under load the owner's may lag the nodes')
    ready = [launched_checkpoint(out, p, 35) for p in ("do", "verifier", "t1", "t2")]
    wait_for(lambda: all(check() for check in ready), 120, "stage 2 underway")
    first = pids(out)["verifier"]
    os.kill(first, signal.SIGKILL)  # mid-epoch 2, after the stage-1 records
    assert launcher.wait(timeout=150) == 0, (tmp_path / "launch.log").read_text()[-3000:]

    assert pids(out)["verifier"] != first  # launch started a new verifier process
    results = json.loads((out / "results.json").read_text())
    assert results["transport"]["restarts"]["verifier"] == 1
    recoveries = results["transport"]["recoveries"]
    assert len(recoveries) == 1 and recoveries[0]["resumed_from_step"] >= 35
    _check_steps(out, results)
    _verify(out, cli_inprocess)
    held = ("segments", "audit", "checkpoints", "parties", "verifier", "owner")
    files = [p for d in held for p in (out / d).rglob("*") if p.is_file()]
    private = [p for p in files if p.name != "anchor.txt"]  # weights, keys; the anchor is public
    assert private and all(stat.S_IMODE(p.stat().st_mode) & 0o077 == 0 for p in private)
    assert "verifier: set up (resumed)" in (out / "logs" / "verifier.log").read_text()
    assert results["mode"] == "clicooper" and results["watermark"]["verified"]
    for name in ("ledger.sqlite", "owner", "parties", "verifier", "audit", "segments"):
        assert (out / name).exists(), name
    assert stat.S_IMODE(os.stat(out / "certs" / "t1").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(out / "certs" / "t1" / "t1.key").st_mode) == 0o600
    assert not any(alive(pid) for pid in pids(out).values())


def cli_python(*args: str) -> list[str]:
    return [sys.executable, *args]


def _anchor(run_dir: Path) -> str:
    """The fingerprint the verifier published in ``verifier/anchor.txt`` on its node when it
    started (the run directory gets it once the run is over)."""
    text = (session_dir(run_dir, "verifier").verifier / "anchor.txt").read_text()
    return re.search(r"fingerprint sha256:([0-9a-f]{64})", text).group(1)


def test_launch_killed_with_kill_9_is_resumed_by_launch_resume(tmp_path, procs, cli_inprocess):
    """kill -9 of the `clicooper launch` process itself (it hosts the owner) mid epoch 2:
    its orphaned node processes stop by themselves, and `launch --resume` starts every
    node again on its state and continues the session from the checkpoints: each step applied once,
    every stage closed once, the ledger verifies against the anchor the dead run
    published, and epsilon counts the 3 releases (one per epoch) exactly once."""
    out = tmp_path / "run"
    flags = ["--dataset", "digits", "--model", "mlp", "--trainers", "2", "--epochs", "3"]
    flags += ["--train-subset", "480", "--test-subset", "200", "--batch-size", "16"]
    flags += ["--noise-multiplier", "0.1", "--label-mode", "keyed", "--checkpoint-steps", "5"]
    (tmp_path / "wm.toml").write_text("[watermark]\nstrength = 0.01\n")
    timeouts = ["--send-timeout", "3", "--step-timeout", "30"]
    argv = cli("launch", *flags, "--config", str(tmp_path / "wm.toml"), "--out", str(out))
    first = procs.start([*argv, *timeouts], tmp_path / "launch.log")
    ready = [launched_checkpoint(out, p, 35) for p in ("verifier", "t1", "t2", "do")]
    wait_for(lambda: all(check() for check in ready), 120, "stage 2 underway")
    anchor = _anchor(out)
    orphans = pids(out)
    os.kill(first.pid, signal.SIGKILL)  # the owner's process: no handler, no cleanup
    first.wait(timeout=10)
    assert not (out / "results.json").exists()
    wait_for(lambda: not any(alive(p) for p in orphans.values()), 30, "the orphans to exit")

    resumed = procs.start(cli("launch", "--resume", str(out), *timeouts), tmp_path / "resume.log")
    assert resumed.wait(timeout=150) == 0, (tmp_path / "resume.log").read_text()[-3000:]
    results = json.loads((out / "results.json").read_text())
    (recovery,) = results["transport"]["recoveries"]
    assert recovery["error"] == "the run's process ended (--resume)"
    assert 35 <= recovery["resumed_from_step"] < 60 and recovery["failed_at_step"] is None
    _check_steps(out, results)  # 90 steps, each applied once; 3 stages, each closed once
    code, err, text = cli_inprocess("verify", str(out), "--anchor", anchor)
    assert code == 0 and "chain holds: 15 records" in err + text, err + text
    privacy = results["privacy"]
    assert privacy["releases"] == 3  # one per epoch: the replayed steps released nothing twice
    assert privacy["epsilon"] == accounting.epsilon(0.1, 3, privacy["delta"], "gaussian")
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in history] == [1, 2, 3] and history[-1]["epsilon"] == privacy[
        "epsilon"
    ]
    assert results["accuracy"]["test"] > 0.2  # it trained (chance 0.1)
    for name in ("t1", "t2", "verifier"):
        assert f"{name}: set up (resumed)" in (out / "logs" / f"{name}.log").read_text()
    children = pids(out)
    assert set(children) == set(orphans) and not set(children.values()) & set(orphans.values())
    assert not any(alive(pid) for pid in children.values())
    assert results["transport"]["pool"]["chain"] == {"t1": "t1", "t2": "t2", "verifier": "verifier"}


def test_stop_orphans_stops_only_the_dead_launchs_nodes(tmp_path, procs):
    """A node still running after its launch died is stopped; a process whose pid is
    recorded but which is not that node (a reused pid) is left alone."""
    sleep = "import time; time.sleep(120)"
    state = tmp_path / "deploy" / "pool" / "nodes"
    node = procs.start(cli_python("-c", sleep, "node", "start", "--state", str(state / "t1")),
                       tmp_path / "node.log")  # fmt: skip
    other = procs.start(cli_python("-c", sleep, "node", "start"), tmp_path / "other.log")
    wait_for(lambda: alive(node.pid) and alive(other.pid), 10, "both processes")
    pool = Pool(tmp_path / "deploy" / "pool", {
        "t1": PoolNode("t1", "trainer", "127.0.0.1:1", 1, state / "t1", node.pid),
        "t2": PoolNode("t2", "trainer", "127.0.0.1:2", 1, state / "t2", other.pid),
    })  # fmt: skip
    cfg = quick_config(trainers=2, **{"watermark.enabled": False})
    assert LaunchPool(tmp_path, cfg).stop_orphans(pool) == ["t1"]
    node.wait(timeout=20)  # SIGTERM (stop_orphans reaps it: its status is not seen here)
    assert alive(other.pid)


def test_one_launch_at_a_time_per_run_directory(tmp_path):
    """The launch lock: a second launch of a run directory in use is refused (one line)."""
    cfg = quick_config(trainers=1, **{"watermark.enabled": False})
    running = LaunchPool(tmp_path, cfg)
    try:
        running.up()
        with pytest.raises(ValueError, match="is being run by another `clicooper launch`"):
            LaunchPool(tmp_path, cfg).restart()
    finally:
        running.down()
    later = LaunchPool(tmp_path, cfg)
    try:
        later.restart()  # the lock went with the process that held it; t1 started again
        assert alive(pids(tmp_path)["t1"]) and pids(tmp_path)["t1"] == later.procs["t1"].pid
    finally:
        later.down()


def test_launch_resume_refuses_what_it_cannot_continue(tmp_path, small_digits, cli_inprocess):
    """One line and exit 2 for each: a finished run, no run, an in-process run (run
    --resume's), a launched run with no checkpoint yet; and run --resume of a launched run."""
    finished = tmp_path / "finished"
    run(quick_config(mode="vanilla", epochs=1), finished, data=small_digits)
    inprocess = tmp_path / "inprocess"
    run(quick_config(mode="vanilla", epochs=1), inprocess, data=small_digits)
    (inprocess / "results.json").unlink()  # as if it had died
    launched = tmp_path / "launched"  # what a launch killed before its first step leaves
    cfg = quick_config(trainers=1, transport="grpc", **{"watermark.enabled": False})
    nodes = LaunchPool(launched, cfg)
    try:
        nodes.up()
    finally:
        nodes.down()
    save_run_config(launched, cfg)
    (tmp_path / "empty").mkdir()
    cases = [
        ("launch", finished, "holds a finished run (results.json): nothing to resume"),
        ("launch", tmp_path / "missing", "is not a run directory: nothing to resume"),
        ("launch", tmp_path / "empty", "is not a run directory that can be resumed"),
        ("launch", inprocess, "is an in-process run: resume it with `clicooper run --resume`"),
        ("launch", launched, "has no checkpoint yet"),
        (
            "run",
            launched,
            "is a `clicooper launch` run: resume it with `clicooper launch --resume`",
        ),
    ]
    for command, target, needle in cases:
        code, err, _ = cli_inprocess(command, "--resume", str(target))
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and needle in lines[0], (command, target, err)
    code, err, _ = cli_inprocess("launch", "--resume", str(launched), "--epochs", "3")
    assert code == 2 and "leave out --epochs" in err
