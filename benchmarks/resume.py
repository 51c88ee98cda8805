"""Crash and resume with real processes: accuracy against an uninterrupted run.

Each scenario runs the same command twice with the same seed and the same owner
secret (``--owner-secret``: same label permutation, same activation noise): once
uninterrupted, and once killed with ``kill -9`` (SIGKILL: no handler runs) once the
owner's checkpoints reach a given step, then finished. Only the trainers' watermark
secrets (and so their bits) differ between the two runs. Scenarios:

* ``run``: in-process ``clicooper run``, the whole process killed, then
  ``clicooper run --resume DIR``;
* ``launch``: ``clicooper launch`` (a one-session pool of its own: a node process per
  trainer and the verifier, gRPC with TLS on loopback), the launch process itself killed
  (it hosts the owner; its orphaned nodes stop by themselves), then
  ``clicooper launch --resume DIR``;
* ``trainer``: ``clicooper launch`` with one node process killed; ``launch`` starts it
  again on its state and every party rolls back to the last step common to all.

For each it prints both test accuracies and the gap (goal: at most 0.5 points), the
rollback, the steps each trainer applied, the ledger's step counters, whether each
ledger verifies against the anchor its verifier published when it started, and the
epsilon of both runs.

    python benchmarks/resume.py [--scenario run launch trainer] [--dataset fashion-mnist]
        [--epochs 3] [--train-subset N] [--at-step 200]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from clicooper.node.pool import Pool
from clicooper.runtime import checkpoint
from clicooper.runtime.deploy.launcher import session_dir
from clicooper.runtime.verification import verify_run
from clicooper.watermark import Ledger
from clicooper.watermark.anchor import ANCHOR_FILE, Anchor


def start(command: str, out: Path, args: argparse.Namespace, *extra: str) -> subprocess.Popen:
    """``clicooper COMMAND`` with the benchmark's settings, writing ``out``."""
    argv = [sys.executable, "-m", "clicooper.cli", command, "--dataset", args.dataset]
    argv += ["--epochs", str(args.epochs), "--trainers", str(args.trainers), "--seed", "0"]
    argv += ["--checkpoint-steps", str(args.checkpoint_steps), "--out", str(out)]
    for flag, value in (("--train-subset", args.train_subset), ("--test-subset", args.test_subset)):
        argv += [flag, str(value)] if value else []
    return _popen([*argv, *extra])


def _popen(argv: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)


def resume(command: str, out: Path) -> subprocess.Popen:
    return _popen([sys.executable, "-m", "clicooper.cli", command, "--resume", str(out)])


def finish(proc: subprocess.Popen, what: str) -> None:
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed ({proc.returncode}): {err.decode()[-2000:]}")


def wait_step(
    directory: Path | None, step: int, proc: subprocess.Popen, timeout: float = 1800
) -> None:
    """Until the checkpoints in ``directory`` reach ``step`` (while ``proc`` runs)."""
    deadline = time.monotonic() + timeout
    while directory is None or max(checkpoint.steps(directory), default=0) < step:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{directory} never reached step {step} (raise --epochs?)")
        time.sleep(0.05)


def anchor_of(run_dir: Path) -> Anchor:
    """The verifier key its run published at its start (verifier/anchor.txt; a launched
    run's is on its verifier node until the run ends)."""
    node = session_dir(run_dir, "verifier")
    if node is not None and (node.verifier / ANCHOR_FILE).is_file():
        return Anchor.from_file(node.verifier / ANCHOR_FILE)
    return Anchor.from_file(run_dir / "verifier" / ANCHOR_FILE)


def children(run_dir: Path) -> dict[str, int]:
    """The node processes of a launched run's own pool, by party."""
    pool = Pool.load(run_dir / "deploy" / "pool")
    return {name: node.pid for name, node in pool.nodes.items()}


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def ledger_steps(run_dir: Path) -> dict[str, list[int]]:
    with Ledger.open(run_dir / "ledger.sqlite", readonly=True) as ledger:
        return ledger.step_counts()


