"""Where runs go: a fresh directory per run unless one is named, and ``runs/latest``.

``new_run_dir(root, mode)`` is ``root/<UTC %Y%m%d-%H%M%S>-<mode>`` (``-2``, ``-3``, ...
when two runs start in the same second), created exclusively so two processes never
share one. ``point_latest`` swaps the ``root/latest`` symlink for one to the new run in
one rename, so a reader never sees it missing; a real directory already at
``latest`` (the fixed default of earlier versions) is left alone.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

RUNS_ROOT = Path("runs")
LATEST = "latest"


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
