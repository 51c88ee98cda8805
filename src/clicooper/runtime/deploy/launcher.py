"""``clicooper launch``: every party its own process on loopback, the data owner here."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clicooper.common.files import private_dir
from clicooper.config import RunConfig
from clicooper.runtime.certs import create_certificates
from clicooper.runtime.deploy.peers import Deployment, config_toml, write_peers
from clicooper.runtime.deploy.settings import party_settings
from clicooper.runtime.device import party_devices
from clicooper.runtime.resume import resumable_config
from clicooper.runtime.rundirs import LAUNCH_ARTIFACTS, RunDir, prepare_run_dir
from clicooper.runtime.session import resolve_run, run

log = logging.getLogger(__name__)
#: The source tree this package is imported from (``src``), put on each child's PYTHONPATH.
_SOURCE_ROOT = Path(__file__).resolve().parents[3]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (bound, read, released)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


#: In ``deploy/``: locked by the process running a launch of the run directory.
LOCK_FILE = "launch.lock"


@dataclass
class Child:
    """A party process started by :class:`Launcher`."""

    name: str
    argv: list[str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0


class Launcher:
    """Starts, supervises and always stops the trainer and verifier processes of a run."""

    MAX_RESTARTS = 3

    def __init__(self, out_dir: Path, cfg: RunConfig, send_timeout: float = 30.0) -> None:
        self.out_dir, self.cfg = out_dir, cfg
        names = [f"t{i}" for i in range(1, cfg.trainers + 1)]
        if cfg.mode == "clicooper" and cfg.watermark.enabled:
            names.append("verifier")
        self.names = names
        self.session = os.urandom(8).hex()
        ports = free_ports(len(names) + 1)
        self.peers = {p: f"127.0.0.1:{port}" for p, port in zip(["do", *names], ports, strict=True)}
        self.run_dir = RunDir(out_dir)
        self.certs_dir = self.run_dir.certs
        self.deploy_dir = self.run_dir.deploy
        self.send_timeout = send_timeout
        self.children: dict[str, Child] = {}
        self._lock_fd: int | None = None

    def bundle(self, name: str) -> Path:
        """``name``'s own certificate bundle: the only one its process is given."""
        return self.certs_dir / name

    def prepare(self, resume: bool = False) -> None:
        """Certificates (one bundle per party), peers file, config file, log directory.

        The session CA's key is never written: every bundle is issued here at
        once, so no party, nor anything left in the run directory, can issue
        itself another certificate. ``resume``: the run's own bundles, config file
        and logs are kept (a new session id and new ports go to the peers file),
        once no process of the earlier launch is left (:meth:`stop_orphans`).
        """
        if resume:
            self._lock()
            self.stop_orphans()
            self._check_resumable()
        else:
            create_certificates(["do", *self.names], private_dir(self.certs_dir), keep_ca_key=False)
            self.deploy_dir.mkdir()
            self._lock()
            self.run_dir.logs.mkdir()
        write_peers(self.deploy_dir / "peers.toml", self.session, self.peers)
        if resume:
            return
        config_file = self.deploy_dir / "config.toml"
        config_file.write_text(config_toml(self.cfg))
        if RunConfig.load(config_file) != self.cfg:
            raise RuntimeError("the launch config does not read back equal (config_toml bug)")

    def _check_resumable(self) -> None:
        """ValueError unless every party's bundle and the parties' config file are here."""
        for name in ["do", *self.names]:
            if not (self.bundle(name) / f"{name}.pem").is_file():
                raise ValueError(
                    f"{self.out_dir} lacks {name}'s certificate bundle (certs/{name}): "
                    "it cannot be resumed"
                )
        config_file = self.deploy_dir / "config.toml"
        try:
            shared = RunConfig.load(config_file)
        except (OSError, ValueError) as exc:
            raise ValueError(f"{config_file}: {str(exc).splitlines()[0]}") from None
        for role in {"verifier" if n == "verifier" else "trainer" for n in self.names}:
            if party_settings(shared, role) != party_settings(self.cfg, role):
                raise ValueError(f"{config_file} differs from the run's config.toml: not resumed")
        self.run_dir.logs.mkdir(exist_ok=True)

    def _lock(self) -> None:
        """Hold ``deploy/launch.lock`` while this process runs the launch (the kernel drops
        it when the process dies, kill -9 included): two launches of one run directory
        would write the same party directories."""
        import fcntl

        fd = os.open(self.deploy_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ValueError(
                f"{self.out_dir} is being run by another `clicooper launch` (see "
                f"{self.deploy_dir / 'pids.json'}): wait for it to end or stop it"
            ) from None
        self._lock_fd = fd

    def stop_orphans(self, grace: float = 5.0) -> list[int]:
        """Stop the party processes an earlier, dead launch of this run left; their pids.

        A child exits by itself once its launching process is gone (``serve
        --exit-with-parent``), but one busy sending to the dead owner can take up to
        its send timeout to notice, and it must not write its party directory while
        the new process for that party does. Only a process whose command line is
        that of a child of the recorded launcher (``serve ... --exit-with-parent
        PID``) is signalled: a pid reused by anything else is left alone. Each gets
        ``grace`` s, then SIGTERM, then SIGKILL of its process group.
        """
        path = self.deploy_dir / "pids.json"
        try:
            recorded = json.loads(path.read_text())
        except (OSError, ValueError):
            return []
        launcher = recorded.pop("launcher", None)
        orphans = [
            pid for pid in recorded.values() if isinstance(pid, int) and _is_child_of(pid, launcher)
        ]
        for sig, wait in ((None, grace), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            alive = [pid for pid in orphans if _is_child_of(pid, launcher)]
            for pid in alive if sig is not None else ():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, sig)
            deadline = time.monotonic() + wait
            while alive and time.monotonic() < deadline:
                time.sleep(0.1)
                alive = [pid for pid in alive if _is_child_of(pid, launcher)]
            if not alive:
                break
        if orphans:
            log.warning("stopped the party processes an earlier launch left: %s", orphans)
        return orphans

    def argv(self, name: str) -> list[str]:
        role = "verifier" if name == "verifier" else "trainer"
        return [
            sys.executable,
            "-m",
            "clicooper.cli",
            "serve",
            role,
            "--name",
            name,
            "--config",
            str(self.deploy_dir / "config.toml"),
            "--listen",
            self.peers[name],
            "--certs",
            str(self.bundle(name)),
            "--peers",
            str(self.deploy_dir / "peers.toml"),
            "--out",
            str(self.out_dir),
            "--send-timeout",
            str(self.send_timeout),
            "--exit-with-parent",
            str(os.getpid()),
        ]

    def start(self) -> None:
        for name in self.names:
            child = Child(name, self.argv(name), self.run_dir.logs / f"{name}.log")
            self.children[name] = child
            self._spawn(child)

    def _spawn(self, child: Child) -> None:
        child.proc = spawn(child.argv, child.log_path)
        self._write_pids()

    def _write_pids(self) -> None:
        pids = {n: c.proc.pid for n, c in self.children.items() if c.proc is not None}
        (self.deploy_dir / "pids.json").write_text(json.dumps({"launcher": os.getpid(), **pids}))

    def watch(self) -> None:
        """ConnectionError when a party process has exited (so the owner recovers at once)."""
        for child in self.children.values():
            if child.proc is not None and child.proc.poll() is not None:
                raise ConnectionError(f"{child.name} exited with status {child.proc.returncode}")

    def supervise(self) -> None:
        """Restart a party process that died (called while the data owner waits for it)."""
        for child in self.children.values():
            if child.proc is None or child.proc.poll() is None:
                continue
            if child.restarts >= self.MAX_RESTARTS:
                tail = child.log_path.read_text(errors="replace").strip().splitlines()[-1:]
                raise RuntimeError(
                    f"{child.name} exited {child.restarts + 1} times (last status "
                    f"{child.proc.returncode}): {' '.join(tail)} (log: {child.log_path})"
                )
            child.restarts += 1
            log.warning("%s exited with %s; restarting it", child.name, child.proc.returncode)
            self._spawn(child)

    def deployment(self, step_timeout: float, resume_timeout: float) -> Deployment:
        return Deployment(
            self.peers,
            self.session,
            self.bundle("do"),
            send_timeout=self.send_timeout,
            step_timeout=step_timeout,
            resume_timeout=resume_timeout,
            supervise=self.supervise,
            watch=self.watch,
        )

    def stop(self, grace: float = 10.0) -> None:
        """Wait ``grace`` s for every child to exit, then SIGTERM, then SIGKILL its group;
        then release the run directory's lock."""
        procs = [c.proc for c in self.children.values() if c.proc is not None]
        _wait_all(procs, grace)
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            alive = [p for p in procs if p.poll() is None]
            for proc in alive:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
            _wait_all(alive, wait)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def spawn(argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start ``argv`` in its own process group (stopped as a whole), output to ``log_path``,
    with this source tree first on its PYTHONPATH."""
    env = dict(os.environ)
    src = str(_SOURCE_ROOT)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    with open(log_path, "ab") as log_file:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


def _is_child_of(pid: int, launcher: object) -> bool:
    """Whether ``pid`` is a live ``clicooper serve`` process that ``launcher`` started
    (its command line ends the way :meth:`Launcher.argv` writes it; Linux /proc)."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    tail = ["--exit-with-parent", str(launcher)]
    return state != "Z" and "serve" in args and args[-3:-1] == tail


def _wait_all(procs: list[subprocess.Popen[bytes]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP raise KeyboardInterrupt so cleanup always runs.

    SIGINT too: a shell without job control starts background commands with SIGINT
    ignored, and Python then keeps it ignored, so `clicooper launch ... &` in a script
    (or a CI job started that way) ignored Ctrl-C and `kill -INT` for good.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.signal(s, interrupt) for s in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def prepare_launch_dir(out_dir: Path, overwrite: bool) -> None:
    """Like ``prepare_run_dir``, for the launch artifacts too."""
    present = [n for n in LAUNCH_ARTIFACTS if (out_dir / n).exists()]
    if present and not overwrite:
        raise ValueError(
            f"{out_dir} already holds a run ({present[0]}): choose another --out "
            "or pass --overwrite to replace it"
        )
    prepare_run_dir(out_dir, overwrite)
    for name in present:
        shutil.rmtree(out_dir / name)


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
    """Run a whole session with each trainer and the verifier in its own process.

    Fresh certificates go to ``out_dir/certs``, one bundle per party (each process
    is given only its own; the CA key is not kept); every process listens on a free
    port of 127.0.0.1; the data owner runs here. Every process started is
    stopped on return, on an error, on Ctrl-C, SIGTERM or SIGHUP, and each
    child also exits by itself if this process dies.

    ``resume``: continue the unfinished launched run in ``out_dir`` whose owner process
    died (``cfg`` is not used: the run's own ``config.toml`` is): the processes the
    dead launch left are stopped, every party process starts again on its own
    directory, with the run's bundles, a new session id and new ports, and
    :func:`clicooper.runtime.session.run` continues from the last checkpoint common
    to all parties (:mod:`clicooper.runtime.resume`).
    """
    out_dir = Path(out_dir)
    if resume:
        cfg = resumable_config(out_dir, launched=True)
    elif cfg is None:
        raise ValueError("launch needs a config (or resume=True)")
    else:  # the parties' config file holds the resolved release, model and lr
        cfg, data = resolve_run(cfg, data)
    cfg = cfg.model_copy(update={"transport": "grpc"})
    party_devices(cfg, [f"t{i}" for i in range(1, cfg.trainers + 1)])  # all on this machine
    if not resume:
        prepare_launch_dir(out_dir, overwrite)
    launcher = Launcher(out_dir, cfg, send_timeout)
    grace = 0.0  # on an error or an interrupt the children are stopped at once
    with _signals_raise():
        try:
            launcher.prepare(resume)
            launcher.start()
            deployment = launcher.deployment(step_timeout, resume_timeout)
            session = run(
                cfg, out_dir, data=data, progress=progress, deployment=deployment, resume=resume
            )
            session.results["transport"]["restarts"] = {
                n: c.restarts for n, c in launcher.children.items()
            }
            RunDir(out_dir).results.write_text(json.dumps(session.results, indent=2))
            grace = 10.0  # every party was told to shut down: let it exit by itself
            return session
        finally:
            launcher.stop(grace)
