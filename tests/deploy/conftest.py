"""Real party processes on 127.0.0.1 (no ``__init__.py``: see tests/grpc/conftest.py).

Every process a test starts is registered with the ``procs`` fixture, which
kills its whole process group at teardown, whatever happened in the test.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import clicooper
from clicooper.runtime import checkpoint

SRC = str(Path(clicooper.__file__).resolve().parents[1])
# Small clicooper runs whose ledger verifies (as in tests/test_chain_integration.py).
WM = {"watermark.strength": 0.01, "privacy.noise_multiplier": 0.1, "labels.mode": "keyed"}


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "clicooper.cli", *args]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join(p for p in (SRC, e.get("PYTHONPATH")) if p)
    e["COLUMNS"] = "200"
    return e


class Procs:
    """Processes started by a test, each in its own process group."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
        with open(log, "ab") as fh:
            proc = subprocess.Popen(
                argv, stdout=fh, stderr=subprocess.STDOUT, env=env(), start_new_session=True
            )
        self.started.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.fixture
def procs() -> Iterator[Procs]:
    p = Procs()
    try:
        yield p
    finally:
        p.stop_all()


def wait_for(check: Callable[[], object], timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def checkpoint_at_least(directory: Path, step: int) -> Callable[[], bool]:
    def check() -> bool:
        return max(checkpoint.steps(directory), default=0) >= step

    return check


def pids(run_dir: Path) -> dict[str, int]:
    """The node processes of a launched run's own pool, by party (``deploy/pool/pool.toml``)."""
    from clicooper.node.pool import Pool

    try:
        pool = Pool.load(run_dir / "deploy" / "pool")
    except ValueError:
        return {}
    return {name: node.pid for name, node in pool.nodes.items()}


def launched_checkpoint(run_dir: Path, party: str, step: int) -> Callable[[], bool]:
    """Whether ``party``'s node has checkpointed ``step`` of the launched run in ``run_dir``
    (a trainer's or the verifier's checkpoints are on its node until the run ends)."""
    from clicooper.runtime.deploy.launcher import session_dir

    def check() -> bool:
        if party == "do":
            return checkpoint_at_least(run_dir / "owner" / "checkpoints", step)()
        node = session_dir(run_dir, party)
        return node is not None and checkpoint_at_least(node.checkpoints(party), step)()

    return check


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def ledger_steps(run_dir: Path) -> dict[str, list[int]]:
    """The ``steps`` field of every do and trainer record, per party, in ledger order."""
    from clicooper.watermark import Ledger

    with Ledger.open(run_dir / "ledger.sqlite", readonly=True) as ledger:
        return ledger.step_counts()
