"""Crash and resume with real processes: kill -9 a trainer or the verifier mid-epoch.

The data owner notices the failure, waits for the party to come back, rolls
every party back to the last common checkpoint and finishes. The step
counters (each trainer's ``steps_applied``, the ``steps`` of every ledger
record) show that no step was lost or applied twice, and the ledger verifies.
"""

from __future__ import annotations

import json
import os
import signal
import stat
from pathlib import Path

from cc_helpers import quick_config
from conftest import WM, alive, checkpoint_at_least, cli, ledger_steps, pids, wait_for

from clicooper.runtime.certs import create_certificates
from clicooper.runtime.deploy import config_toml, free_ports, write_peers

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
    wait_for(checkpoint_at_least(run_dir / "checkpoints" / "t2", 10), 120, "t2 at step 10")
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
    """`clicooper launch` end to end, and it restarts a party process that died.

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
    # every party past step 35: the verifier may checkpoint a step before the trainers do
    ready = [checkpoint_at_least(out / "checkpoints" / p, 35) for p in ("verifier", "t1", "t2")]
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
    assert not any(alive(pid) for name, pid in pids(out).items() if name != "launcher")
