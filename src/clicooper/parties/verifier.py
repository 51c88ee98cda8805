"""The verifier: neutral keeper of the ledger (registration here; the chain in watermark/).

It never receives inputs, labels or the label secret.
"""

from __future__ import annotations

import os
from typing import Any

from clicooper.common.messages import Kind, Message, ProtocolError
from clicooper.runtime.transport.base import Party


class Verifier(Party):
    """Opens a session and registers the parties' public keys."""

    name = "verifier"

    def __init__(self) -> None:
        self.session_id = os.urandom(16).hex()
        self.nonce = os.urandom(16).hex()
        self.registered: dict[str, dict[str, Any]] = {}

    def handle(self, msg: Message) -> None:
        if msg.kind != Kind.REGISTER:
            raise ProtocolError(f"verifier does not accept {msg.kind} messages")
        if msg.meta.get("party") != msg.sender or msg.sender in self.registered:
            raise ProtocolError(f"{msg.sender} cannot register (again or as another party)")
        self.registered[msg.sender] = dict(msg.meta)
        self.send(
            Message(
                Kind.REPLY,
                msg.step,
                self.name,
                msg.sender,
                {},
                {"op": "register", "session_id": self.session_id, "nonce": self.nonce},
            )
        )
