"""The data owner's side of a deployment: its handle on the remote parties."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from clicooper.common.messages import Kind, Message, ProtocolError
from clicooper.config import TransportLimits
from clicooper.parties.data_owner import check_reply
from clicooper.runtime.deploy.peers import Deployment
from clicooper.runtime.transport.epoch import EpochTransport

log = logging.getLogger(__name__)


@dataclass
class Remote:
    """The data owner's handle on remote parties: epochs, setup, recovery, shutdown."""

    deployment: Deployment
    parties: list[str]
    setup: dict[str, dict[str, Any]]  # setup meta per party (without resume)
    limits: TransportLimits | None = None
    transport: EpochTransport = field(init=False)
    epoch: int = 0
    reconnects: int = 0

    def __post_init__(self) -> None:
        d = self.deployment
        missing = [p for p in ["do", *self.parties] if p not in d.peers]
        if missing:
            raise ValueError(f"the peers file has no address for {', '.join(missing)}")
        self.transport = EpochTransport(
            "do",
            d.peers,
            d.certs_dir,
            d.session,
            d.send_timeout,
            d.step_timeout,
            self.limits,
            identity=d.identity,
            peer_identities=d.identities,
        )
        self.transport.watch = d.watch
        self.transport.probe = list(self.parties)

    def start(self, resume: bool = False) -> None:
        """Bring every party into epoch 1 and set it up: for a new session, or (``resume``)
        from its own checkpoints and keys, for a run whose owner process died."""
        self._connect(resume=resume, wait=self.deployment.resume_timeout)

    def reconnect(self) -> None:
        """After a failure: a new epoch, lost parties waited for, every party set up again."""
        self.reconnects += 1
        self._connect(resume=True, wait=self.deployment.resume_timeout)

    def _connect(self, resume: bool, wait: float) -> None:
        self.transport.probe = []  # no liveness probes while parties are being moved
        try:
            self._move_all(resume, wait)
        finally:
            self.transport.probe = list(self.parties)

    def _move_all(self, resume: bool, wait: float) -> None:
        epoch = self.epoch + 1
        if self.transport.inner is not None:
            for party in self.parties:  # live parties: move in the old epoch
                with contextlib.suppress(ProtocolError, ConnectionError):
                    self.transport.send(self._control(party, "rekey", epoch=epoch), timeout=2.0)
        self.transport.rekey(epoch)
        self.epoch = epoch
        for party in self.parties:
            self._await(party, time.monotonic() + wait)
        for party in self.parties:
            self.transport.send(self._control(party, "setup", resume=resume, **self.setup[party]))
        self._collect("setup")

    def _await(self, party: str, deadline: float) -> None:
        """Until ``party`` answers a ping in the current epoch (moving it there if needed)."""
        ping = 0
        while True:
            if self.deployment.supervise is not None:
                self.deployment.supervise()
            ping += 1
            try:
                self.transport.send(self._control(party, "status", ping=ping), timeout=2.0)
                if self._pong(party, ping):
                    return
            except ProtocolError:  # another session: a restarted party waiting in join
                with contextlib.suppress(ProtocolError, ConnectionError):
                    rekey = self._control(party, "rekey", epoch=self.epoch)
                    self.transport.send_join(rekey, timeout=2.0)
            except ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise ConnectionError(
                    f"{party} did not answer at {self.deployment.peers[party]}: start it (or "
                    "restart it with the same `clicooper serve` command) and run again"
                )
            time.sleep(0.2)

    def _pong(self, party: str, ping: int) -> bool:
        deadline = time.monotonic() + self.deployment.send_timeout + 5.0
        while time.monotonic() < deadline:
            try:
                msg = self.transport.recv("do", timeout=max(0.1, deadline - time.monotonic()))
            except TimeoutError:
                return False
            pong = msg.meta.get("op") == "status" and msg.meta.get("ping") == ping
            if msg.sender == party and pong:
                return True
        return False

    def _collect(self, op: str) -> dict[str, Message]:
        """One checked reply to ``op`` from every party; a message from a party that has
        answered already, or from none of them, is logged and dropped."""
        replies: dict[str, Message] = {}
        while len(replies) < len(self.parties):
            msg = self.transport.recv("do")
            if msg.kind == Kind.REPLY and msg.meta.get("op") == "status":
                continue  # a late answer to a ping
            if msg.sender not in self.parties or msg.sender in replies:
                log.warning("do dropped %s from %s while collecting %s", msg.kind, msg.sender, op)
                continue
            replies[msg.sender] = check_reply(msg, op)
        return replies

    def _control(self, party: str, op: str, **meta: Any) -> Message:
        return Message(Kind.CONTROL, 0, "do", party, {}, {"op": op, **meta})

    def close(self) -> int:
        """Shut every party down; the bytes every party sent (best effort)."""
        total = self.transport.bytes_sent
        with contextlib.suppress(ProtocolError, ConnectionError, TimeoutError):
            for party in self.parties:
                self.transport.send(self._control(party, "status", ping=-1))
            answered: set[str] = set()
            while len(answered) < len(self.parties):
                msg = self.transport.recv("do", timeout=self.deployment.send_timeout)
                sent = msg.meta.get("bytes_sent", 0)
                ping = msg.meta.get("op") == "status" and msg.meta.get("ping") == -1
                if ping and msg.sender in self.parties and msg.sender not in answered:
                    answered.add(msg.sender)
                    total += sent if isinstance(sent, int) and sent >= 0 else 0
        for party in self.parties:
            with contextlib.suppress(ProtocolError, ConnectionError):
                self.transport.send(self._control(party, "shutdown"), timeout=5.0)
        self.transport.close()
        return total
