"""One party per process over gRPC with mutual TLS (DESIGN.md section 8).

Each :class:`GrpcTransport` hosts exactly one party: a TLS server that accepts
messages addressed to it (see :mod:`.grpc_server` for every check) and one
client channel per peer it sends to. Both directions authenticate with the
session certificates from :mod:`clicooper.runtime.certs`: the server demands a
client certificate signed by the session CA and binds the envelope's sender to
its Common Name; the client checks that the server's certificate names the
peer it meant to reach.

Ordering and exactly-once delivery per (sender, receiver) link come from
sequence numbers: ``send`` is synchronous and holds the link while a message
is in flight, numbering messages 1, 2, 3, ...; the receiver accepts only the
next number. A message the peer rejects does not consume a number, so the
link stays usable after a rejection.

What a peer may cost this party is bounded by :class:`~clicooper.config.TransportLimits`
(inbox, streams, timeouts, connections, per-kind caps), each limit named in the error
it produces; see :mod:`.grpc_server`.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import grpc
from pydantic import ValidationError

from clicooper.common.checks import require_sender
from clicooper.common.messages import Kind, Message, ProtocolError
from clicooper.config import TransportLimits, one_line
from clicooper.proto import Envelope
from clicooper.runtime.certs import load_party_credentials, validate_party_name
from clicooper.runtime.transport.base import Party, Transport
from clicooper.runtime.transport.grpc_server import Receiver, start_tls_server
from clicooper.runtime.transport.grpc_wire import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_ENVELOPE_BYTES,
    HEADER_ROOM,
    UNREACHABLE,
    deliver,
    open_channel,
    rpc_status,
    split_message,
)

log = logging.getLogger(__name__)
_ADDRESS = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")


@dataclass
class _Link:
    """The sending half of one (this party, peer) link."""

    channel: grpc.Channel
    next_seq: int = 1
    lock: threading.Lock = field(default_factory=threading.Lock)
    sender: ThreadPoolExecutor | None = None  # one thread: delivers send_later() in order
    pending: int = 0  # send_later() messages not yet delivered
    failed: Exception | None = None  # a queued delivery failed: fail the ones behind it


class GrpcTransport(Transport):
    """The transport of party ``name``: a TLS server on ``listen``, TLS clients to ``peers``.

    ``listen`` and the peer addresses are "host:port"; port 0 picks a free port
    (read :attr:`port` after :meth:`start`). ``limits`` bounds what peers may cost
    this party (defaults: :class:`~clicooper.config.TransportLimits`);
    ``max_message_bytes``, when given, overrides ``limits.max_message_bytes``, the
    largest reassembled incoming message. ``chunk_bytes`` is the payload slice per
    envelope and ``envelope_bytes`` the gRPC per-message limit both ways.
    ``send_timeout`` bounds one delivery, including waiting for a peer that is
    still starting.
    """

    concurrent = True

    def __init__(
        self,
        name: str,
        listen: str,
        peers: dict[str, str],
        certs_dir: Path,
        session_id: str,
        max_message_bytes: int | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        *,
        envelope_bytes: int = DEFAULT_ENVELOPE_BYTES,
        send_timeout: float = 30.0,
        limits: TransportLimits | None = None,
        identity: str | None = None,
        peer_identities: dict[str, str] | None = None,
    ) -> None:
        self.name = validate_party_name(name)
        self.listen = _check_address(listen, "listen")
        self.peers = {validate_party_name(p): _check_address(a, p) for p, a in peers.items()}
        self.limits = _limits(limits, max_message_bytes)
        _check_sizes(chunk_bytes, envelope_bytes)
        if not session_id:
            raise ValueError("session_id is empty: give every party the same session id")
        self.session_id = session_id
        self.max_message_bytes = self.limits.max_message_bytes
        self.chunk_bytes = chunk_bytes
        self.envelope_bytes = envelope_bytes
        self.send_timeout = send_timeout
        self.bytes_sent = 0  # serialized envelope bytes, like InProcessTransport's count
        # identity: the certificate this party holds when it is not named after its role
        # (a node serving many sessions); peer_identities: each peer's certificate name
        # when it differs from the party name (see Receiver). Default: the party names.
        self.identity = validate_party_name(identity or name)
        peer_identities = peer_identities or {}
        self.peer_identities = {p: validate_party_name(c) for p, c in peer_identities.items()}
        self._credentials = load_party_credentials(Path(certs_dir), self.identity)
        self._receiver = Receiver(name, session_id, self.limits, self.peer_identities or None)
        self._links: dict[str, _Link] = {}
        self._lock = threading.Lock()
        self._server: grpc.Server | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._port: int | None = None
        self._closed = False

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> GrpcTransport:
        """Bind and start the TLS server (idempotent); returns ``self``."""
        with self._lock:
            if self._closed:
                raise RuntimeError(f"transport of {self.name!r} is closed: create a new one")
            if self._server is None:
                self._start_server()
        return self

    def _start_server(self) -> None:
        self._server, self._executor, self._port = start_tls_server(
            self.name,
            self.listen,
            self._credentials,
            self._receiver.handlers(),
            self.limits,
            self.envelope_bytes,
            f"clicooper-grpc-{self.name}",
        )
        self._receiver.streams.start()

    @property
    def port(self) -> int:
        """The bound port (useful with ``listen="host:0"``)."""
        if self._port is None:
            raise RuntimeError(f"transport of {self.name!r} is not started: call start() first")
        return self._port

    def close(self) -> None:
        """Stop the server (in-flight deliveries get one second) and close all channels."""
        with self._lock:
            self._closed = True
            server, executor, self._server, self._executor = (
                self._server,
                self._executor,
                None,
                None,
            )
            links, self._links = self._links, {}
        if server is not None:
            server.stop(grace=1.0).wait()
            self._receiver.streams.stop()
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
        for link in links.values():
            if link.sender is not None:
                link.sender.shutdown(wait=True, cancel_futures=True)
            link.channel.close()

    def __enter__(self) -> GrpcTransport:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- Transport ---------------------------------------------------------

    def send(self, msg: Message) -> None:
        """Deliver ``msg`` to its receiver and return once the receiver has queued it.

        Raises :class:`ProtocolError` when the peer refuses the message and
        :class:`ConnectionError` when it cannot be reached within ``send_timeout``.
        """
        if msg.sender != self.name:
            raise ProtocolError(f"{self.name} cannot send as {msg.sender!r}")
        link = self._link(msg.receiver)
        if link.pending:  # behind queued send_later() messages, to keep the order
            self.send_later(msg).result()
            return
        self._deliver(link, msg)

    def send_later(self, msg: Message) -> Future[None]:
        """Deliver ``msg`` from the link's sender thread; the future holds the outcome."""
        if msg.sender != self.name:
            raise ProtocolError(f"{self.name} cannot send as {msg.sender!r}")
        link = self._link(msg.receiver)
        with self._lock:
            if link.sender is None:
                link.sender = ThreadPoolExecutor(
                    1, thread_name_prefix=f"clicooper-grpc-send-{msg.receiver}"
                )
            link.pending += 1

        def deliver_in_turn() -> None:
            try:
                if link.failed is not None:  # never deliver past a message that was lost
                    raise ConnectionError(
                        f"{msg.kind} to {msg.receiver} not sent: an earlier message failed "
                        f"({link.failed})"
                    )
                self._deliver(link, msg)
            except Exception as exc:
                link.failed = link.failed or exc
                raise
            finally:
                with self._lock:
                    link.pending -= 1
                    if not link.pending:
                        link.failed = None

        return link.sender.submit(deliver_in_turn)

    def _deliver(self, link: _Link, msg: Message) -> None:
        with link.lock:
            envelopes = split_message(msg, self.session_id, link.next_seq, self.chunk_bytes)
            self._check_outgoing(msg, envelopes)
            try:
                ack = deliver(
                    link.channel, envelopes, timeout=self.send_timeout, wait_for_ready=True
                )
            except grpc.RpcError as exc:
                raise self._send_error(msg, link.next_seq, exc) from None
            if not ack.ok:
                raise ProtocolError(
                    f"{msg.receiver} refused {msg.kind} seq {link.next_seq}: {ack.error}"
                )
            link.next_seq += 1
        with self._lock:
            self.bytes_sent += sum(env.ByteSize() for env in envelopes)

    def recv(self, party: str, timeout: float | None = None) -> Message:
        """The next accepted message for this party; :class:`TimeoutError` after ``timeout`` s."""
        if party != self.name:
            raise ProtocolError(f"this transport serves {self.name!r}, not {party!r}")
        self.start()
        try:
            return self._receiver.inbox.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"{self.name} received no message within {timeout} s") from None

    # -- helpers -------------------------------------------------------------

    def _link(self, peer: str) -> _Link:
        with self._lock:
            if self._closed:
                raise ProtocolError(f"transport of {self.name!r} is closed")
            if peer not in self._links:
                if peer not in self.peers:
                    raise ProtocolError(
                        f"{self.name} has no address for peer {peer!r}: add it to peers"
                    )
                channel = open_channel(
                    self.peers[peer],
                    self.peer_identities.get(peer, peer),
                    self._credentials,
                    self.envelope_bytes,
                )
                self._links[peer] = _Link(channel)
            return self._links[peer]

    def _check_outgoing(self, msg: Message, envelopes: list[Envelope]) -> None:
        size = sum(len(env.payload) for env in envelopes)
        if size > self.max_message_bytes:
            raise ProtocolError(
                f"{msg.kind} payload of {size} bytes exceeds "
                f"max_message_bytes {self.max_message_bytes}"
            )
        if envelopes[0].ByteSize() > self.envelope_bytes:
            raise ProtocolError(f"meta of the {msg.kind} message is too large for one envelope")

    def _send_error(self, msg: Message, seq: int, exc: grpc.RpcError) -> Exception:
        code, details = rpc_status(exc)
        if code in UNREACHABLE:
            return ConnectionError(
                f"{self.name} could not reach {msg.receiver} at {self.peers[msg.receiver]} "
                f"within {self.send_timeout} s ({code.name}: {details})"
            )
        if code == grpc.StatusCode.CANCELLED:  # a cut call carries no text: say what cuts one
            return ProtocolError(
                f"{msg.receiver} cut {msg.kind} seq {seq} (CANCELLED): the stream passed its "
                "limits.stream_idle_timeout_s or limits.delivery_deadline_s there, or "
                f"{msg.receiver} is shutting down"
            )
        return ProtocolError(f"{msg.receiver} refused {msg.kind} seq {seq}: {code.name}: {details}")


