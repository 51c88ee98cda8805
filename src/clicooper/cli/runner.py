"""What ``clicooper run`` calls to train: in-process, over gRPC to served parties, or a launch.

``clicooper launch`` runs the ``run`` command with :data:`LAUNCH_TIMEOUTS` set, so both
commands share one flag set and one code path.
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clicooper.cli.app import fail
from clicooper.config import RunConfig

#: Timeouts of a ``launch`` in progress (None: an ordinary ``run``).
LAUNCH_TIMEOUTS: contextvars.ContextVar[dict[str, float] | None] = contextvars.ContextVar(
    "launch", default=None
)


def launching() -> bool:
    """Whether ``clicooper run`` is running for ``clicooper launch``."""
    return LAUNCH_TIMEOUTS.get() is not None


def session_runner(
    cfg: RunConfig,
    peers: Path | None,
    certs: Path | None,
    resume: bool = False,
    pool: Path | None = None,
) -> Callable[..., Any]:
    """What ``clicooper run`` calls: in-process, over gRPC to served parties, on a pool's
    nodes, or a launch (``resume``: continue an in-process run, or a launched one under
    ``launch``)."""
    from clicooper.runtime.deploy.launcher import launch
    from clicooper.runtime.deploy.peers import Deployment, peers_timeouts
    from clicooper.runtime.session import run

    if pool is not None:  # --certs: the owner's own bundle from the pool's operator
        if peers or resume:
            fail("--pool takes neither --peers nor --resume")
        from clicooper.node.owner import pool_run

        return functools.partial(pool_run, pool, owner_certs=certs)
    timeouts = LAUNCH_TIMEOUTS.get()
    if timeouts is not None:
        return functools.partial(launch, resume=resume, **timeouts)
    if resume:
        return _resume
    if cfg.transport == "inprocess":
        if peers or certs:
            fail("--peers and --certs need --transport grpc")
        return run
    if peers is None or certs is None:
        fail("--transport grpc needs --peers FILE and --certs DIR (or use `clicooper launch`)")
    try:
        deployment = Deployment.from_file(peers, certs, **peers_timeouts(peers))
    except (ValueError, OSError) as exc:
        fail(str(exc).splitlines()[0])
    return functools.partial(run, deployment=deployment)


def _resume(cfg: RunConfig, out_dir: Path, **kwargs: Any) -> Any:
    """``run --resume``: an in-process run, or a ``run --pool`` run on its pool's nodes."""
    from clicooper.node.owner import pool_resume
    from clicooper.runtime.resume import POOL_MARK
    from clicooper.runtime.session import run

    if (Path(out_dir) / POOL_MARK).is_file():
        return pool_resume(cfg, out_dir, **kwargs)
    return run(cfg, out_dir, resume=True, **kwargs)
