"""Served parties in threads of the test process: real gRPC on 127.0.0.1, real certificates.

Each trainer and the verifier is a :class:`PartyHost` run by :func:`serve`, exactly as
``clicooper serve`` runs it, but in a thread, so a test can give one party a
misbehaving host or transport and look at every party's state afterwards.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

from clicooper.config import RunConfig
from clicooper.node.processes import free_ports
from clicooper.runtime.certs import create_certificates
from clicooper.runtime.deploy.host import PartyHost, serve
from clicooper.runtime.deploy.peers import Deployment
from clicooper.runtime.transport.epoch import EpochTransport

HostFactory = Callable[[str, str, RunConfig, Path], PartyHost]
TransportFactory = Callable[..., EpochTransport]


class Served:
    """The trainers (and the verifier) of ``cfg`` served in threads; ``deployment()`` for do."""

    def __init__(self, cfg: RunConfig, out: Path, certs: Path, verifier: bool) -> None:
        self.cfg, self.out, self.certs = cfg, out, certs
        self.names = [f"t{i}" for i in range(1, cfg.trainers + 1)]
        self.names += ["verifier"] if verifier else []
        create_certificates(["do", *self.names], certs)
        ports = free_ports(len(self.names) + 1)
        self.peers = {
            p: f"127.0.0.1:{port}" for p, port in zip(["do", *self.names], ports, strict=True)
        }
        self.session = os.urandom(6).hex()
        self.hosts: dict[str, PartyHost] = {}
        self.transports: dict[str, EpochTransport] = {}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(
        self,
        hosts: dict[str, HostFactory] | None = None,
        transports: dict[str, TransportFactory] | None = None,
    ) -> Served:
        """Serve every party; ``hosts``/``transports`` replace a party's host or transport."""
        hosts, transports = hosts or {}, transports or {}
        for name in self.names:
            role = "verifier" if name == "verifier" else "trainer"
            host = hosts.get(name, PartyHost)(role, name, self.cfg, self.out)
            make = transports.get(name, EpochTransport)
            transport = make(name, self.peers, self.certs / name, self.session, send_timeout=10.0)
            self.hosts[name], self.transports[name] = host, transport
            thread = threading.Thread(target=serve, args=(host, transport, self._stop))
            thread.start()
            self._threads.append(thread)
        return self

    def deployment(self, step_timeout: float = 30.0) -> Deployment:
        return Deployment(
            self.peers,
            self.session,
            self.certs / "do",
            send_timeout=10.0,
            step_timeout=step_timeout,
            resume_timeout=30.0,
        )

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)
        alive = [t.name for t in self._threads if t.is_alive()]
        assert not alive, f"served parties did not stop: {alive}"
