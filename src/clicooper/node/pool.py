"""A pool: trainer nodes and a verifier node under one CA (``clicooper pool``, ``run --pool``).

``pool up`` makes a fresh CA (its key stays in ``POOL/certs/ca``: owners' certificates
are issued from it), one bundle per node, starts every node as its own long-running
process on 127.0.0.1 (``clicooper node start``, state in ``POOL/nodes/<node>``, log in
``POOL/logs/<node>.log``) and writes ``POOL/pool.toml``: every node's role, address,
capacity, state directory and process id. ``pool down`` stops exactly those processes;
``pool status`` shows each node and its sessions.

``run --pool POOL/pool.toml`` runs one owner's session on the pool's nodes
(:mod:`clicooper.node.owner`; :func:`pick_chain` picks its chain); ``clicooper launch``
runs one on a one-session pool of its own (:class:`clicooper.runtime.deploy.launcher.LaunchPool`).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clicooper.common.files import private_dir, write_file
from clicooper.config import RunConfig
from clicooper.node.processes import free_ports, spawn
from clicooper.node.state import HOLDING, SqliteState
from clicooper.runtime.certs import create_certificates

# The owner's side (clicooper.node.owner) imports torch and gRPC; this module does not, so
# `pool status` and `pool down` start in a fraction of a second.

POOL_FILE = "pool.toml"
VERIFIER = "verifier-1"
#: Seconds ``pool up`` waits for a node to listen.
START_TIMEOUT = 120.0


@dataclass(frozen=True)
class PoolNode:
    """One node of a pool, as ``pool.toml`` records it (paths relative to the pool)."""

    name: str
    role: str
    address: str
    capacity: int
    state: Path
    pid: int

    def running(self) -> bool:
        """Whether the process ``up`` started for this node is still this node's."""
        return _is_node_process(self.pid, self.state)

    def available(self) -> bool:
        """Running, or not one of ``pool up``'s processes (pid 0: started by other means)."""
        return self.pid == 0 or self.running()

    def sessions(self) -> list[dict[str, Any]]:
        try:
            store = SqliteState(self.state, readonly=True)
        except ValueError:
            return []
        try:
            return [r.summary() for r in store.sessions()]
        finally:
            store.close()


@dataclass(frozen=True)
class Pool:
    """A pool's directory and its nodes; its bundles (``certs/<node>``) and logs
    (``logs/<node>.log``) are in the pool's directory unless ``certs_dir`` and ``logs_dir``
    say otherwise (a launch's pool: the run directory's ``certs/`` and ``logs/``)."""

    root: Path
    nodes: dict[str, PoolNode]
    certs_dir: Path | None = None
    logs_dir: Path | None = None

    @property
    def certs(self) -> Path:
        return self.certs_dir or self.root / "certs"

    @property
    def logs(self) -> Path:
        return self.logs_dir or self.root / "logs"

    @property
    def ca(self) -> Path:
        return self.certs / "ca"

    @property
    def file(self) -> Path:
        return self.root / POOL_FILE

    def bundle(self, name: str) -> Path:
        """Node ``name``'s own bundle: the only one its process is given."""
        return self.certs / name

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def replace(self, node: PoolNode) -> Pool:
        """This pool with ``node`` in place of the node of its name."""
        return Pool(self.root, {**self.nodes, node.name: node}, self.certs_dir, self.logs_dir)

    def trainers(self) -> list[PoolNode]:
        return [n for n in self.nodes.values() if n.role == "trainer"]

    @classmethod
    def load(cls, path: Path) -> Pool:
        """The pool of ``path`` (its directory or its pool.toml); ValueError if it is none."""
        path = Path(path)
        file = path / POOL_FILE if path.is_dir() else path
        try:
            doc = tomllib.loads(file.read_text())
        except FileNotFoundError:
            raise ValueError(
                f"{file} does not exist: start a pool with `clicooper pool up`"
            ) from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{file} is not a pool file: {exc}") from None
        root = file.parent
        try:
            nodes = {
                name: PoolNode(
                    name,
                    n["role"],
                    n["address"],
                    int(n["capacity"]),
                    root / n["state"],
                    int(n["pid"]),
                )  # fmt: skip
                for name, n in doc["nodes"].items()
            }
        except (KeyError, TypeError, ValueError, AttributeError):
            raise ValueError(f"{file} is not a pool file: [nodes.<name>] tables expected") from None
        dirs = {
            k: root / doc[k] if isinstance(doc.get(k), str) else None for k in ("certs", "logs")
        }
        return cls(root, nodes, dirs["certs"], dirs["logs"])

    def write(self) -> Path:
        lines = ["# written by `clicooper pool up` or `launch`; `pool down` stops these processes"]
        for key, path in (("certs", self.certs_dir), ("logs", self.logs_dir)):
            if path is not None:
                lines.append(f"{key} = {json.dumps(os.path.relpath(path, self.root))}")
        for n in self.nodes.values():
            lines += [
                "",
                f"[nodes.{n.name}]",
                f"role = {json.dumps(n.role)}",
                f"address = {json.dumps(n.address)}",
                f"capacity = {n.capacity}",
                f"state = {json.dumps(str(n.state.relative_to(self.root)))}",
                f"pid = {n.pid}",
            ]
        return write_file(self.root / POOL_FILE, ("\n".join(lines) + "\n").encode(), 0o644)


