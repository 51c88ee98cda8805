"""Two-phase admission of sessions on a node: reserve (with a time to live), commit, abort.

An owner reserves a slot on every node of its chain, then commits on all of them, or
aborts all of them when one refuses (:func:`clicooper.node.client.admit`). A reservation
that is not committed within its TTL lapses (:meth:`Admission.expire`), so an owner that
dies between the phases leaves nothing held. A node holds at most ``capacity`` sessions
(reserved or active); one more is refused with the reason.

Every request is checked against the owner's certificate name: a session belongs to
the owner that reserved it, and to anyone else it does not exist (the same answer as
for an unknown id, so one owner cannot even learn another's session ids).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from typing import Any

from clicooper.common.messages import Message
from clicooper.node.state import ABORTED, ACTIVE, FINISHED, HOLDING, RESERVED, NodeState
from clicooper.node.state import SessionRecord as Record
from clicooper.runtime.certs import validate_party_name
from clicooper.runtime.transport.grpc import _check_address

SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
#: The longest reservation a node grants (seconds).
MAX_TTL = 600.0

# Why a request was refused (the server maps each to a gRPC status code). NOT_ENDED: the
# session's files are asked for while it is served; the caller may try again later.
FULL, DENIED, INVALID, CONFLICT = "full", "denied", "invalid", "conflict"
NOT_ENDED = "not-ended"
#: The trailing-metadata key under which a node names a refusal's kind (the codes above),
#: so a caller tells "not ended yet, try later" from a refusal without reading its text.
REFUSAL_KEY = "clicooper-refusal"


class AdmissionError(Exception):
    """A refused admission request: ``code`` says which kind, the text says why."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code, self.reason = code, reason