def serve_forever(
    party: Party, transport: Transport, stop_event: threading.Event, poll: float = 0.2
) -> None:
    """Hand every message for ``party`` to ``party.handle`` until told to stop.

    Stops when ``stop_event`` is set or a CONTROL message with meta
    ``{"op": "shutdown"}`` arrives from the data owner (``do``; from anyone else it is
    refused like any unauthorised control op). A :class:`ProtocolError` raised by the party
    is answered with an ERROR message to the sender (when it can be reached)
    and serving goes on: one bad message must not end the session.
    """
    party.transport = transport
    while not stop_event.is_set():
        try:
            msg = transport.recv(party.name, timeout=poll)
        except TimeoutError:
            continue
        try:
            if msg.kind == Kind.CONTROL and msg.meta.get("op") == "shutdown":
                require_sender(msg, {"do"}, "shutdown", party.name)
                log.info("%s: shutdown requested by %s", party.name, msg.sender)
                return
            party.handle(msg)
        except ProtocolError as exc:
            log.warning("%s rejected %s from %s: %s", party.name, msg.kind, msg.sender, exc)
            _report_error(party, transport, msg, exc)


def _report_error(party: Party, transport: Transport, msg: Message, exc: ProtocolError) -> None:
    if msg.kind == Kind.ERROR:  # never answer an ERROR: two parties would bounce them forever
        return
    error = Message(
        Kind.ERROR,
        msg.step,
        party.name,
        msg.sender,
        meta={"error": str(exc), "kind": str(msg.kind)},
    )
    with contextlib.suppress(ProtocolError, ConnectionError):
        transport.send(error)


def _check_address(address: str, what: str) -> str:
    match = _ADDRESS.fullmatch(address) if isinstance(address, str) else None
    if match is None or int(match.group(2)) > 65535:
        raise ValueError(f"address of {what} {address!r} is not host:port (e.g. 127.0.0.1:50051)")
    return address


def _limits(limits: TransportLimits | None, max_message_bytes: int | None) -> TransportLimits:
    """``limits`` (or the defaults) with ``max_message_bytes`` applied, validated again."""
    limits = limits or TransportLimits()
    if max_message_bytes is None:
        return limits
    try:
        return TransportLimits.model_validate(
            {**limits.model_dump(), "max_message_bytes": max_message_bytes}
        )
    except ValidationError as exc:
        raise ValueError(one_line(exc)) from None


def _check_sizes(chunk_bytes: int, envelope_bytes: int) -> None:
    if not 0 < chunk_bytes <= envelope_bytes - HEADER_ROOM:
        raise ValueError(
            f"chunk_bytes {chunk_bytes} must be positive and at most envelope_bytes - "
            f"{HEADER_ROOM} ({envelope_bytes - HEADER_ROOM})"
        )
