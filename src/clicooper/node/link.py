"""One session's transport on a node: the node's server receives, this sends.

A served party (``clicooper serve``) listens on an address of its own and moves between
transport epochs by closing its server and listening again. On a node every session
shares one server, so :class:`SessionTransport` keeps the same epochs with no server:
each epoch gets a fresh :class:`~clicooper.runtime.transport.grpc_server.Receiver`
(session id ``<session>.<epoch>``, fresh sequence counters, every check of the wire)
that the node routes the session's messages to, and a client-only
:class:`~clicooper.runtime.transport.grpc.GrpcTransport` for what the party sends.
Peers are bound to their certificates (``identities``), not to the names they claim.
"""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path

from clicooper.common.messages import Message
from clicooper.config import TransportLimits
from clicooper.node.state import SessionRecord
from clicooper.runtime.transport.epoch import EpochTransport
from clicooper.runtime.transport.grpc_server import Receiver


class SessionTransport(EpochTransport):
    """The transport of ``record.party`` in ``record.session``, sending as ``identity``."""

    def __init__(
        self,
        record: SessionRecord,
        listen: str,
        certs_dir: Path,
        identity: str,
        limits: TransportLimits,
        send_timeout: float = 30.0,
    ) -> None:
        peers = {**record.peers, record.party: listen}
        super().__init__(
            record.party,
            peers,
            certs_dir,
            record.session,
            send_timeout,
            limits=limits,
            identity=identity,
            peer_identities=dict(record.identities),
        )
        self.receiver: Receiver | None = None
        self.last_message = time.monotonic()  # when the party last took a message
        self._lock = threading.Lock()

    def rekey(self, epoch: int | None) -> None:
        """A fresh receiver and a fresh client for ``epoch``: nothing of the old one is kept."""
        with self._lock:
            if self.inner is not None:
                self._closed_bytes += self.inner.bytes_sent
                self.inner.close()
            session_id = self.session_id(epoch)
            self.receiver = Receiver(
                self.name, session_id, self.limits or TransportLimits(), self.peer_identities
            )
            self.inner = self._grpc(session_id, self.send_timeout)  # client only: never started
            self.epoch = epoch

    def recv(self, party: str, timeout: float | None = None) -> Message:
        receiver = self.receiver
        if receiver is None or party != self.name:
            raise TimeoutError(f"{party} is not served by this session transport")
        try:
            msg = receiver.inbox.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"{party} received no message within {timeout} s") from None
        self.last_message = time.monotonic()
        return msg

    def close(self) -> None:
        with self._lock:
            super().close()
            self.receiver = None