class Admission:
    """The admission rules of node ``name`` (role ``role``) over its ``state``."""

    def __init__(
        self,
        state: NodeState,
        name: str,
        role: str,
        capacity: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be a positive integer, got {capacity!r}")
        self.state, self.name, self.role, self.capacity = state, name, role, capacity
        self.clock = clock
        self._lock = threading.Lock()

    def reserve(
        self, owner: str, msg: Message, validate: Callable[[Record], None] | None = None
    ) -> Record:
        """Hold a slot for the session ``msg`` describes until its TTL passes.

        Idempotent for the same owner and party (a retried reserve); refused when the id
        was used before, when it is another owner's, or when the node is full.
        ``validate`` refuses settings the node cannot serve (after the identity checks).
        """
        record = self._request(owner, msg)
        if validate is not None:
            validate(record)
        with self._lock:
            self._expire(record.created)
            known = self.state.get(record.session)
            if known is not None:
                return self._again(owner, known, record)
            holding = len(self.state.holding())
            if holding >= self.capacity:
                raise AdmissionError(
                    FULL,
                    f"{self.name} is full: {holding} of its capacity {self.capacity} sessions "
                    "are reserved or active; try again later or choose another node",
                )
            if not self.state.insert(record):  # pragma: no cover (inserted under the lock)
                raise AdmissionError(CONFLICT, f"session {record.session} is taken")
        return record

    def commit(self, owner: str, session: str) -> Record:
        """The reserved session becomes active (the caller starts serving it)."""
        with self._lock:
            now = self.clock()
            self._expire(now)
            record = self._mine(owner, session)
            if record.state == ACTIVE:
                return record  # a retried commit
            if not self.state.transition(session, (RESERVED,), ACTIVE, now):
                why = record.reason or record.state
                raise AdmissionError(
                    CONFLICT, f"session {session} on {self.name} cannot be committed: {why}"
                )
            return self.state.get(session)  # type: ignore[return-value]

    def rejoin(self, owner: str, session: str) -> Record:
        """The owner's active session, which its restarted owner process continues."""
        with self._lock:
            record = self._mine(owner, session)
            if record.state != ACTIVE:
                why = f"{record.state}: {record.reason}" if record.reason else record.state
                raise AdmissionError(
                    CONFLICT, f"session {session} on {self.name} cannot be rejoined: {why}"
                )
            return record

    def abort(self, owner: str, session: str, reason: str = "aborted by its owner") -> Record:
        """End the owner's session, reserved or active; its state before (a no-op once ended)."""
        with self._lock:
            record = self._mine(owner, session)
            self.state.transition(session, HOLDING, ABORTED, self.clock(), reason)
            return record

    def ended(self, owner: str, session: str) -> Record:
        """The owner's session once it has finished or been aborted (its files are final);
        refused while it is reserved or active."""
        with self._lock:
            record = self._mine(owner, session)
            if record.state in HOLDING:
                raise AdmissionError(
                    NOT_ENDED, f"session {session} on {self.name} is still {record.state}"
                )
            return record

    def end(self, session: str, finished: bool, reason: str = "") -> bool:
        """An active session's end, as its host saw it (finished, or failed)."""
        target = FINISHED if finished else ABORTED
        with self._lock:
            return self.state.transition(session, (ACTIVE,), target, self.clock(), reason)

    def expire(self) -> list[str]:
        """Lapse every reservation past its TTL; their ids."""
        with self._lock:
            return self._expire(self.clock())

    def _expire(self, now: float) -> list[str]:
        lapsed = [
            r.session
            for r in self.state.sessions()
            if r.state == RESERVED and r.expires is not None and r.expires <= now
        ]
        return [
            s
            for s in lapsed
            if self.state.transition(s, (RESERVED,), ABORTED, now, "reservation expired")
        ]

    def _mine(self, owner: str, session: str) -> Record:
        record = self.state.get(session) if isinstance(session, str) else None
        if record is None or record.owner != owner:
            raise AdmissionError(DENIED, f"{self.name} holds no session {session!r} of {owner}")
        return record

    def _again(self, owner: str, known: Record, asked: Record) -> Record:
        """A reserve of a known id: the same request again, or a refusal."""
        if known.owner != owner:
            raise AdmissionError(
                CONFLICT, f"session id {known.session} is taken on {self.name}: choose another"
            )
        if known.state == RESERVED and known.party == asked.party:
            return known
        raise AdmissionError(
            CONFLICT,
            f"session {known.session} was used on {self.name} before ({known.state}): "
            "a session id is used once; choose a new one",
        )

    def _request(self, owner: str, msg: Message) -> Record:
        """The reservation ``msg`` asks for, every field checked (INVALID otherwise)."""
        meta = msg.meta
        session, party = meta.get("session"), meta.get("party")
        if not isinstance(session, str) or not SESSION_ID.fullmatch(session):
            raise AdmissionError(INVALID, "reserve: session must be 1-64 of A-Z a-z 0-9 _ -")
        expected = "verifier" if self.role == "verifier" else "t1 .. t8"
        if not (party == "verifier" if self.role == "verifier" else _trainer_name(party)):
            raise AdmissionError(INVALID, f"reserve: {self.name} serves {expected}, not {party!r}")
        identities = _names(meta.get("identities"), "identities")
        peers = _addresses(meta.get("peers"))
        if identities.get("do") != owner:
            raise AdmissionError(DENIED, f"reserve: do must be the sender's certificate {owner}")
        if identities.get(party) != self.name:
            raise AdmissionError(INVALID, f"reserve: {party} must be this node, {self.name}")
        if set(peers) != set(identities):
            raise AdmissionError(
                INVALID, "reserve: peers and identities must name the same parties"
            )
        settings, ttl = meta.get("settings"), meta.get("ttl")
        if not isinstance(settings, dict):
            raise AdmissionError(INVALID, "reserve: settings must be a table")
        if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 0 < ttl <= MAX_TTL:
            raise AdmissionError(INVALID, f"reserve: ttl must be seconds in (0, {MAX_TTL}]")
        now = self.clock()
        return Record(
            session, owner, party, identities, peers, settings, RESERVED, now + ttl, now, now
        )


def _trainer_name(party: Any) -> bool:
    return (
        isinstance(party, str) and party[:1] == "t" and party[1:] in {str(i) for i in range(1, 9)}
    )


def _names(value: Any, what: str) -> dict[str, str]:
    if not isinstance(value, dict) or not value or len(value) > 16:
        raise AdmissionError(INVALID, f"reserve: {what} must be a table of 1-16 parties")
    try:
        return {validate_party_name(k): validate_party_name(v) for k, v in value.items()}
    except ValueError as exc:
        raise AdmissionError(INVALID, f"reserve: {what}: {exc}") from None


def _addresses(value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or not value or len(value) > 16:
        raise AdmissionError(INVALID, "reserve: peers must be a table of 1-16 parties")
    try:
        return {validate_party_name(k): _check_address(v, k) for k, v in value.items()}
    except ValueError as exc:
        raise AdmissionError(INVALID, f"reserve: peers: {exc}") from None
