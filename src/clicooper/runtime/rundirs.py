"""Run directories: the layout of one (DESIGN §10), and where runs go.

:class:`RunDir` names every path of a run directory once: ``results.json``,
``config.toml``, ``history.jsonl``, ``ledger.sqlite``, ``segments/``, ``audit/``,
``owner/``, ``parties/<name>/``, ``verifier/``, ``checkpoints/<name>/``, and for a
launched run ``deploy/``, ``certs/`` and ``logs/``. :func:`prepare_run_dir` and
:func:`discard_run` create and remove one; :class:`HistoryLog` writes its history.

``new_run_dir(root, mode)`` is ``root/<UTC %Y%m%d-%H%M%S>-<mode>`` (``-2``, ``-3``, ...
when two runs start in the same second), created exclusively so two processes never
share one. ``point_latest`` swaps the ``root/latest`` symlink for one to the new run in
one rename, so a reader never sees it missing; a real directory already at
``latest`` (the fixed default of earlier versions) is left alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clicooper.common.files import write_file
from clicooper.config import RunConfig

if TYPE_CHECKING:
    from clicooper.parties.data_owner import DataOwner
    from clicooper.privacy.activation import ActivationNoise
    from clicooper.runtime.driver import ProgressFn

RUNS_ROOT = Path("runs")
LATEST = "latest"

RESULTS_FILE = "results.json"
#: The run's effective settings, what ``--resume`` rebuilds the run from.
RUN_CONFIG = "config.toml"
HISTORY_FILE = "history.jsonl"
LEDGER_FILE = "ledger.sqlite"
REPORT_FILE = "report.md"
#: The owner's count of releases per training record (release once), owner/<this>.
RELEASES_FILE = "releases.safetensors"
RUN_ARTIFACTS = (
    RESULTS_FILE,
    RUN_CONFIG,
    HISTORY_FILE,
    REPORT_FILE,
    LEDGER_FILE,
    "segments",
    "audit",
    "owner",
    "parties",
    "verifier",
    "records",
    "figures",
    "checkpoints",
)
#: What ``clicooper launch`` (and ``run --pool``) adds: the parties' certificate bundles,
#: the session on its nodes and a launch's own pool, the node processes' logs.
LAUNCH_ARTIFACTS = ("certs", "deploy", "logs")


@dataclass(frozen=True)
class RunDir:
    """The paths of one run directory (DESIGN §10); nothing is created by naming one."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def results(self) -> Path:
        """``results.json``: written when a run finishes (so it marks a finished run)."""
        return self.root / RESULTS_FILE

    @property
    def config(self) -> Path:
        return self.root / RUN_CONFIG

    @property
    def history(self) -> Path:
        return self.root / HISTORY_FILE

    @property
    def ledger(self) -> Path:
        return self.root / LEDGER_FILE

    @property
    def report(self) -> Path:
        return self.root / REPORT_FILE

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    @property
    def segments(self) -> Path:
        """The trainers' final segments, ``<party>.safetensors``."""
        return self.root / "segments"

    def segment(self, party: str) -> Path:
        return self.segments / f"{party}.safetensors"

    @property
    def records(self) -> Path:
        return self.root / "records"

    @property
    def audit(self) -> Path:
        """The verifier's per-stage copies, ``<stage>/<party>.safetensors``."""
        return self.root / "audit"

    @property
    def owner(self) -> Path:
        """The data owner's head and secrets (mode 0700)."""
        return self.root / "owner"

    @property
    def parties(self) -> Path:
        return self.root / "parties"

    def party(self, name: str) -> Path:
        """A trainer's own directory: its watermark keys and secret, its release cache."""
        return self.parties / name

    @property
    def verifier(self) -> Path:
        """The verifier's key, anchor and secrets."""
        return self.root / "verifier"

    def checkpoints(self, party: str) -> Path:
        """A party's checkpoints: ``checkpoints/<party>``, the owner's (``do``) in ``owner/``."""
        if party == "do":
            return self.owner / "checkpoints"
        return self.root / "checkpoints" / party

    @property
    def deploy(self) -> Path:
        """A run on nodes: its session (``pool.json``); a launch's own pool and lock too."""
        return self.root / "deploy"

    @property
    def pool_mark(self) -> Path:
        """``deploy/pool.json``: the session of a run on nodes (``run --pool``, ``launch``):
        its id, owner and chain, what ``--resume`` continues."""
        return self.deploy / "pool.json"

    @property
    def launch_pool(self) -> Path:
        """``deploy/pool``: a launch's own one-session pool (``pool.toml``, node states)."""
        return self.deploy / "pool"

    @property
    def certs(self) -> Path:
        """A launched run's certificate bundles, one per party (``certs/<party>``)."""
        return self.root / "certs"

    @property
    def logs(self) -> Path:
        """A launched run's node processes' logs, ``<party>.log``."""
        return self.root / "logs"


