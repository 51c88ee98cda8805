"""Nodes in the test process: real gRPC servers on 127.0.0.1, real certificates, real SQLite.

A :class:`LocalPool` is a CA with one bundle per node and per owner, and a
:class:`~clicooper.node.server.Node` per node, each with its own ``--state`` directory.
An owner runs its session exactly as ``clicooper run --pool`` does: it admits the session
on its chain (:func:`clicooper.node.client.admit`) and runs it over the nodes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from clicooper.config import RunConfig
from clicooper.node.artifacts import remote_collector
from clicooper.node.client import NodeAddress, Owner, admit, node_deployment
from clicooper.node.processes import free_ports
from clicooper.node.server import Node
from clicooper.runtime.certs import create_certificates
from clicooper.runtime.deploy.settings import party_settings
from clicooper.runtime.session import run

# Small clicooper runs whose ledger verifies (conftest.WM), as a config file
CONFIG = """
[watermark]
strength = 0.01
bits = 128

[labels]
mode = "keyed"

[privacy]
noise_multiplier = 0.1
"""


class LocalPool:
    """Trainer nodes ``trainer-1`` .. and ``verifier-1``, and owners, under one CA."""

    def __init__(
        self, root: Path, trainers: int, owners: list[str], capacity: int = 4, verifier: bool = True
    ) -> None:
        self.root = root
        self.trainer_names = [f"trainer-{i}" for i in range(1, trainers + 1)]
        self.node_names = self.trainer_names + (["verifier-1"] if verifier else [])
        create_certificates([*self.node_names, *owners], root / "certs")
        self.capacity = capacity
        self.nodes: dict[str, Node] = {}
        self.owners = {name: self.owner(name) for name in owners}

    def start_node(self, name: str, **kw: Any) -> Node:
        role = "verifier" if name.startswith("verifier") else "trainer"
        previous = self.nodes.get(name)
        listen = previous.listen if previous is not None else "127.0.0.1:0"
        kw.setdefault("capacity", self.capacity)
        kw.setdefault("send_timeout", 10.0)
        node = Node(role, name, listen, self.root / "certs" / name, self.state(name), **kw)
        self.nodes[name] = node.start()
        return node

    def start(self) -> LocalPool:
        for name in self.node_names:
            self.start_node(name)
        return self

    def stop(self) -> None:
        for node in self.nodes.values():
            if node._server is not None:
                node.stop()

    def state(self, name: str) -> Path:
        return self.root / "nodes" / name

    def address(self, name: str) -> NodeAddress:
        return NodeAddress(name, self.nodes[name].listen)

    def owner(self, name: str, certs: Path | None = None) -> Owner:
        port = free_ports(1)[0]
        return Owner(name, (certs or self.root / "certs") / name, f"127.0.0.1:{port}")

    def chain(self, cfg: RunConfig, trainers: list[str] | None = None) -> dict[str, NodeAddress]:
        names = trainers or self.trainer_names[: cfg.trainers]
        chain = {f"t{i}": self.address(n) for i, n in enumerate(names, start=1)}
        if cfg.mode == "clicooper" and cfg.watermark.enabled:
            chain["verifier"] = self.address("verifier-1")
        return chain

    @staticmethod
    def settings(cfg: RunConfig, chain: dict[str, NodeAddress]) -> dict[str, dict[str, Any]]:
        return {p: party_settings(cfg, "verifier" if p == "verifier" else "trainer") for p in chain}

    def admit(self, owner: str, cfg: RunConfig, session: str | None = None, **kw: Any) -> str:
        """Admit a new session of ``owner`` on its chain; the session id."""
        session = session or os.urandom(6).hex()
        chain = self.chain(cfg, kw.pop("trainers", None))
        admit(self.owners[owner], session, chain, self.settings(cfg, chain), **kw)
        return session

    def run(self, owner: str, cfg: RunConfig, out: Path, data: Any, session: str | None = None):
        """Admit and run one session of ``owner``; the session (as ``run`` returns it)."""
        session = self.admit(owner, cfg, session)
        chain = self.chain(cfg)
        deployment = node_deployment(
            self.owners[owner],
            session,
            chain,
            collect=remote_collector(self.owners[owner], chain, session),
            send_timeout=10.0,
            step_timeout=30.0,
            resume_timeout=30.0,
        )
        return run(cfg, out, data=data, deployment=deployment)
