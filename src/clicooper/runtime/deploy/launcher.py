"""``clicooper launch``: a one-session pool of its own on loopback, the data owner here.

A launch is the ``run --pool`` path on a private pool (:class:`LaunchPool`): a node
process per trainer and for the verifier, capacity 1, state under the run directory
(``deploy/pool``), brought up before the session and taken down after it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from clicooper.common.files import private_dir
from clicooper.config import RunConfig
from clicooper.node.owner import pool_resume, run_on_chain
from clicooper.node.pool import Pool, PoolNode, start_node, stop_nodes, wait_listening
from clicooper.node.processes import free_ports
from clicooper.node.server import SESSIONS_DIR
from clicooper.runtime.certs import create_certificates
from clicooper.runtime.deploy.peers import config_toml
from clicooper.runtime.device import party_devices
from clicooper.runtime.resume import resumable_config
from clicooper.runtime.rundirs import RunDir, prepare_launch_dir
from clicooper.runtime.session import resolve_run

log = logging.getLogger(__name__)


#: In ``deploy/``: locked by the process running a launch of the run directory.
LOCK_FILE = "launch.lock"


class LaunchPool:
    """A launch's own one-session pool: a node per trainer (``t1`` .. ``tn``) and one for the
    verifier (``verifier``), capacity 1, on 127.0.0.1, under a CA whose key is never written.

    The pool file and the nodes' state are in ``RUN/deploy/pool`` (``RunDir.launch_pool``),
    each node's bundle is ``RUN/certs/<party>`` (the only one its process is given) and its
    log ``RUN/logs/<party>.log``. Every node stops by itself once this process is gone
    (``node start --exit-with-parent``; its session stays active on its state, for
    ``launch --resume``), and a node that dies during the run is started again on its
    state (:meth:`supervise`), up to :attr:`MAX_RESTARTS` times.
    """

    MAX_RESTARTS = 3

    def __init__(self, out_dir: Path, cfg: RunConfig, send_timeout: float = 30.0) -> None:
        self.cfg, self.send_timeout = cfg, send_timeout
        # absolute: a node's command line names its state, which is how an orphan is known
        self.run_dir = RunDir(Path(out_dir).absolute())
        names = [f"t{i}" for i in range(1, cfg.trainers + 1)]
        if cfg.mode == "clicooper" and cfg.watermark.enabled:
            names.append("verifier")
        self.names = names
        self.pool = Pool(self.run_dir.launch_pool, {}, self.run_dir.certs, self.run_dir.logs)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.restarts = dict.fromkeys(names, 0)
        self._lock_fd: int | None = None

    @property
    def config_file(self) -> Path:
        """``deploy/config.toml``: the run's settings, whose ``[limits]`` and ``threads``
        every node takes (a session's other settings come with its admission)."""
        return self.run_dir.deploy / "config.toml"

    def bundle(self, name: str) -> Path:
        """``name``'s own certificate bundle: the only one its process is given."""
        return self.pool.bundle(name)

    def chain(self) -> dict[str, PoolNode]:
        """The session's chain: party ``p`` on node ``p``."""
        return {name: self.pool.nodes[name] for name in self.names}

    def up(self) -> None:
        """Certificates (one bundle per party and ``do``'s; the CA key is never written, so
        no one can issue itself another), the config file, every node, the pool file."""
        create_certificates(["do", *self.names], private_dir(self.run_dir.certs), keep_ca_key=False)
        self.run_dir.deploy.mkdir()
        self._lock()
        self.run_dir.logs.mkdir()
        self.config_file.write_text(config_toml(self.cfg))
        if RunConfig.load(self.config_file) != self.cfg:
            raise RuntimeError("the launch config does not read back equal (config_toml bug)")
        private_dir(self.pool.root)
        ports = free_ports(len(self.names))
        self._start_all(
            [
                PoolNode(
                    name, _role(name), f"127.0.0.1:{port}", 1, self.pool.root / "nodes" / name, 0
                )
                for name, port in zip(self.names, ports, strict=True)
            ]
        )

    def restart(self) -> None:
        """``launch --resume``: hold the run's lock, stop what an earlier launch of it left
        (:meth:`stop_orphans`), and start every node again on its state and address."""
        self._lock()
        try:
            pool = Pool.load(self.pool.root)
        except ValueError:
            raise ValueError(
                f"{self.run_dir.root} lacks its pool file: it cannot be resumed"
            ) from None
        self.stop_orphans(pool)
        for name in ["do", *self.names]:
            if not (self.bundle(name) / f"{name}.pem").is_file():
                raise ValueError(
                    f"{self.run_dir.root} lacks {name}'s certificate bundle (certs/{name}): "
                    "it cannot be resumed"
                )
        if sorted(pool.nodes) != sorted(self.names):
            raise ValueError(f"{pool.file} does not hold the run's parties: not resumed")
        self.run_dir.logs.mkdir(exist_ok=True)
        self._start_all([pool.nodes[name] for name in self.names])

    def stop_orphans(self, pool: Pool, grace: float = 5.0) -> list[str]:
        """Stop the nodes an earlier, dead launch of this run left; their names.

        A node stops by itself once its launching process is gone, but one busy with a
        step can take a while, and it must not write its state while the new process
        for it does. Only a process whose command line is that node's (``node start ...
        --state STATE``) is signalled: a pid reused by anything else is left alone.
        """
        stopped = stop_nodes(list(pool.nodes.values()), grace)
        if stopped:
            log.warning("stopped the nodes an earlier launch left: %s", ", ".join(stopped))
        return stopped

    def _start_all(self, nodes: list[PoolNode]) -> None:
        for node in nodes:
            self._start(node)
        for node in nodes:
            wait_listening(
                self.pool.nodes[node.name], self.procs[node.name], self.pool.log(node.name)
            )

    def _start(self, node: PoolNode) -> None:
        started, self.procs[node.name] = start_node(self.pool, node, *self.node_options(node.name))
        self.pool = self.pool.replace(started)
        self.pool.write()

    def node_options(self, name: str) -> list[str]:
        """A node's options past its bundle and state: its device, timeouts, limits, and
        to stop when this process is gone."""
        device = self.cfg.devices.get(name, self.cfg.device) if name != "verifier" else "cpu"
        return [
            "--device", device, "--send-timeout", str(self.send_timeout),
            "--config", str(self.config_file), "--exit-with-parent", str(os.getpid()),
        ]  # fmt: skip

    def watch(self) -> None:
        """ConnectionError when a node process has exited (so the owner recovers at once)."""
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise ConnectionError(f"{name} exited with status {proc.returncode}")

    def supervise(self) -> None:
        """Start a node that died again on its state (called while the owner waits for it):
        it serves the session again from its checkpoints."""
        for name, proc in list(self.procs.items()):
            if proc.poll() is None:
                continue
            if self.restarts[name] >= self.MAX_RESTARTS:
                path = self.pool.log(name)
                tail = path.read_text(errors="replace").strip().splitlines()[-1:]
                raise RuntimeError(
                    f"{name} exited {self.restarts[name] + 1} times (last status "
                    f"{proc.returncode}): {' '.join(tail)} (log: {path})"
                )
            self.restarts[name] += 1
            log.warning("%s exited with %s; starting it again", name, proc.returncode)
            self._start(self.pool.nodes[name])

    def hooks(self, step_timeout: float, resume_timeout: float) -> dict[str, Any]:
        """The owner's deployment settings for this pool: timeouts, supervision."""
        return {
            "send_timeout": self.send_timeout,
            "step_timeout": step_timeout,
            "resume_timeout": resume_timeout,
            "supervise": self.supervise,
            "watch": self.watch,
        }

    def down(self, grace: float = 10.0) -> None:
        """SIGTERM every node (it stops serving; a session not finished stays active on its
        state), SIGKILL of its group after ``grace`` s; then release the run's lock."""
        stop_nodes(list(self.pool.nodes.values()), grace)
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5.0)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _lock(self) -> None:
        """Hold ``deploy/launch.lock`` while this process runs the launch (the kernel drops
        it when the process dies, kill -9 included): two launches of one run directory
        would serve the same nodes' state."""
        import fcntl

        fd = os.open(self.run_dir.deploy / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ValueError(
                f"{self.run_dir.root} is being run by another `clicooper launch` (see "
                f"{self.pool.file}): wait for it to end or stop it"
            ) from None
        self._lock_fd = fd


def _role(name: str) -> str:
    return "verifier" if name == "verifier" else "trainer"


def session_dir(out_dir: Path, party: str) -> RunDir | None:
    """Where ``party``'s node keeps the launched run's session (segment, keys, checkpoints,
    release caches; the ledger and audit copies for the verifier), while it runs; None
    before the session is admitted. Once it ends they are copied into ``out_dir``."""
    run_dir = RunDir(out_dir)
    try:
        session = json.loads(run_dir.pool_mark.read_text())["session"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return RunDir(run_dir.launch_pool / "nodes" / party / SESSIONS_DIR / session)


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP raise KeyboardInterrupt so cleanup always runs; the
    first one does, and any further one is ignored until the cleanup is over (a second
    Ctrl-C must not leave nodes running).

    SIGINT too: a shell without job control starts background commands with SIGINT
    ignored, and Python then keeps it ignored, so `clicooper launch ... &` in a script
    (or a CI job started that way) ignored Ctrl-C and `kill -INT` for good.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def interrupt(signum: int, frame: object) -> None:
        for sig in signals:  # the cleanup that follows is not itself interrupted
            signal.signal(sig, signal.SIG_IGN)
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {s: signal.signal(s, interrupt) for s in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def launch(
    cfg: RunConfig | None,
    out_dir: Path | str,
    data: Any = None,
    progress: Any = None,
    overwrite: bool = False,
    *,
    send_timeout: float = 30.0,
    step_timeout: float = 120.0,
    resume_timeout: float = 120.0,
    resume: bool = False,
) -> Any:
    """Run a whole session on a pool of its own: a node per trainer and the verifier.

    Fresh certificates go to ``out_dir/certs``, one bundle per party (each node process
    is given only its own; the CA key is not kept); every node listens on a free port of
    127.0.0.1 with capacity 1; the owner runs here and its session is admitted and run
    on the nodes exactly as ``run --pool`` does (:func:`clicooper.node.owner.run_on_chain`).
    Every node is stopped on return, on an error, on Ctrl-C, SIGTERM or SIGHUP, and each
    also stops by itself if this process dies.

    ``resume``: continue the unfinished launched run in ``out_dir`` whose owner process
    died (``cfg`` is not used: the run's own ``config.toml`` is): the nodes the dead
    launch left are stopped, every node starts again on its state, with the run's bundles
    and addresses, and the session goes on from the last checkpoint common to all parties
    as ``run --resume`` continues a ``run --pool`` run (:func:`clicooper.node.owner.pool_resume`).
    """
    out_dir = Path(out_dir)
    if resume:
        cfg = resumable_config(out_dir, launched=True)
    elif cfg is None:
        raise ValueError("launch needs a config (or resume=True)")
    else:  # the nodes are admitted with the resolved release, model and lr
        cfg, data = resolve_run(cfg, data)
    cfg = cfg.model_copy(update={"transport": "grpc"})
    party_devices(cfg, [f"t{i}" for i in range(1, cfg.trainers + 1)])  # all on this machine
    if not resume:
        prepare_launch_dir(out_dir, overwrite)
    nodes = LaunchPool(out_dir, cfg, send_timeout)
    grace = 5.0  # on an error or an interrupt the nodes are stopped at once
    args = {"data": data, "progress": progress, "abort_on_failure": False,
            "hooks": nodes.hooks(step_timeout, resume_timeout)}  # fmt: skip
    with _signals_raise():
        try:
            if resume:
                nodes.restart()
                session = pool_resume(cfg, out_dir, **args)
            else:
                nodes.up()
                owner = nodes.bundle("do")
                session = run_on_chain(nodes.pool, nodes.chain(), cfg, out_dir, owner, **args)
            session.results["transport"]["restarts"] = dict(nodes.restarts)
            RunDir(out_dir).results.write_text(json.dumps(session.results, indent=2))
            grace = 10.0  # the session is over: each node gets 10 s after SIGTERM to stop
            return session
        finally:
            nodes.down(grace)
