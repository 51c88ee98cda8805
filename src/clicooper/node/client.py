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
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clicooper.common.files import ensure_dir, write_file, write_private
from clicooper.common.messages import Kind, Message, ProtocolError
from clicooper.node.state import ABORTED, FINISHED, SqliteState
from clicooper.runtime.deploy.peers import Deployment
from clicooper.runtime.rundirs import RunDir
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


def local_collector(
    state_dirs: dict[str, Path], session: str, timeout: float = 60.0
) -> Callable[[Path], None]:
    """Collects a finished session's artifacts from nodes on this machine (``--state`` of
    each party's node) into the run directory, in the layout of an in-process run: the
    verifier's ledger, audit copies, keys and anchor, each trainer's final segment and
    party directory (keys, watermark secret, release caches), every party's checkpoints.

    Waits for every node to record the session finished (its party has closed its files).
    A node on another machine would have to send them; that is not built.
    """

    def collect(out_dir: Path) -> None:
        run = RunDir(out_dir)
        for party, state_dir in state_dirs.items():
            _wait_finished(state_dir, session, timeout)
            source = RunDir(Path(state_dir) / "sessions" / session)
            if party == "verifier":
                if source.ledger.is_file():
                    write_private(run.ledger, source.ledger.read_bytes())
                _copy_tree(source.audit, run.audit)
                _copy_tree(source.verifier, run.verifier)
            else:
                if source.segment(party).is_file():
                    ensure_dir(run.segments)
                    write_private(run.segment(party), source.segment(party).read_bytes())
                _copy_tree(source.party(party), run.party(party))
            _copy_tree(source.checkpoints(party), run.checkpoints(party))

    return collect


def _wait_finished(state_dir: Path, session: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        state = SqliteState(state_dir, readonly=True)
        try:
            record = state.get(session)
        finally:
            state.close()
        if record is not None and record.state in (FINISHED, ABORTED):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"the node in {state_dir} did not finish session {session}")
        time.sleep(0.1)


def _copy_tree(source: Path, target: Path) -> None:
    """Every file under ``source`` to the same place under ``target`` (0700 dirs, 0600
    files, 0644 those that were public)."""
    if not source.is_dir():
        return
    ensure_dir(target)
    for path in sorted(source.rglob("*")):
        dest = target / path.relative_to(source)
        if path.is_dir() and not path.is_symlink():
            ensure_dir(dest)
        elif path.is_file() and not path.is_symlink():  # a public file (anchor.txt) stays so
            write_file(dest, path.read_bytes(), path.stat().st_mode & 0o644)
