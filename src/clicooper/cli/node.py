"""``clicooper node start`` and ``node status``: a long-running trainer or verifier node."""

from __future__ import annotations

import json
import logging
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from clicooper.cli.app import Opt, app, fail
from clicooper.cli.progress import console

if TYPE_CHECKING:
    from clicooper.node.pool import Pool, PoolNode

node_app = typer.Typer(
    no_args_is_help=True, help="Trainer and verifier nodes that serve many sessions at once."
)
app.add_typer(node_app, name="node")
pool_app = typer.Typer(
    no_args_is_help=True, help="A pool: trainer nodes and a verifier node under one CA."
)
app.add_typer(pool_app, name="pool")


@node_app.command("start")
def start(
    role: Annotated[str, typer.Argument(help="trainer or verifier")],
    listen: Annotated[str, Opt(help="HOST:PORT the node listens on")],
    state: Annotated[Path, Opt(help="the node's state directory (sessions, node.sqlite)")],
    certs: Annotated[Path, Opt(help="the node's own bundle (OUT/<name> of `certs init`)")],
    capacity: Annotated[int, Opt(help="sessions the node serves at once")] = 4,
    name: Annotated[
        str | None, Opt(help="the node's name (its certificate's); default: the bundle's folder")
    ] = None,
    device: Annotated[str, Opt(help="device of every session: cpu, cuda[:N], mps")] = "cpu",
    send_timeout: Annotated[float, Opt(help="seconds one delivery may take")] = 30.0,
    session_idle: Annotated[
        float, Opt(help="seconds without a message after which a session's owner is gone")
    ] = 900.0,
    config: Annotated[
        Path | None, Opt(help="TOML whose [limits] and threads the node takes (a run's config)")
    ] = None,
    exit_with_parent: Annotated[
        int | None, Opt(hidden=True, help="stop when this parent process is gone (launch)")
    ] = None,
) -> None:
    """Serve sessions until SIGTERM or Ctrl-C (active ones are served again on a restart)."""
    from clicooper.config import RunConfig
    from clicooper.node.server import Node

    if role not in ("trainer", "verifier"):
        fail(f"unknown role {role!r}: node start trainer or verifier")
    if capacity < 1:
        fail(f"--capacity must be at least 1, got {capacity}")
    try:
        settings = RunConfig.load(config) if config is not None else None
    except (ValueError, OSError) as exc:
        fail(str(exc).splitlines()[0])
    try:
        node = Node(
            role,
            name or certs.name,
            listen,
            certs,
            state,
            capacity,
            device=device,
            send_timeout=send_timeout,
            session_idle_s=session_idle,
            limits=settings.limits if settings is not None else None,
        )
    except (ValueError, OSError) as exc:
        fail(str(exc).splitlines()[0])
    import torch

    torch.set_num_threads(settings.threads if settings is not None else 1)
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # compiler stack: imported now
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {node.name} %(message)s")
    signal.signal(signal.SIGTERM, lambda *_: node.request_stop())
    try:
        node.start()
    except OSError as exc:
        node.state.close()
        fail(str(exc).splitlines()[0])
    console.print(f"{node.name}: {role} node on {node.listen}, capacity {capacity}")
    if exit_with_parent is not None:
        node.exit_with_parent(exit_with_parent)
    try:
        node.wait()
    except KeyboardInterrupt:
        console.print("interrupted")
    finally:
        node.stop()


@node_app.command("status")
def status(
    state: Annotated[Path, Opt(help="the node's state directory (--state of `node start`)")],
    as_json: Annotated[bool, Opt("--json", help="one JSON object per line")] = False,
) -> None:
    """List the node's sessions and their state (read beside a running node)."""
    from clicooper.node.state import SqliteState

    try:
        store = SqliteState(state, readonly=True)
        sessions = [r.summary() for r in store.sessions()]
        store.close()
    except (ValueError, OSError) as exc:
        fail(str(exc).splitlines()[0])
    except Exception as exc:  # sqlite3.DatabaseError: not a node's state file
        fail(f"{state} holds no readable node state: {' '.join(str(exc).split())}")
    if as_json:
        for entry in sessions:
            print(json.dumps(entry))
        return
    if not sessions:
        console.print(f"{state}: no sessions")
    for s in sessions:
        reason = f"  ({s['reason']})" if s["reason"] else ""
        console.print(f"{s['session']}  {s['party']:<8} {s['state']:<9} {s['owner']}{reason}")


@pool_app.command("up")
def pool_up(
    trainers: Annotated[int, Opt(help="trainer nodes to start")],
    dir: Annotated[Path, Opt(help="the pool's directory (certs, node states, logs, pool.toml)")],
    capacity: Annotated[int, Opt(help="sessions each node serves at once")] = 4,
) -> None:
    """Start N trainer nodes and one verifier node on 127.0.0.1 with a fresh CA."""
    from clicooper.node import pool

    try:
        started = pool.pool_up(dir, trainers, capacity)
    except (ValueError, OSError, RuntimeError) as exc:
        fail(str(exc).splitlines()[0])
    for node in started.nodes.values():
        _print_started(node)
    console.print(f"pool file: {dir / pool.POOL_FILE}  (`clicooper run --pool` it)")


@pool_app.command("status")
def pool_status(
    pool_dir: Annotated[Path, typer.Argument(help="the pool's directory (or its pool.toml)")],
) -> None:
    """Every node of the pool, whether it runs, and its sessions."""
    for node in _load_pool(pool_dir).nodes.values():
        running = "running" if node.running() else "stopped"
        console.print(f"{node.name}  {node.role:<8} {node.address}  {running} (pid {node.pid})")
        for s in node.sessions():
            console.print(f"    {s['session']}  {s['party']:<8} {s['state']:<9} {s['owner']}")


@pool_app.command("down")
def pool_down(
    pool_dir: Annotated[Path, typer.Argument(help="the pool's directory (or its pool.toml)")],
) -> None:
    """Stop every node process that `pool up` started."""
    from clicooper.node import pool

    stopped = pool.pool_down(_load_pool(pool_dir))
    console.print(f"stopped: {', '.join(stopped) or 'nothing was running'}")


@pool_app.command("restart")
def pool_restart(
    pool_dir: Annotated[Path, typer.Argument(help="the pool's directory (or its pool.toml)")],
    name: Annotated[str, typer.Argument(help="the node to start again, e.g. trainer-1")],
) -> None:
    """Start a node that died again, on its own state: it serves its active sessions again."""
    from clicooper.node import pool

    loaded = _load_pool(pool_dir)
    try:
        node = pool.restart_node(loaded, name)
    except (ValueError, OSError, RuntimeError) as exc:
        fail(str(exc).splitlines()[0])
    _print_started(node)


def _load_pool(pool_dir: Path) -> Pool:
    """The pool of ``pool_dir`` (or its pool.toml); a one-line exit 2 if it is not one."""
    from clicooper.node.pool import Pool

    try:
        return Pool.load(pool_dir)
    except ValueError as exc:
        fail(str(exc).splitlines()[0])


def _print_started(node: PoolNode) -> None:
    console.print(f"  {node.name}: {node.role} on {node.address} (pid {node.pid})")
