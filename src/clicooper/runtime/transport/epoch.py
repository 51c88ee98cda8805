"""A gRPC transport that moves between transport epochs (session id ``<session>.<epoch>``).

See :mod:`clicooper.runtime.deploy` for how the data owner moves every party between
epochs; a party process starts in the ``join`` epoch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

from clicooper.common.messages import Kind, Message, ProtocolError
from clicooper.config import TransportLimits
from clicooper.runtime.transport.base import Transport
from clicooper.runtime.transport.grpc import GrpcTransport

JOIN = "join"
_WATCH_SLICE = 1.0
#: Seconds of waiting after which the data owner probes its peers (and between probes).
PROBE_AFTER = 3.0


class EpochTransport(Transport):
    """A :class:`GrpcTransport` that can be replaced by one for another epoch (same address)."""

    concurrent = True

    def __init__(
        self,
        name: str,
        peers: dict[str, str],
        certs_dir: Path,
        session: str,
        send_timeout: float = 30.0,
        recv_timeout: float | None = None,
        limits: TransportLimits | None = None,
        identity: str | None = None,
        peer_identities: dict[str, str] | None = None,
    ) -> None:
        if name not in peers:
            raise ValueError(f"the peers file has no address for {name}: add `{name} = host:port`")
        self.name, self.peers, self.certs_dir = name, peers, Path(certs_dir)
        self.session, self.send_timeout, self.recv_timeout = session, send_timeout, recv_timeout
        self.limits = limits
        self.identity, self.peer_identities = identity, peer_identities  # see GrpcTransport
        self.epoch: int | None = None
        self.inner: GrpcTransport | None = None
        self.watch: Callable[[], None] | None = None
        self.probe: list[str] = []  # peers to probe while waiting long for a message
        self._probed = 0.0
        self._closed_bytes = 0

    def session_id(self, epoch: int | None) -> str:
        return f"{self.session}.{JOIN if epoch is None else epoch}"

    def rekey(self, epoch: int | None) -> None:
        """Close the current server and listen again on the same address in ``epoch``."""
        if self.inner is not None:
            self._closed_bytes += self.inner.bytes_sent
            self.inner.close()
        self.inner = self._grpc(self.session_id(epoch), self.send_timeout)
        self.inner.start()
        self.epoch = epoch

    def _grpc(self, session_id: str, send_timeout: float) -> GrpcTransport:
        return GrpcTransport(
            self.name,
            self.peers[self.name],
            {p: a for p, a in self.peers.items() if p != self.name},
            self.certs_dir,
            session_id,
            send_timeout=send_timeout,
            limits=self.limits,
            identity=self.identity,
            peer_identities=self.peer_identities,
        )

    @property
    def bytes_sent(self) -> int:
        return self._closed_bytes + (self.inner.bytes_sent if self.inner else 0)

    def send(self, msg: Message, timeout: float | None = None) -> None:
        if self.inner is None:
            raise ProtocolError(f"transport of {self.name} is not started")
        self.inner.send_timeout = timeout or self.send_timeout
        try:
            self.inner.send(msg)
        finally:
            self.inner.send_timeout = self.send_timeout

    def send_later(self, msg: Message) -> Future[None]:
        if self.inner is None:
            raise ProtocolError(f"transport of {self.name} is not started")
        return self.inner.send_later(msg)

    def send_join(self, msg: Message, timeout: float) -> None:
        """Send ``msg`` in the ``join`` epoch with a one-off client (to a restarted party)."""
        client = self._grpc(self.session_id(None), timeout)
        try:
            client.send(msg)
        finally:
            client.close()

    def recv(self, party: str, timeout: float | None = None) -> Message:
        """The next message; while waiting, :meth:`_check_peers` may report a failure."""
        if self.inner is None:
            raise ProtocolError(f"transport of {self.name} is not started")
        timeout = self.recv_timeout if timeout is None else timeout
        start = time.monotonic()
        deadline = None if timeout is None else start + timeout
        while True:
            waited = time.monotonic() - start
            self._check_peers(waited)
            left = None if deadline is None else deadline - time.monotonic()
            try:
                msg = self.inner.recv(party, _WATCH_SLICE if left is None else min(left, 1.0))
            except TimeoutError:
                if left is not None and left <= 1.0:
                    raise TimeoutError(f"{party} received no message within {timeout} s") from None
                continue
            if not (msg.kind == Kind.REPLY and msg.meta.get("probe")):
                return msg

    def _check_peers(self, waited: float) -> None:
        """While waiting long: ``watch``, and a liveness probe of every peer in ``probe``.

        A probe is a status request; a dead peer fails it (ConnectionError), a
        restarted one refuses it (ProtocolError: another session). Answers
        are dropped by :meth:`recv`, so the party above never sees them.
        """
        if self.watch is not None:
            self.watch()
        now = time.monotonic()
        if self.probe and waited >= PROBE_AFTER and now - self._probed >= PROBE_AFTER:
            self._probed = now
            for peer in self.probe:
                msg = Message(Kind.CONTROL, 0, self.name, peer, {}, {"op": "status", "probe": True})
                self.send(msg, timeout=PROBE_AFTER)

    def close(self) -> None:
        if self.inner is not None:
            self._closed_bytes += self.inner.bytes_sent
            self.inner.close()
            self.inner = None