def report(name: str, run_dir: Path, anchor: Anchor) -> dict:
    results = json.loads((run_dir / "results.json").read_text())
    transport, privacy = results["transport"], results["privacy"]
    verified = verify_run(run_dir, anchor=anchor)
    rollback = [(r["failed_at_step"], r["resumed_from_step"]) for r in transport["recoveries"]]
    print(f"{name}: test accuracy {results['accuracy']['test']:.4f}")
    print(f"  steps {transport['steps']}, steps applied {transport['steps_applied']}")
    print(f"  rollbacks (failed at, resumed from) {rollback}, restarts {transport.get('restarts')}")
    print(f"  ledger steps {ledger_steps(run_dir)}")
    print(f"  ledger verifies (anchored): {verified.ok} ({verified.anchored}) "
          f"{verified.first_failure or ''}")  # fmt: skip
    print(f"  epsilon {privacy['epsilon']} over {privacy['releases']} releases")
    return {
        "accuracy": float(results["accuracy"]["test"]),
        "steps": (transport["steps"], transport["steps_applied"], ledger_steps(run_dir)),
        "epsilon": (privacy["epsilon"], privacy["releases"]),
        "ok": verified.ok and verified.anchored,
    }


def scenario(kind: str, root: Path, args: argparse.Namespace) -> None:
    command = "run" if kind == "run" else "launch"
    plain, killed = root / f"{kind}-uninterrupted", root / f"{kind}-killed"
    print(f"== {kind}: " + {
        "run": "in-process `clicooper run` killed, then `run --resume`",
        "launch": "the `clicooper launch` process (the owner) killed, then `launch --resume`",
        "trainer": f"`clicooper launch` with {args.kill}'s process killed; launch restarts it",
    }[kind])  # fmt: skip
    started = time.monotonic()
    finish(start(command, plain, args), "the uninterrupted run")
    print(f"uninterrupted run: {time.monotonic() - started:.0f} s")
    started = time.monotonic()
    proc = start(command, killed, args, "--owner-secret", str(plain / "owner" / "owner.secret"))
    if kind == "trainer":
        node = None
        while node is None and proc.poll() is None:
            node = session_dir(killed, args.kill)
            time.sleep(0.05)
        wait_step(node.checkpoints(args.kill) if node else None, args.at_step, proc)
        anchor = anchor_of(killed)
        os.kill(children(killed)[args.kill], signal.SIGKILL)
        print(f"killed {args.kill} at checkpoint step >= {args.at_step}")
        finish(proc, "the killed run")
    else:
        wait_step(killed / "owner" / "checkpoints", args.at_step, proc)
        anchor = anchor_of(killed)
        orphans = children(killed) if kind == "launch" else {}
        proc.kill()  # SIGKILL of the owner's process
        proc.wait()
        print(f"killed `clicooper {command}` (pid {proc.pid}) at owner checkpoint "
              f">= {args.at_step}; results.json: {(killed / 'results.json').exists()}")  # fmt: skip
        if orphans:
            time.sleep(5.0)
            left = [name for name, pid in orphans.items() if alive(pid)]
            print(f"  its party processes still running 5 s later: {left or 'none'}")
        finish(resume(command, killed), f"`{command} --resume`")
    print(f"killed and finished: {time.monotonic() - started:.0f} s")
    a = report("uninterrupted", plain, anchor_of(plain))
    b = report("killed and resumed", killed, anchor)
    print(f"accuracy gap: {100 * abs(a['accuracy'] - b['accuracy']):.2f} points (goal <= 0.5)")
    same = a["steps"] == b["steps"], a["epsilon"] == b["epsilon"], a["ok"] and b["ok"]
    print(f"same step counters: {same[0]}; same epsilon and releases: {same[1]}; "
          f"both ledgers verify: {same[2]}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", nargs="+", choices=("run", "launch", "trainer"),
                    default=["run", "launch"])  # fmt: skip
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--trainers", type=int, default=2)
    ap.add_argument("--train-subset", type=int, default=None)
    ap.add_argument("--test-subset", type=int, default=None)
    ap.add_argument("--kill", default="t2", help="trainer scenario: t1..tn or verifier")
    ap.add_argument("--at-step", type=int, default=200)
    ap.add_argument("--checkpoint-steps", type=int, default=20)
    args = ap.parse_args()
    print(f"dataset {args.dataset}, train subset {args.train_subset or 'all'}, test subset "
          f"{args.test_subset or 'all'}, {args.epochs} epochs, {args.trainers} trainers, "
          f"checkpoint every {args.checkpoint_steps} steps, "
          f"kill at step {args.at_step}")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.scenario:
            scenario(kind, Path(tmp), args)


if __name__ == "__main__":
    main()
