"""The one interface every party talks through.

A party never knows its transport. It sends typed :class:`Message` objects and
handles the ones delivered to it. The data owner drives a session: it sends
and then waits with :meth:`Transport.recv` for the answer addressed to it;
trainers and the verifier only react in :meth:`Party.handle`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from concurrent.futures import Future

from clicooper.common.messages import Message


class Party(ABC):
    """A role in the protocol (data owner, trainer, verifier)."""

    name: str
    transport: Transport

    @abstractmethod
    def handle(self, msg: Message) -> None:
        """React to one delivered message (may send messages in turn)."""

    def send(self, msg: Message) -> None:
        self.transport.send(msg)


class Transport(ABC):
    """Delivers messages between named parties.

    Guarantees: messages between one sender and one receiver arrive in the
    order sent, exactly once; every tensor is serialised at the sender and
    deserialised at the receiver (the boundary is real even in-process).
    """

    #: Whether the parties compute at once (their own processes), so that work in
    #: flight overlaps: what pipelining needs (:mod:`clicooper.parties.pipelining`).
    concurrent: bool = False

    @abstractmethod
    def send(self, msg: Message) -> None:
        """Queue ``msg`` for ``msg.receiver``."""

    def send_later(self, msg: Message) -> Future[None]:
        """Start delivering ``msg`` and return; the future holds the outcome.

        Order per (sender, receiver) is kept, also with :meth:`send` calls made
        meanwhile. This default delivers at once (the in-process transport never
        waits for a peer); a networked transport overlaps delivery with the caller.
        """
        future: Future[None] = Future()
        try:
            self.send(msg)
        except Exception as exc:  # the caller sees it from future.result(), like a remote error
            future.set_exception(exc)
        else:
            future.set_result(None)
        return future

    @abstractmethod
    def recv(self, party: str, timeout: float | None = None) -> Message:
        """Block until a message for ``party`` arrives and return it.

        Meanwhile the transport keeps delivering messages to the other parties
        it hosts, so a driver that waits lets the chain make progress.
        """

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Release sockets, threads and files."""