def pool_up(root: Path, trainers: int, capacity: int = 4) -> Pool:
    """Start ``trainers`` trainer nodes and one verifier node on 127.0.0.1 (fresh CA)."""
    if not 1 <= trainers <= 16:
        raise ValueError(f"--trainers must be 1 .. 16, got {trainers}")
    if capacity < 1:
        raise ValueError(f"--capacity must be at least 1, got {capacity}")
    root = Path(root)
    if (root / POOL_FILE).exists():
        raise ValueError(
            f"{root} holds a pool already ({POOL_FILE}): choose another --dir (a pool that is "
            "down may be deleted)"
        )
    names = [f"trainer-{i}" for i in range(1, trainers + 1)] + [VERIFIER]
    private_dir(root)
    create_certificates(names, root / "certs")
    private_dir(root / "logs")
    ports = free_ports(len(names))
    pool = Pool(root, {})
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name, port in zip(names, ports, strict=True):
            role = "verifier" if name == VERIFIER else "trainer"
            node = PoolNode(name, role, f"127.0.0.1:{port}", capacity, root / "nodes" / name, 0)
            node, procs[name] = start_node(pool, node)
            pool = pool.replace(node)
        for node in pool.nodes.values():
            wait_listening(node, procs[node.name], pool.log(node.name))
    except BaseException:
        stop_nodes(list(pool.nodes.values()))
        raise
    pool.write()
    return pool


def restart_node(pool: Pool, name: str) -> PoolNode:
    """Start node ``name`` of ``pool`` again (after it died) with the same state, address
    and certificate; ``pool.toml`` records its new process."""
    node = pool.nodes.get(name)
    if node is None:
        raise ValueError(f"the pool has no node {name!r}: it has {', '.join(pool.nodes)}")
    if node.running():
        raise ValueError(f"{name} is running (pid {node.pid}): `pool down` stops it")
    node, proc = start_node(pool, node)
    wait_listening(node, proc, pool.log(name))
    pool.replace(node).write()
    return node


def node_argv(pool: Pool, node: PoolNode, *extra: str) -> list[str]:
    """The command line of ``node``'s process: ``clicooper node start`` with its own bundle
    only, then ``extra`` options."""
    return [
        sys.executable, "-m", "clicooper.cli", "node", "start", node.role,
        "--listen", node.address, "--state", str(node.state),
        "--certs", str(pool.bundle(node.name)), "--capacity", str(node.capacity), *extra,
    ]  # fmt: skip


def start_node(pool: Pool, node: PoolNode, *extra: str) -> tuple[PoolNode, subprocess.Popen[bytes]]:
    """``node``'s process (:func:`node_argv`); the node with its pid, and the process."""
    proc = spawn(node_argv(pool, node, *extra), pool.log(node.name))
    started = PoolNode(node.name, node.role, node.address, node.capacity, node.state, proc.pid)
    return started, proc


def pool_down(pool: Pool, grace: float = 10.0) -> list[str]:
    """Stop every node process of ``pool`` (SIGTERM, then SIGKILL); the nodes stopped."""
    return stop_nodes(list(pool.nodes.values()), grace)


def pick_chain(pool: Pool, cfg: RunConfig) -> dict[str, PoolNode]:
    """t1 .. tn on the least busy running trainers (fewest sessions held), and the verifier."""
    trainers = [n for n in pool.trainers() if n.available()]
    if len(trainers) < cfg.trainers:
        raise ValueError(
            f"the run needs {cfg.trainers} trainers and the pool has {len(trainers)} running: "
            "pass --trainers or start a larger pool"
        )
    busy = {n.name: sum(s["state"] in HOLDING for s in n.sessions()) for n in trainers}
    trainers.sort(key=lambda n: (busy[n.name] / n.capacity, secrets.randbelow(1 << 16)))
    chain = {f"t{i}": n for i, n in enumerate(trainers[: cfg.trainers], start=1)}
    if cfg.mode == "clicooper" and cfg.watermark.enabled:
        verifier = pool.nodes.get(VERIFIER)
        if verifier is None or not verifier.available():
            raise ValueError(f"the pool's verifier node is not running (see {pool.root}/logs)")
        chain["verifier"] = verifier
    return chain


def wait_listening(node: PoolNode, proc: subprocess.Popen[bytes], log: Path) -> None:
    host, port = node.address.rsplit(":", 1)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() else []
            raise RuntimeError(f"{node.name} exited at start: {' '.join(tail)} (log: {log})")
        with contextlib.suppress(OSError), socket.create_connection((host, int(port)), 0.5):
            return
        time.sleep(0.2)
    raise RuntimeError(f"{node.name} did not listen on {node.address} within {START_TIMEOUT} s")


def stop_nodes(nodes: list[PoolNode], grace: float = 10.0) -> list[str]:
    alive = [n for n in nodes if n.running()]
    stopped = [n.name for n in alive]
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        for node in alive:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(node.pid, sig)
        deadline = time.monotonic() + wait
        while alive and time.monotonic() < deadline:
            time.sleep(0.1)
            alive = [n for n in alive if _exists(n.pid)]  # an exiting one has no cmdline
        if not alive:
            break
    for node in nodes:  # reap our own children (pool up's error path)
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(node.pid, os.WNOHANG)
    return stopped


def _exists(pid: int) -> bool:
    """Whether ``pid`` is a process that has not exited (a zombie has)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _is_node_process(pid: int, state: Path) -> bool:
    """Whether ``pid`` is a live ``clicooper node start ... --state STATE`` (Linux /proc):
    a pid reused by anything else is never signalled."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        status = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    if status == "Z" or "node" not in args or "start" not in args or "--state" not in args:
        return False
    return args[args.index("--state") + 1] == str(state)
