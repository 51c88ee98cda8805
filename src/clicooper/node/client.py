"""The owner's side of nodes: admission on every node of its chain or on none.

:func:`admit` reserves the session on each node (with a TTL), commits on all of them once
every one has granted, and aborts every reservation or commit made when one node refuses
or cannot be reached; the error names the node and its reason. Should the owner die in
between, each reservation lapses on its node when its TTL passes.

Each request is one CONTROL message from ``do`` in a one-off admission session
(``admit.<random nonce>``), sent with the owner's own certificate: the node binds the
session to that certificate, and later accepts the session's messages as ``do`` only from
it. :func:`node_deployment` is the :class:`~clicooper.runtime.deploy.peers.Deployment`
the owner then runs the session with (``clicooper.runtime.session.run``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clicooper.common.messages import Kind, Message, ProtocolError
from clicooper.runtime.deploy.peers import Deployment
from clicooper.runtime.transport.grpc import GrpcTransport

#: Seconds a reservation is held before it lapses unless committed.
DEFAULT_TTL = 60.0


@dataclass(frozen=True)
class NodeAddress:
    """A node as an owner sees it: its certificate name and its ``host:port``."""

    name: str
    address: str


class AdmissionRefused(ValueError):
    """The session was admitted on no node (every reservation made was aborted)."""


@dataclass(frozen=True)
class Owner:
    """An owner: its certificate name, its own bundle and the address it listens on."""

    name: str
    certs_dir: Path
    address: str

    def request(self, node: NodeAddress, op: str, timeout: float = 10.0, **meta: Any) -> None:
        """One admission request to ``node``; ProtocolError with the node's reason if refused,
        ConnectionError if it cannot be reached."""
        client = GrpcTransport(
            "do",
            "127.0.0.1:0",  # never started: the answer is the call's status
            {node.name: node.address},
            self.certs_dir,
            f"admit.{os.urandom(12).hex()}",
            send_timeout=timeout,
            identity=self.name,
        )
        try:
            client.send(Message(Kind.CONTROL, 0, "do", node.name, {}, {"op": op, **meta}))
        finally:
            client.close()


def admit(
    owner: Owner,
    session: str,
    chain: dict[str, NodeAddress],
    settings: dict[str, dict[str, Any]],
    ttl: float = DEFAULT_TTL,
    timeout: float = 10.0,
) -> None:
    """Admit ``session`` on every node of ``chain`` (party -> node) or on none.

    ``settings``: what each party must share with the owner (its ``party_settings``).
    """
    identities = {"do": owner.name, **{p: n.name for p, n in chain.items()}}
    peers = {"do": owner.address, **{p: n.address for p, n in chain.items()}}
    done: list[NodeAddress] = []
    try:
        for party, node in chain.items():
            owner.request(
                node,
                "reserve",
                timeout,
                session=session,
                party=party,
                identities=identities,
                peers=peers,
                settings=settings[party],
                ttl=ttl,
            )
            done.append(node)
        for node in chain.values():
            owner.request(node, "commit", timeout, session=session)
    except (ProtocolError, ConnectionError) as exc:
        abort(owner, session, done, timeout)
        raise AdmissionRefused(f"session {session} was not admitted: {exc}") from None


def abort(owner: Owner, session: str, nodes: Iterable[NodeAddress], timeout: float = 10.0) -> None:
    """Abort ``session`` on each of ``nodes`` (best effort: a node that cannot be reached
    lets the reservation lapse, or the session go idle, by itself)."""
    for node in nodes:
        with contextlib.suppress(ProtocolError, ConnectionError):
            owner.request(node, "abort", timeout, session=session)


def node_deployment(
    owner: Owner,
    session: str,
    chain: dict[str, NodeAddress],
    collect: Callable[[Path], None] | None = None,
    **fields: Any,
) -> Deployment:
    """The deployment of an admitted session: every party at its node, bound to its
    node's certificate, the owner as ``do`` with its own (``fields``: timeouts,
    ``supervise``, ``watch``)."""
    peers = {"do": owner.address, **{p: n.address for p, n in chain.items()}}
    return Deployment(
        peers,
        session,
        owner.certs_dir,
        identity=owner.name,
        identities={p: n.name for p, n in chain.items()},
        collect=collect,
        **fields,
    )
