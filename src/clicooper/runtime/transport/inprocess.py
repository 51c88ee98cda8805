"""Every party in one process: a deterministic, single-threaded message hub.

Messages are encoded to bytes on ``send`` and decoded on delivery, exactly as
over the network, so no party ever holds a reference to another's tensors.
Delivery order is FIFO per receiver and parties are served round-robin in
registration order, which makes a run reproducible from its seed.
"""

from __future__ import annotations

from collections import deque

from clicooper.common.messages import Message, ProtocolError
from clicooper.common.serde import decode_message, encode_message
from clicooper.runtime.transport.base import Party, Transport


class InProcessTransport(Transport):
    """Hosts parties that react to messages; a driver party waits with ``recv``."""

    def __init__(self) -> None:
        self._parties: dict[str, Party] = {}
        self._queues: dict[str, deque[bytes]] = {}
        self.bytes_sent = 0

    def attach(self, party: Party) -> None:
        """Host ``party``: it will be handed every message addressed to it."""
        party.transport = self
        self._parties[party.name] = party
        self._queues.setdefault(party.name, deque())

    def add_mailbox(self, name: str) -> None:
        """A named inbox for a driver that reads with :meth:`recv` instead of handling."""
        self._queues.setdefault(name, deque())

    def send(self, msg: Message) -> None:
        if msg.receiver not in self._queues:
            raise ProtocolError(f"unknown receiver {msg.receiver!r}")
        data = encode_message(msg)
        self.bytes_sent += len(data)
        self._queues[msg.receiver].append(data)

    def recv(self, party: str, timeout: float | None = None) -> Message:
        inbox = self._queues[party]
        while not inbox:
            if not self._deliver_one(skip=party):
                raise ProtocolError(f"{party} waits for a message but no party has work")
        return decode_message(inbox.popleft())

    def _deliver_one(self, skip: str) -> bool:
        for name, party in self._parties.items():
            queue = self._queues[name]
            if name != skip and queue:
                party.handle(decode_message(queue.popleft()))
                return True
        return False
