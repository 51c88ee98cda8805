"""Faults with 4 sessions in flight on a pool of 2 trainers (issue 13, point 4), Fashion-MNIST.

Starts a pool (``clicooper pool up``: 2 trainer nodes and a verifier node, each its own
process), runs ``--owners`` owners at once (``clicooper run --pool``, each its own process
and seed), and once every session has checkpointed ``--kill-at`` steps on the nodes it
kills one party with SIGKILL:

* ``trainer``: trainer-1's node process, then ``pool restart`` on the same ``--state``;
* ``verifier``: the verifier node, then the same;
* ``owner``: the first owner's process, then ``clicooper run --resume`` of its run.

Every session must finish with exit 0, apply every step exactly once
(``transport.steps_applied`` equal to the planned steps on every trainer), and its ledger
must verify against its anchor (``clicooper verify``). Then each session is run again
alone on the idle pool (``--alone-runs`` times) with the same seed and owner secret
(``--owner-secret``; the trainers' watermark secrets are fresh, as in any run), and the
table prints the test accuracies and the difference to the alone runs' mean (goal: at
most 0.5 points).

Fresh watermark secrets alone move a session's accuracy by about a point at this
budget, so ``--no-watermark`` runs every session without the mark: then nothing in a
session is left to chance but the fault, its runs alone agree to the last test image,
and any difference is what the fault and its recovery did. (No ledger is kept then;
the runs with the mark check every ledger.)

    python benchmarks/pool_faults.py [--fault trainer|verifier|owner] [--owners 4]
        [--dataset fashion-mnist] [--train-subset 4000] [--epochs 2] [--no-watermark]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from clicooper.node.pool import Pool, pool_down, pool_up, restart_node
from clicooper.privacy.secrets import SECRET_FILE
from clicooper.runtime import checkpoint
from clicooper.runtime.rundirs import RunDir

NODE_OF = {"trainer": "trainer-1", "verifier": "verifier-1"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fault", choices=("trainer", "verifier", "owner"), default="trainer")
    ap.add_argument("--owners", type=int, default=4)
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--model", default="cnn")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--train-subset", type=int, default=4000)
    ap.add_argument("--test-subset", type=int, default=10000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--checkpoint-steps", type=int, default=10)
    ap.add_argument("--kill-at", type=int, default=0, help="step (default: mid first epoch)")
    ap.add_argument("--alone-runs", type=int, default=1, help="runs of each session alone")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds for the sessions")
    ap.add_argument("--out", type=Path, default=None, help="keep the pool and runs here")
    ap.add_argument("--no-watermark", action="store_true", help="sessions without the mark")
    args = ap.parse_args()
    per_epoch = math.ceil(args.train_subset / args.batch_size)  # the last batch is short
    kill_at = args.kill_at or max(args.checkpoint_steps, per_epoch // 2)
    root = args.out or Path(tempfile.mkdtemp(prefix="clicooper-pool-faults-"))
    flags = [
        "--dataset", args.dataset, "--model", args.model, "--trainers", "2",
        "--epochs", str(args.epochs), "--train-subset", str(args.train_subset),
        "--test-subset", str(args.test_subset), "--batch-size", str(args.batch_size),
        "--checkpoint-steps", str(args.checkpoint_steps),
        *(["--no-watermark"] if args.no_watermark else []),
    ]  # fmt: skip
    pool = pool_up(root / "pool", 2, capacity=args.owners)
    print(f"pool: {', '.join(pool.nodes)} (capacity {args.owners}); runs under {root}")
    try:
        names = [f"owner{i}" for i in range(args.owners)]
        faulted = _faulted(pool, root / "faulted", flags, names, args, kill_at)
        alone: dict[str, list[dict]] = {name: [] for name in names}
        for r in range(args.alone_runs):  # one at a time on the idle pool
            for i, name in enumerate(names):
                secret = RunDir(root / "faulted" / name).owner / SECRET_FILE
                extra = ["--seed", str(i), "--owner-secret", str(secret)]
                out = root / f"alone{r}" / name
                _wait([_start(pool, out, [*flags, *extra])], args.timeout)
                alone[name].append(_check(out, per_epoch * args.epochs))
        _table(faulted, alone)
    finally:
        pool_down(Pool.load(root / "pool"))


def _faulted(
    pool: Pool, out: Path, flags: list[str], names: list[str], args, kill_at: int
) -> dict[str, dict]:
    """Run the sessions at once, kill one party mid-epoch, recover it; each session's figures."""
    procs = {n: _start(pool, out / n, [*flags, "--seed", str(i)]) for i, n in enumerate(names)}
    trainer = pool.nodes["trainer-1"].state
    _wait_for(lambda: _sessions_past(trainer, len(names), kill_at), args.timeout, "checkpoints")
    t0 = time.monotonic()
    if args.fault == "owner":
        victim = names[0]
        os.kill(procs[victim].pid, signal.SIGKILL)
        procs[victim].wait()
        procs[victim] = _resume(out / victim)
    else:
        node = pool.nodes[NODE_OF[args.fault]]
        os.kill(node.pid, signal.SIGKILL)
        _wait_for(lambda: _gone(node.pid), 30, f"{node.name} to die")
        restart_node(pool, node.name)
    took = time.monotonic() - t0
    print(f"killed the {args.fault} at step >= {kill_at}; restarted in {took:.1f} s")
    _wait(list(procs.values()), args.timeout)
    steps = math.ceil(args.train_subset / args.batch_size) * args.epochs
    return {n: _check(out / n, steps) for n in names}


