"""A long-running trainer or verifier node: one TLS server, many sessions (``clicooper node``).

Every delivered stream is read once by the node and routed by its session id:

* ``admit.<nonce>``: an admission request (reserve, commit, rejoin or abort; see
  :mod:`.admission`), a CONTROL message from ``do`` bound to the sender's certificate.
  It is answered in the call's status: OK, or a refusal whose text says why. Each
  nonce is used once (a replay is refused; the requests are idempotent besides).
* ``Fetch`` of an ``admit.<nonce>`` request (op ``fetch``): the files of a finished
  session, streamed to its owner (:mod:`.artifacts`).
* ``<session>.<epoch>``: a message of an active session, handed to that session's
  :class:`~clicooper.node.link.SessionTransport`, whose receiver runs every check of
  the wire with each sender bound to the certificate the session's owner named for it
  at reserve: only the owner and its chain can reach the session, whatever name a
  message claims. An unknown session, or one that is another's, is one and the same
  refusal.

Each active session runs its own :class:`~clicooper.runtime.deploy.host.PartyHost`,
exactly as ``clicooper serve`` runs it, in a thread, with its own directory
``STATE/sessions/<session>/`` (0700): segment, optimizer, watermark keys and secrets,
checkpoints, release caches and records. A node restarted on the same ``--state``
serves its active sessions again from their checkpoints (the owner resumes them).
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from pydantic import ValidationError

from clicooper.common.files import private_dir
from clicooper.common.messages import Kind, Message
from clicooper.config import RunConfig, TransportLimits, one_line
from clicooper.node.admission import (
    CONFLICT,
    DENIED,
    FULL,
    INVALID,
    NOT_ENDED,
    REFUSAL_KEY,
    Admission,
    AdmissionError,
)
from clicooper.node.artifacts import stream_files
from clicooper.node.link import SessionTransport
from clicooper.node.state import ACTIVE, NodeState, SessionRecord, SqliteState
from clicooper.proto import Envelope, FileChunk
from clicooper.runtime.certs import load_party_credentials, validate_party_name
from clicooper.runtime.deploy.host import PartyHost, serve
from clicooper.runtime.deploy.settings import SHARED
from clicooper.runtime.transport.grpc import _check_address
from clicooper.runtime.transport.grpc_server import (
    Receiver,
    Rejected,
    Streams,
    parse_envelope,
    peer_name,
    start_tls_server,
)
from clicooper.runtime.transport.grpc_wire import DEFAULT_ENVELOPE_BYTES

log = logging.getLogger(__name__)
#: The session-id prefix of admission requests.
ADMIT = "admit"
SESSIONS_DIR = "sessions"
_OK = b"\x08\x01"  # Ack(ok=True)
_CODES = {
    FULL: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DENIED: grpc.StatusCode.PERMISSION_DENIED,
    INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    CONFLICT: grpc.StatusCode.FAILED_PRECONDITION,
    NOT_ENDED: grpc.StatusCode.FAILED_PRECONDITION,
}
_RECENT_ADMITS = 4096


class _Refused(Rejected):
    """An admission refusal: its status code, and its kind in the trailing metadata."""

    def __init__(self, exc: AdmissionError) -> None:
        super().__init__(_CODES[exc.code], exc.reason)
        self.refusal = exc.code


def _abort(context: grpc.ServicerContext, exc: Rejected) -> None:
    """End the call with ``exc``'s status; an admission refusal also names its kind
    (``REFUSAL_KEY``), so a caller can tell "try again later" from a refusal."""
    if isinstance(exc, _Refused):
        context.set_trailing_metadata(((REFUSAL_KEY, exc.refusal),))
    context.abort(exc.code, exc.reason)


@dataclass
class _Served:
    """An active session on this node."""

    record: SessionRecord
    transport: SessionTransport
    host: PartyHost
    stop: threading.Event
    thread: threading.Thread | None = None
    restarting: bool = False


class Node:
    """Trainer or verifier node ``name`` on ``listen`` with its own bundle ``certs_dir``."""

    def __init__(
        self,
        role: str,
        name: str,
        listen: str,
        certs_dir: Path,
        state_dir: Path,
        capacity: int = 4,
        *,
        state: NodeState | None = None,
        limits: TransportLimits | None = None,
        device: str = "cpu",
        send_timeout: float = 30.0,
        session_idle_s: float = 900.0,
    ) -> None:
        if role not in SHARED:
            raise ValueError(f"unknown role {role!r}: a node is a trainer or a verifier")
        self.role, self.name = role, validate_party_name(name)
        self.listen = _check_address(listen, "listen")
        self.certs_dir, self.state_dir = Path(certs_dir), Path(state_dir)
        self._credentials = load_party_credentials(self.certs_dir, name)
        self.limits = limits or TransportLimits()
        self.device, self.send_timeout = device, send_timeout
        if not session_idle_s > 0:
            raise ValueError(f"session_idle_s must be positive, got {session_idle_s}")
        self.session_idle_s = session_idle_s
        self.state = state or SqliteState(self.state_dir)
        self.admission = Admission(self.state, name, role, capacity)
        self.server_limits = _node_limits(self.limits, capacity)
        self.streams = Streams(name, self.server_limits)
        self._served: dict[str, _Served] = {}
        self._admits: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()
        self._serving = threading.Lock()
        self._stop = threading.Event()
        self._server: grpc.Server | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._threads: list[threading.Thread] = []
        self.port: int | None = None

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> Node:
        """Listen, lapse reservations as they expire, serve the active sessions again."""
        handler = grpc.stream_unary_rpc_method_handler(self._deliver)
        server, self._executor, port = start_tls_server(
            self.name,
            self.listen,
            self._credentials,
            {
                "Deliver": handler,
                "DeliverOne": handler,
                "Fetch": grpc.unary_stream_rpc_method_handler(
                    self._fetch, response_serializer=FileChunk.SerializeToString
                ),
            },
            self.server_limits,
            DEFAULT_ENVELOPE_BYTES,
            f"clicooper-node-{self.name}",
        )
        self.streams.start()
        self._server, self.port = server, port
        if self.listen.rpartition(":")[2] == "0":  # port 0: the port that was picked
            self.listen = f"{self.listen.rpartition(':')[0]}:{port}"
        expiry = threading.Thread(target=self._expire, name=f"node-{self.name}-expiry")
        expiry.start()
        self._threads.append(expiry)
        for record in self.state.sessions():
            if record.state == ACTIVE:
                log.info("%s: serving %s again (%s)", self.name, record.session, record.party)
                try:
                    self._serve(record)
                except AdmissionError as exc:  # that session is aborted; the others go on
                    log.error("%s: %s", self.name, exc.reason)
        log.info("%s: %s node listening on %s", self.name, self.role, self.listen)
        return self

    def stop(self) -> None:
        """Stop serving (active sessions stay active: a restart serves them again)."""
        self._stop.set()
        with self._lock:
            served = list(self._served.values())
        for s in served:
            s.stop.set()
        for s in served:
            if s.thread is not None:
                s.thread.join(timeout=30)
        if self._server is not None:
            self._server.stop(grace=1.0).wait()
            self.streams.stop()
            self._server = None
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        for thread in self._threads:
            thread.join(timeout=10)
        self.state.close()

    def __enter__(self) -> Node:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def request_stop(self) -> None:
        """Make :meth:`wait` return (safe from a signal handler)."""
        self._stop.set()

    def wait(self) -> None:
        """Block until :meth:`stop` (from a signal handler or another thread)."""
        self._stop.wait()

    def exit_with_parent(self, parent_pid: int, poll: float = 0.2) -> None:
        """Make :meth:`wait` return once process ``parent_pid`` is no longer this process's
        parent (a launch's own nodes: its owner process died, kill -9 included). Its
        sessions stay active, so a node started again on the same state serves them."""

        def watch() -> None:
            while not self._stop.wait(poll):
                if os.getppid() != parent_pid:
                    log.warning("%s: the launching process is gone; stopping", self.name)
                    self.request_stop()

        thread = threading.Thread(target=watch, name=f"node-{self.name}-parent", daemon=True)
        thread.start()
        self._threads.append(thread)

    def sessions(self) -> list[dict[str, Any]]:
        """Every session this node knows, as ``node status`` shows it."""
        return [r.summary() for r in self.state.sessions()]

    def session_dir(self, session: str) -> Path:
        return self.state_dir / SESSIONS_DIR / session

    # -- the wire ------------------------------------------------------------

    def _deliver(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        """Read the first envelope, route the stream by its session id."""
        try:
            identity = peer_name(context)
            with self.streams.admit(identity, context) as stream:
                chunks = stream.chunks(requests)
                try:
                    first = next(chunks, None)
                    if first is None:
                        raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, "empty stream")
                    env = parse_envelope(first)
                    rest = itertools.chain([first], chunks)
                    if env.session_id.partition(".")[0] == ADMIT:
                        self._admit(identity, env, rest)
                    else:
                        self._route(env).accept(identity, rest)
                except (Rejected, grpc.RpcError) as exc:
                    if stream.cut is not None:
                        raise Rejected(grpc.StatusCode.DEADLINE_EXCEEDED, stream.cut) from None
                    if isinstance(exc, grpc.RpcError):
                        raise Rejected(grpc.StatusCode.CANCELLED, "stream cancelled") from None
                    raise
        except Rejected as exc:
            log.warning("%s refused a message: %s", self.name, exc.reason)
            _abort(context, exc)
        return _OK

    def _route(self, env: Envelope) -> Receiver:
        """The receiver of the session and party ``env`` is for (refused if none)."""
        session = env.session_id.partition(".")[0]
        with self._lock:
            served = self._served.get(session)
        receiver = None
        if served is not None and served.record.party == env.receiver:
            receiver = served.transport.receiver
        if receiver is None:
            raise Rejected(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{self.name} serves no session {ascii(session[:64])} for "
                f"{ascii(env.receiver[:32])}",
            )
        return receiver

    def _fetch(self, raw: bytes, context: grpc.ServicerContext) -> Iterator[FileChunk]:
        """Every file of a finished session of the requesting owner (see :mod:`.artifacts`)."""
        try:
            identity = peer_name(context)
            with self.streams.admit(identity, context):
                env = parse_envelope(raw)
                if env.session_id.partition(".")[0] != ADMIT:
                    raise Rejected(
                        grpc.StatusCode.INVALID_ARGUMENT, "fetch takes an admit.<nonce> request"
                    )
                msg = self._admission_request(identity, env, iter([raw]))
                if msg.kind != Kind.CONTROL or msg.meta.get("op") != "fetch":
                    raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, "fetch takes op 'fetch'")
                try:
                    record = self.admission.ended(identity, msg.meta.get("session"))
                except AdmissionError as exc:
                    raise _Refused(exc) from None
        except Rejected as exc:
            log.warning("%s refused a fetch: %s", self.name, exc.reason)
            _abort(context, exc)
        log.info("%s: sending the files of %s to its owner", self.name, record.session)
        yield from stream_files(self.state_dir / SESSIONS_DIR / record.session, record.party)

    def _admission_request(self, identity: str, env: Envelope, chunks: Iterator[bytes]) -> Message:
        """An ``admit.<nonce>`` request, checked like any message; each nonce is used once."""
        with self._lock:
            if env.session_id in self._admits:
                raise Rejected(grpc.StatusCode.ABORTED, "replayed admission request")
        msg = Receiver(self.name, env.session_id, self.limits, {"do": identity}).accept(
            identity, chunks
        )
        with self._lock:
            if env.session_id in self._admits:
                raise Rejected(grpc.StatusCode.ABORTED, "replayed admission request")
            self._admits[env.session_id] = None
            while len(self._admits) > _RECENT_ADMITS:
                self._admits.popitem(last=False)
        return msg

    def _admit(self, identity: str, env: Envelope, chunks: Iterator[bytes]) -> None:
        """One admission request, checked like any message, then answered in the status."""
        msg = self._admission_request(identity, env, chunks)
        op = msg.meta.get("op") if msg.kind == Kind.CONTROL else None
        try:
            if op == "reserve":
                record = self.admission.reserve(identity, msg, self._servable)
                log.info(
                    "%s: reserved %s for %s as %s",
                    self.name,
                    record.session,
                    identity,
                    record.party,
                )
            elif op == "commit":
                self._serve(self.admission.commit(identity, msg.meta.get("session")))
            elif op == "rejoin":
                self._restart(self.admission.rejoin(identity, msg.meta.get("session")))
                log.info("%s: %s rejoined by its owner", self.name, msg.meta.get("session"))
            elif op == "abort":
                record = self.admission.abort(identity, msg.meta.get("session"))
                self._end(record.session)
                log.info("%s: %s aborted by its owner", self.name, record.session)
            else:
                raise AdmissionError(
                    INVALID, f"admission takes reserve, commit, rejoin or abort, not {op!r}"
                )
        except AdmissionError as exc:
            raise _Refused(exc) from None

    # -- sessions --------------------------------------------------------------

    def _servable(self, record: SessionRecord) -> None:
        session_config(record.settings, self.role, self.device)

    def _serve(self, record: SessionRecord) -> None:
        """Start serving an active session (a retried commit finds it served already)."""
        with self._serving:  # two commits of one session at once: one host
            if record.session not in self._served:
                self._start_host(record)

    def _restart(self, record: SessionRecord) -> None:
        """Serve an active session afresh, from its checkpoints, in the join epoch (its
        owner process died and a new one continues the run, as after a node restart)."""
        with self._serving:
            with self._lock:
                served = self._served.get(record.session)
            if served is not None:
                served.restarting = True
                served.stop.set()
                if served.thread is not None:
                    served.thread.join(timeout=60)
            self._start_host(record)

    def _start_host(self, record: SessionRecord) -> None:
        try:
            cfg = session_config(record.settings, self.role, self.device)
            directory = private_dir(private_dir(self.state_dir / SESSIONS_DIR) / record.session)
            host = PartyHost(self.role, record.party, cfg, directory)
            transport = SessionTransport(
                record, self.listen, self.certs_dir, self.name, self.limits, self.send_timeout
            )
        except (AdmissionError, ValueError, OSError) as exc:
            reason = exc.reason if isinstance(exc, AdmissionError) else _line(exc)
            self.admission.end(record.session, False, f"cannot serve it: {reason}")
            raise AdmissionError(
                INVALID, f"{self.name} cannot serve {record.session}: {reason}"
            ) from None
        served = _Served(record, transport, host, threading.Event())
        transport.rekey(None)  # routable at once, in the join epoch
        served.thread = threading.Thread(
            target=self._run, args=(served,), name=f"node-{self.name}-{record.session}"
        )
        with self._lock:
            self._served[record.session] = served
        served.thread.start()

    def _run(self, served: _Served) -> None:
        """Serve one session until its owner shuts it down (finished) or it is stopped."""
        session, reason = served.record.session, ""
        try:
            serve(served.host, served.transport, served.stop)
        except Exception as exc:  # one session's failure must not end the node
            reason = _line(exc)
            log.error("%s: session %s failed: %s", self.name, session, reason, exc_info=True)
        finally:
            with self._lock:
                if self._served.get(session) is served:
                    del self._served[session]
        if self._stop.is_set() or served.restarting:
            return  # the node is stopping, or serving it afresh: the session stays active
        finished = not reason and not served.stop.is_set()
        if self.admission.end(session, finished, reason):
            log.info("%s: session %s %s", self.name, session, "finished" if finished else "ended")

    def _end(self, session: str) -> None:
        with self._lock:
            served = self._served.get(session)
        if served is not None:
            served.stop.set()
            if served.thread is not None and served.thread is not threading.current_thread():
                served.thread.join(timeout=30)

    def _expire(self) -> None:
        """Lapse reservations past their TTL, and end sessions whose owner went silent."""
        while not self._stop.wait(0.25):
            for session in self.admission.expire():
                log.info("%s: reservation of %s expired", self.name, session)
            self._end_idle()

    def _end_idle(self) -> None:
        """An active session that took no message for ``session_idle_s`` has lost its owner
        (it died, or it never came after its commit): it is aborted, its slot freed."""
        now = time.monotonic()
        with self._lock:
            idle = [
                s
                for s in self._served.values()
                if now - s.transport.last_message > self.session_idle_s
            ]
        for served in idle:
            reason = f"no message for {self.session_idle_s:g} s: its owner is gone"
            if self.admission.end(served.record.session, False, reason):
                log.warning("%s: session %s %s", self.name, served.record.session, reason)
            served.stop.set()


def session_config(settings: Any, role: str, device: str) -> RunConfig:
    """The config a node serves a session with: the owner's shared settings, the node's
    own device. Refused (:class:`AdmissionError`) when the settings are not exactly the
    ones a party of ``role`` shares, or do not make a valid config."""
    keys = set(SHARED[role])
    if not isinstance(settings, dict) or set(settings) != keys:
        raise AdmissionError(
            INVALID, f"reserve: settings must name exactly {', '.join(sorted(keys))}"
        )
    try:
        return RunConfig.model_validate({**settings, "transport": "grpc", "device": device})
    except ValidationError as exc:
        raise AdmissionError(INVALID, f"reserve: settings: {one_line(exc)}") from None


def _node_limits(limits: TransportLimits, capacity: int) -> TransportLimits:
    """The server's stream and connection caps: one party's, for each of ``capacity``
    sessions (every session has its own links to the same peers)."""
    return limits.model_copy(
        update={
            "max_concurrent_streams": min(4096, limits.max_concurrent_streams * capacity),
            "max_streams_per_peer": limits.max_streams_per_peer * capacity,
            "max_connections": limits.max_connections * capacity,
        }
    )


def _line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]