def new_run_dir(root: Path, mode: str, now: float | None = None) -> Path:
    """Create and return a new, empty run directory under ``root``, named by UTC time and mode."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(time.time() if now is None else now))
    root.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        path = root / (f"{stamp}-{mode}" if n == 1 else f"{stamp}-{mode}-{n}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise ValueError(f"{root} already holds 999 runs named {stamp}-{mode}: pass --out DIR")


def point_latest(run_dir: Path) -> Path | None:
    """Point ``run_dir.parent/latest`` at ``run_dir``; None when a real directory is there."""
    latest = run_dir.parent / LATEST
    if latest.exists() and not latest.is_symlink():
        return None
    tmp = run_dir.parent / f".{LATEST}.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(run_dir.name, target_is_directory=True)
    os.replace(tmp, latest)
    return latest


class HistoryLog:
    """``history.jsonl``: one JSON line per finished epoch, on disk as each epoch ends.

    Each line holds epoch, train loss, train accuracy, test accuracy, the cumulative
    training seconds and the activation epsilon spent so far (None without noise). The
    file is rewritten whole through a temporary file and a rename, so an epoch that a
    recovery replays is never listed twice and a reader never sees half a line.
    """

    def __init__(
        self,
        path: Path,
        cfg: RunConfig,
        noise: ActivationNoise | None,
        progress: ProgressFn | None,
        owner: DataOwner | None = None,
    ) -> None:
        self.path, self.cfg, self.noise, self.owner = path, cfg, noise, owner
        self.progress = progress

    def __call__(self, history: list[dict[str, Any]]) -> None:
        lines = [
            json.dumps({**entry, "epsilon": self._epsilon(i + 1)})
            for i, entry in enumerate(history)
        ]
        write_file(self.path, "".join(line + "\n" for line in lines).encode(), 0o644)
        epoch_done = getattr(self.progress, "epoch_done", None)
        if epoch_done is not None:
            epoch_done(history[-1])

    def _epsilon(self, epochs: int) -> float | None:
        """Epsilon after ``epochs`` epochs: one release of every record per epoch, or one
        in all (release once, made before the first epoch)."""
        if self.noise is None:
            return None
        from clicooper.privacy import accounting  # torch: only once a run writes history

        p = self.cfg.privacy
        releases = accounting.planned_releases(p.release, epochs, False)
        return accounting.epsilon(self.noise.noise_multiplier, releases, p.delta, p.mechanism)


def discard_run(out_dir: Path) -> None:
    """Remove every run artifact in ``out_dir``, and ``out_dir`` itself once it is empty."""
    for name in RUN_ARTIFACTS:
        path = out_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    with contextlib.suppress(OSError):
        out_dir.rmdir()


def prepare_run_dir(
    out_dir: Path, overwrite: bool, artifacts: tuple[str, ...] = RUN_ARTIFACTS
) -> None:
    """Create ``out_dir``; refuse to mix two runs in one directory unless told to replace
    (then every one of ``artifacts`` there is removed)."""
    present = [name for name in artifacts if (out_dir / name).exists()]
    if present and not overwrite:
        raise ValueError(
            f"{out_dir} already holds a run ({present[0]}): choose another --out "
            "or pass --overwrite to replace it"
        )
    for name in present:
        path = out_dir / name
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


def prepare_launch_dir(out_dir: Path, overwrite: bool) -> None:
    """Like ``prepare_run_dir``, for the launch artifacts too."""
    prepare_run_dir(out_dir, overwrite, RUN_ARTIFACTS + LAUNCH_ARTIFACTS)
