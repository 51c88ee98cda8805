"""Crash and resume with real processes: accuracy against an uninterrupted run.

Runs ``clicooper launch`` (clicooper mode, every trainer and the verifier in its
own process, gRPC with TLS on loopback) twice with the same seed and the same
owner secret (``--owner-secret``: same label permutation, same activation noise):
once uninterrupted, and once with ``kill -9`` of one party once its checkpoints
reach a given step. ``launch`` restarts the killed process and every party rolls
back to the last step common to all. Only the trainers' watermark secrets (and so
their bits) differ between the two runs. Prints both test accuracies and the gap
(goal: at most 0.5 points), the recoveries, the steps each trainer applied, the
ledger's step counters and whether each ledger verifies.

    python benchmarks/resume.py [--dataset fashion-mnist] [--epochs 3] [--kill t2] [--at-step 200]
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

from clicooper.runtime import checkpoint
from clicooper.runtime.session import verify_run
from clicooper.watermark import Ledger


def launch(out: Path, args: argparse.Namespace, *extra: str) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "clicooper.cli", "launch", "--dataset", args.dataset]
    argv += ["--epochs", str(args.epochs), "--trainers", str(args.trainers)]
    argv += ["--seed", "0", "--checkpoint-steps", str(args.checkpoint_steps), "--out", str(out)]
    return subprocess.Popen([*argv, *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen[bytes], what: str) -> None:
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed ({proc.returncode}): {err.decode()[-2000:]}")


def kill_when(out: Path, party: str, step: int, timeout: float = 600) -> int:
    """SIGKILL ``party``'s process once its checkpoints reach ``step``; returns its pid."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if max(checkpoint.steps(out / "checkpoints" / party), default=0) >= step:
            pid = json.loads((out / "deploy" / "pids.json").read_text())[party]
            os.kill(pid, signal.SIGKILL)
            return pid
        time.sleep(0.05)
    raise SystemExit(f"{party} never reached step {step}")


def ledger_steps(run_dir: Path) -> dict[str, list[int]]:
    with Ledger.open(run_dir / "ledger.sqlite", readonly=True) as ledger:
        return ledger.step_counts()


def report(name: str, run_dir: Path) -> float:
    results = json.loads((run_dir / "results.json").read_text())
    transport = results["transport"]
    verified = verify_run(run_dir)
    print(f"{name}: test accuracy {results['accuracy']['test']:.4f}")
    print(f"  steps {transport['steps']}, steps applied {transport['steps_applied']}")
    print(f"  recoveries {transport['recoveries']}, restarts {transport.get('restarts')}")
    print(f"  ledger steps {ledger_steps(run_dir)}")
    print(f"  ledger verifies: {verified.ok} {verified.first_failure or ''}")
    return float(results["accuracy"]["test"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--trainers", type=int, default=2)
    ap.add_argument("--kill", default="t2", help="party to kill -9: t1..tn or verifier")
    ap.add_argument("--at-step", type=int, default=200)
    ap.add_argument("--checkpoint-steps", type=int, default=20)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        plain, killed = Path(tmp) / "uninterrupted", Path(tmp) / "killed"
        started = time.monotonic()
        finish(launch(plain, args), "the uninterrupted run")
        print(f"uninterrupted run: {time.monotonic() - started:.0f} s")
        secret = plain / "owner" / "owner.secret"
        started = time.monotonic()
        proc = launch(killed, args, "--owner-secret", str(secret))
        pid = kill_when(killed, args.kill, args.at_step)
        print(f"killed {args.kill} (pid {pid}) at checkpoint step >= {args.at_step}")
        finish(proc, "the killed run")
        print(f"killed run: {time.monotonic() - started:.0f} s")
        a = report("uninterrupted", plain)
        b = report(f"{args.kill} killed and restarted", killed)
        print(f"accuracy gap: {100 * abs(a - b):.2f} points (goal <= 0.5)")


if __name__ == "__main__":
    main()