def _start(pool: Pool, out: Path, flags: list[str]) -> subprocess.Popen[bytes]:
    out.parent.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "clicooper.cli", "run", "--pool", str(pool.root / "pool.toml")]
    log = open(out.parent / f"{out.name}.log", "ab")  # noqa: SIM115 (the child holds it)
    return subprocess.Popen([*argv, *flags, "--out", str(out)], stdout=log, stderr=log)


def _resume(out: Path) -> subprocess.Popen[bytes]:
    log = open(out.parent / f"{out.name}.log", "ab")  # noqa: SIM115
    argv = [sys.executable, "-m", "clicooper.cli", "run", "--resume", str(out)]
    return subprocess.Popen(argv, stdout=log, stderr=log)


def _wait(procs: list[subprocess.Popen[bytes]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    codes = [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    if any(codes):
        raise SystemExit(f"a session failed (exit codes {codes}); see the logs")


def _check(run_dir: Path, steps: int) -> dict:
    """The session's accuracy, after checking its steps and its ledger against its anchor."""
    r = json.loads(RunDir(run_dir).results.read_text())
    applied = r["transport"]["steps_applied"]
    if set(applied.values()) != {steps}:
        raise SystemExit(f"{run_dir.name}: steps applied {applied}, planned {steps} each")
    anchor = r["watermark"].get("anchor")
    if anchor is not None:  # a session with the mark: its ledger must verify
        argv = [sys.executable, "-m", "clicooper.cli", "verify", str(run_dir), "--anchor", anchor]
        done = subprocess.run(argv, capture_output=True, text=True)
        if done.returncode != 0:
            why = f"{done.stdout}{done.stderr}"
            raise SystemExit(f"{run_dir.name}: the ledger does not verify: {why}")
    return {
        "accuracy": r["accuracy"]["test"],
        "recoveries": len(r["transport"].get("recoveries") or []),
        "ledger": anchor is not None,
    }


def _sessions_past(node_state: Path, n: int, step: int) -> bool:
    """Whether ``n`` sessions on the node have checkpointed ``step`` at every trainer there."""
    dirs = list((node_state / "sessions").glob("*/checkpoints/t*"))
    return len(dirs) >= n and all(max(checkpoint.steps(d), default=0) >= step for d in dirs)


def _gone(pid: int) -> bool:
    """Whether ``pid`` has exited (a zombie or reaped): its sockets are closed by then.

    Its command line empties earlier, while it still holds its listening socket, so
    ``PoolNode.running`` turning false is not enough before a restart on the same port.
    """
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX"
    except (OSError, IndexError):
        return True


def _wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.5)


def _table(faulted: dict[str, dict], alone: dict[str, list[dict]]) -> None:
    """Each session's accuracy with the fault beside its runs alone (fresh trainer secrets:
    the spread of the alone runs is what the watermark secrets alone move it by)."""
    print("session | recoveries | with the fault | alone (each run) | difference to their mean")
    worst = 0.0
    for name, f in faulted.items():
        accs = [a["accuracy"] for a in alone[name]]
        diff = 100 * (f["accuracy"] - sum(accs) / len(accs))
        worst = max(worst, abs(diff))
        shown = ", ".join(f"{a:.4f}" for a in accs)
        print(f"{name:7} | {f['recoveries']:10} | {f['accuracy']:14.4f} | {shown} | {diff:+.2f}")
    ledgers = all(f["ledger"] for f in faulted.values())
    kept = "every ledger verified" if ledgers else "no ledger (sessions without the mark)"
    print(f"largest difference {worst:.2f} points (goal at most 0.5); {kept}")


if __name__ == "__main__":
    main()
