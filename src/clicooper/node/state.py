"""A node's state: its sessions, who owns each, the chain, and where each stands.

One interface, two stores (as Flower's SuperLink has): :class:`MemoryState` for tests
and short-lived nodes, :class:`SqliteState` (WAL) for a node that must know its
sessions after a restart. Every change of a session's state is one conditional
update (``transition``): a commit racing an abort or an expiry changes the state at
most once, whichever comes first, and the loser learns that it lost.

A session moves only forward: ``reserved`` -> ``active`` -> ``finished``, or to
``aborted`` from either (refused, aborted by its owner, reservation expired, failed).
A session id is never forgotten, so one that ended can never be used again.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from clicooper.common.files import private_dir

RESERVED, ACTIVE, FINISHED, ABORTED = "reserved", "active", "finished", "aborted"
STATES = (RESERVED, ACTIVE, FINISHED, ABORTED)
#: States that hold one of the node's ``capacity`` slots.
HOLDING = (RESERVED, ACTIVE)
STATE_FILE = "node.sqlite"


@dataclass(frozen=True)
class SessionRecord:
    """One session on this node.

    ``owner`` is the Common Name of the owner's certificate; ``party`` the role this node
    plays in it (``t1`` .. ``tn`` or ``verifier``); ``identities`` the certificate name of
    every party of the session (``do`` included) and ``peers`` their addresses;
    ``settings`` what the owner asked this party to share (:mod:`..runtime.deploy.settings`).
    ``expires`` is when a reservation lapses (epoch seconds; None once committed).
    """

    session: str
    owner: str
    party: str
    identities: dict[str, str]
    peers: dict[str, str]
    settings: dict[str, Any]
    state: str = RESERVED
    expires: float | None = None
    created: float = 0.0
    updated: float = 0.0
    reason: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """What ``node status`` shows (no settings, no addresses)."""
        return {
            "session": self.session,
            "owner": self.owner,
            "party": self.party,
            "state": self.state,
            "expires": self.expires,
            "reason": self.reason,
        }


class NodeState(ABC):
    """Where a node keeps its sessions."""

    @abstractmethod
    def get(self, session: str) -> SessionRecord | None:
        """The session's record, or None if this node never saw it."""

    @abstractmethod
    def sessions(self) -> list[SessionRecord]:
        """Every session, oldest first."""

    @abstractmethod
    def insert(self, record: SessionRecord) -> bool:
        """Add ``record``; False (and nothing changes) when its id is known already."""

    @abstractmethod
    def transition(
        self, session: str, sources: tuple[str, ...], target: str, now: float, reason: str = ""
    ) -> bool:
        """Move ``session`` to ``target`` if it is in one of ``sources``; whether it moved.

        Moving to ``active`` clears the expiry (a committed session does not lapse).
        """

    def holding(self) -> list[SessionRecord]:
        """The sessions that hold a slot (reserved or active)."""
        return [r for r in self.sessions() if r.state in HOLDING]

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Release the store."""


class MemoryState(NodeState):
    """Sessions in a dict: for tests and nodes whose state may die with them."""

    def __init__(self) -> None:
        self._records: dict[str, SessionRecord] = {}
        self._lock = threading.Lock()

    def get(self, session: str) -> SessionRecord | None:
        with self._lock:
            return self._records.get(session)

    def sessions(self) -> list[SessionRecord]:
        with self._lock:
            return sorted(self._records.values(), key=lambda r: r.created)

    def insert(self, record: SessionRecord) -> bool:
        with self._lock:
            if record.session in self._records:
                return False
            self._records[record.session] = record
            return True

    def transition(
        self, session: str, sources: tuple[str, ...], target: str, now: float, reason: str = ""
    ) -> bool:
        with self._lock:
            record = self._records.get(session)
            if record is None or record.state not in sources:
                return False
            expires = None if target == ACTIVE else record.expires
            self._records[session] = replace(
                record, state=target, updated=now, reason=reason, expires=expires
            )
            return True


_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    session TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    party TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('reserved', 'active', 'finished', 'aborted')),
    expires REAL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    doc TEXT NOT NULL
)
"""
_COLUMNS = "session, owner, party, state, expires, created, updated, reason, doc"


class SqliteState(NodeState):
    """Sessions in ``DIR/node.sqlite`` (WAL, synchronous FULL): they survive a restart.

    One connection, used under a lock: a node's state changes a few times per session,
    so there is nothing to gain from more. ``readonly`` opens it for ``node status``
    while the node runs (WAL lets a reader in beside the writer).
    """

    def __init__(self, state_dir: Path, readonly: bool = False) -> None:
        path = Path(state_dir) / STATE_FILE
        if readonly:
            if not path.is_file():
                raise ValueError(f"{state_dir} holds no node state ({STATE_FILE}): is it --state?")
            uri = f"file:{path}?mode=ro"
            self._db = sqlite3.connect(uri, uri=True, check_same_thread=False)
        else:
            private_dir(state_dir)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(_SCHEMA)
            path.chmod(0o600)
        self._lock = threading.Lock()

    def get(self, session: str) -> SessionRecord | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {_COLUMNS} FROM sessions WHERE session = ?", (session,)
            ).fetchone()
        return None if row is None else _record(row)

    def sessions(self) -> list[SessionRecord]:
        with self._lock:
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM sessions ORDER BY created").fetchall()
        return [_record(row) for row in rows]

    def insert(self, record: SessionRecord) -> bool:
        doc = json.dumps(
            {k: asdict(record)[k] for k in ("identities", "peers", "settings", "extra")}
        )
        values = (
            record.session,
            record.owner,
            record.party,
            record.state,
            record.expires,
            record.created,
            record.updated,
            record.reason,
            doc,
        )
        with self._lock:
            try:
                self._db.execute(
                    f"INSERT INTO sessions ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?)", values
                )
            except sqlite3.IntegrityError:
                return False
        return True

    def transition(
        self, session: str, sources: tuple[str, ...], target: str, now: float, reason: str = ""
    ) -> bool:
        marks = ",".join("?" * len(sources))
        expires = "NULL" if target == ACTIVE else "expires"
        with self._lock:
            cursor = self._db.execute(
                f"UPDATE sessions SET state = ?, updated = ?, reason = ?, expires = {expires} "
                f"WHERE session = ? AND state IN ({marks})",
                (target, now, reason, session, *sources),
            )
        return cursor.rowcount == 1

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _record(row: tuple[Any, ...]) -> SessionRecord:
    session, owner, party, state, expires, created, updated, reason, doc = row
    return SessionRecord(
        session,
        owner,
        party,
        state=state,
        expires=expires,
        created=created,
        updated=updated,
        reason=reason,
        **json.loads(doc),
    )


def open_state(state_dir: Path | None) -> NodeState:
    """SQLite in ``state_dir``; in memory when it is None."""
    return MemoryState() if state_dir is None else SqliteState(state_dir)
