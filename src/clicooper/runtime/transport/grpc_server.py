"""Server side of the gRPC wire: every check a delivered message must pass.

The handler takes *raw bytes* (no request deserializer) and parses each
envelope itself, so malformed protobuf is answered with INVALID_ARGUMENT and a
clear message rather than grpc's generic INTERNAL error. A stream is accepted
only when all of these hold, and a rejection changes no state:

* the sender named in the envelope is the Common Name of the TLS client
  certificate (mutual TLS already proved the certificate chains to the session
  CA), the receiver is this party and the session id is this session's;
* the kind is a known :class:`Kind`, ``meta_json`` is a JSON object within the
  kind's ``max_meta_bytes``, the chunks arrive in order with identical headers;
* the payload's safetensors header, read as soon as its bytes are in and before
  any tensor is decoded, is within the kind's ``max_header_bytes`` and declares at
  most ``max_tensors`` tensors and at most ``max_bytes`` (and ``max_message_bytes``)
  in all, which the payload then matches exactly;
* the inbox has room: fewer than ``max_inbox_messages`` waiting and, reserved as the
  bytes arrive, twice the payload (bytes and decoded copy) within ``max_inbox_bytes``;
* the payload decodes as safetensors with finite values;
* ``seq`` is exactly one more than the last accepted seq of that sender
  (replays and reordering are refused). Check and commit happen under one lock,
  so two concurrent streams with the same seq cannot both be accepted.

Streams are admitted up to ``max_concurrent_streams`` in all and
``max_streams_per_peer`` per peer, and :class:`Streams` cuts one that stalls
(see :class:`~clicooper.config.TransportLimits`). Every refusal names the limit.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NoReturn

import grpc
from google.protobuf.message import DecodeError

from clicooper.common.messages import Kind, Message, ProtocolError
from clicooper.common.serde import (
    HEADER_LENGTH_BYTES,
    SAFETENSORS_MAX_HEADER,
    decode_tensors,
    header_length,
    scan_header,
)
from clicooper.config import TransportLimits
from clicooper.proto import SERVICE_NAME, Ack, Envelope
from clicooper.runtime.transport.grpc_wire import server_options

log = logging.getLogger(__name__)
_OK = Ack(ok=True).SerializeToString()


class Rejected(Exception):
    """A delivered stream that fails a check; becomes the RPC's status."""

    def __init__(self, code: grpc.StatusCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class _Header:
    """The fields every chunk of one message repeats."""

    session_id: str
    seq: int
    step: int
    kind: str
    sender: str
    receiver: str
    meta_json: str
    chunk_count: int

    @classmethod
    def of(cls, env: Envelope) -> _Header:
        return cls(
            env.session_id,
            env.seq,
            env.step,
            env.kind,
            env.sender,
            env.receiver,
            env.meta_json,
            env.chunk_count,
        )


class Inbox:
    """Accepted messages waiting for ``recv``, bounded in count and in bytes.

    Bytes are held from the moment they arrive: a stream being read reserves twice
    each chunk (the bytes, then their decoded copy), a queued message its payload
    size until it is taken. So queued plus in-flight payload never exceeds
    ``max_inbox_bytes``, whatever the peers send.
    """

    def __init__(self, name: str, limits: TransportLimits) -> None:
        self.name, self.limits = name, limits
        self._cond = threading.Condition()
        self._queue: deque[tuple[Message, int]] = deque()
        self._held = 0

    def check_count(self) -> None:
        """Refuse at once when ``max_inbox_messages`` are waiting."""
        with self._cond:
            self._check_count()

    def check_room(self, nbytes: int) -> None:
        """Refuse at once when ``nbytes`` more would not fit (nothing is reserved)."""
        with self._cond:
            self._check_room(nbytes)

    def reserve(self, nbytes: int) -> None:
        with self._cond:
            self._check_room(nbytes)
            self._held += nbytes

    def release(self, nbytes: int) -> None:
        with self._cond:
            self._held -= nbytes

    def put(self, msg: Message, nbytes: int) -> None:
        """Queue ``msg``, which keeps ``nbytes`` already reserved until it is taken."""
        with self._cond:
            self._check_count()
            self._queue.append((msg, nbytes))
            self._cond.notify()

    def get(self, timeout: float | None = None) -> Message:
        """The oldest message; :class:`queue.Empty` after ``timeout`` seconds."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._queue, timeout):
                raise queue.Empty
            msg, nbytes = self._queue.popleft()
            self._held -= nbytes
        return msg

    def _check_count(self) -> None:
        if len(self._queue) >= self.limits.max_inbox_messages:
            _reject(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"inbox of {self.name} is full: {len(self._queue)} messages wait, at "
                f"limits.max_inbox_messages {self.limits.max_inbox_messages}",
            )

    def _check_room(self, nbytes: int) -> None:
        if self._held + nbytes > self.limits.max_inbox_bytes:
            _reject(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"inbox of {self.name} is full: {self._held} bytes held, {nbytes} more would "
                f"pass limits.max_inbox_bytes {self.limits.max_inbox_bytes}",
            )


class _Hold:
    """The inbox bytes one stream holds; whatever is left is released at the end."""

    def __init__(self, inbox: Inbox) -> None:
        self.inbox, self.bytes = inbox, 0

    def reserve(self, nbytes: int) -> None:
        self.inbox.reserve(nbytes)
        self.bytes += nbytes

    def release(self, nbytes: int | None = None) -> None:
        nbytes = self.bytes if nbytes is None else nbytes
        self.inbox.release(nbytes)
        self.bytes -= nbytes


class _Payload:
    """One message's payload, checked against its kind's caps chunk by chunk.

    The safetensors header is read as soon as its bytes are in (the 8-byte length
    first), so an oversized header, too many tensors or too many declared bytes are
    refused before the rest of the payload is read, and nothing is decoded.
    """

    def __init__(self, kind: str, limits: TransportLimits, hold: _Hold) -> None:
        self.kind, self.hold = kind, hold
        self.group, self.caps = limits.caps(kind)
        if self.caps.max_bytes < limits.max_message_bytes:
            self.limit, self.limit_name = self.caps.max_bytes, f"limits.{self.group}.max_bytes"
        else:
            self.limit, self.limit_name = limits.max_message_bytes, "limits.max_message_bytes"
        self.chunks: list[bytes] = []
        self.size = 0
        self.total: int | None = None  # declared by the header, once it is read
        self._head = bytearray()  # the header's bytes until it is read (bounded by the cap)

    def add(self, data: bytes, last: bool) -> None:
        size = self.size + len(data)
        if self.total is not None and size > self.total:
            self._malformed(f"more than the {self.total} bytes its header declares")
        if size > self.limit:
            self._too_big(size)
        self.hold.reserve(2 * len(data))  # the bytes, then their decoded copy
        self.chunks.append(data)
        self.size = size
        if self.total is None:
            self._read_header(data, last)

    def join(self) -> bytes:
        if self.size != self.total:
            self._malformed(f"{self.size} bytes where its header declares {self.total}")
        payload = b"".join(self.chunks)
        self.chunks.clear()
        return payload

    def _read_header(self, data: bytes, last: bool) -> None:
        if self._head or len(data) < HEADER_LENGTH_BYTES:  # the header spans chunks
            room = HEADER_LENGTH_BYTES + self.caps.max_header_bytes - len(self._head)
            self._head += data[:room]
            data = self._head
        if len(data) < HEADER_LENGTH_BYTES:
            if last:
                self._malformed(f"{self.size} bytes, shorter than a header length")
            return
        length = header_length(data)
        end = HEADER_LENGTH_BYTES + length
        if length > SAFETENSORS_MAX_HEADER or (last and end > self.size):  # not safetensors
            self._malformed(f"a {length}-byte header, {self.size} bytes received")
        if length > self.caps.max_header_bytes:
            self._over(f"a {length}-byte safetensors header", "max_header_bytes")
        if len(data) < end:
            if not self._head:
                self._head += data
            return
        self._check_declared(bytes(data[HEADER_LENGTH_BYTES:end]), end)

    def _check_declared(self, header: bytes, end: int) -> None:
        """The caps on what the complete JSON header declares; fixes the total size."""
        try:
            tensors, data_bytes = scan_header(header)
        except ProtocolError as exc:
            _reject(grpc.StatusCode.INVALID_ARGUMENT, _one_line(str(exc)))
        if tensors > self.caps.max_tensors:
            self._over(f"{tensors} tensors", "max_tensors")
        total = end + data_bytes
        if total > self.limit:
            self._too_big(total)
        self.hold.inbox.check_room(2 * (total - self.size))  # refuse now, not after reading
        self.total, self._head = total, bytearray()
        if self.size > total:
            self._malformed(f"more than the {total} bytes its header declares")

    def _over(self, what: str, cap: str) -> NoReturn:
        value = getattr(self.caps, cap)
        _reject(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"{self.kind} message has {what}, over limits.{self.group}.{cap} {value}",
        )

    def _too_big(self, size: int) -> NoReturn:
        _reject(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"{self.kind} payload of {size} bytes exceeds the {self.limit}-byte limit "
            f"({self.limit_name})",
        )

    @staticmethod
    def _malformed(what: str) -> NoReturn:
        _reject(grpc.StatusCode.INVALID_ARGUMENT, f"malformed safetensors payload: {what}")


@dataclass(eq=False)
class _Stream:
    """One stream being read; :class:`Streams` cuts it once it stalls or runs too long."""

    peer: str
    context: grpc.ServicerContext
    opened: float = field(default_factory=time.monotonic)
    last: float = field(default_factory=time.monotonic)
    reading: bool = True
    cut: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def chunks(self, requests: Iterator[bytes]) -> Iterator[bytes]:
        """``requests``, noting when each arrives; a cut stream yields no message."""
        for raw in requests:
            self.last = time.monotonic()
            yield raw
        with self.lock:  # from here on the time is the server's (decoding), not the peer's
            if self.cut is not None:
                _reject(grpc.StatusCode.DEADLINE_EXCEEDED, self.cut)
            self.reading = False

    def overdue(self, now: float, limits: TransportLimits) -> str | None:
        """Why the stream must be cut now (and mark it cut), or None."""
        with self.lock:
            if not self.reading or self.cut is not None:
                return None
            if now - self.opened > limits.delivery_deadline_s:
                self.cut = (
                    f"stream from {self.peer} still sending after "
                    f"limits.delivery_deadline_s {limits.delivery_deadline_s} s"
                )
            elif now - self.last > limits.stream_idle_timeout_s:
                self.cut = (
                    f"stream from {self.peer} sent no chunk for "
                    f"limits.stream_idle_timeout_s {limits.stream_idle_timeout_s} s"
                )
            return self.cut


class Streams:
    """Admits streams up to the caps and cuts stalled ones.

    A synchronous gRPC handler blocks in ``next(requests)`` while its client sends
    nothing, and only the client's own deadline would end that. So a reaper thread
    looks at every stream a few times per timeout and cancels the call of one that is
    idle past ``stream_idle_timeout_s`` or open past ``delivery_deadline_s``, which
    wakes its handler and frees its worker thread. (A cancelled call carries no
    status text to the client, which sees CANCELLED; the server logs the limit.)
    """

    def __init__(self, name: str, limits: TransportLimits) -> None:
        self.name, self.limits = name, limits
        self._cond = threading.Condition()
        self._open: set[_Stream] = set()
        self._per_peer: dict[str, int] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False

    @contextmanager
    def admit(self, peer: str, context: grpc.ServicerContext) -> Iterator[_Stream]:
        """Register a stream from ``peer`` for its lifetime; refused past the caps."""
        with self._cond:
            self._check_caps(peer)
            stream = _Stream(peer, context)
            self._open.add(stream)
            self._per_peer[peer] = self._per_peer.get(peer, 0) + 1
        try:
            yield stream
        finally:
            with self._cond:
                self._open.discard(stream)
                self._per_peer[peer] -= 1
                if not self._per_peer[peer]:
                    del self._per_peer[peer]

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._reap, name=f"clicooper-grpc-{self.name}-reaper", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()

    def _check_caps(self, peer: str) -> None:
        busy = grpc.StatusCode.RESOURCE_EXHAUSTED
        cap = self.limits.max_concurrent_streams
        if len(self._open) >= cap:
            _reject(
                busy,
                f"{self.name} reads {len(self._open)} streams, at "
                f"limits.max_concurrent_streams {cap}",
            )
        mine, cap = self._per_peer.get(peer, 0), self.limits.max_streams_per_peer
        if mine >= cap:
            _reject(
                busy,
                f"{_show(peer)} has {mine} streams open to {self.name}, at "
                f"limits.max_streams_per_peer {cap}",
            )

    def _reap(self) -> None:
        shortest = min(self.limits.stream_idle_timeout_s, self.limits.delivery_deadline_s)
        tick = min(max(shortest / 4, 0.02), 1.0)
        while True:
            with self._cond:
                self._cond.wait(tick)
                if self._stopping:
                    return
                streams = list(self._open)
            now = time.monotonic()
            for stream in streams:
                if stream.overdue(now, self.limits) is not None:
                    stream.context.cancel()  # wakes the handler, which logs the reason


class Receiver:
    """Validates delivered streams for party ``name`` and queues accepted messages."""

    def __init__(
        self,
        name: str,
        session_id: str,
        limits: TransportLimits,
        identities: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.session_id = session_id
        self.limits = limits
        # identities: the certificate name each sender must hold (a node's peers are not
        # named after their roles); None: the sender's name itself
        self.identities = identities
        self.inbox = Inbox(name, limits)
        self.streams = Streams(name, limits)
        self._last_seq: dict[str, int] = {}
        self._lock = threading.Lock()

    def handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        """``Deliver`` and ``DeliverOne``: raw request bytes in, serialized Ack out.

        ``DeliverOne`` is a unary call for the client but is served as a stream (the
        wire is the same): a unary handler's worker thread would wait for the request
        before any code of ours runs, beyond the reach of the idle timeout. A stream
        of more than one envelope fails its chunk check, as for ``Deliver``.
        """
        handler = grpc.stream_unary_rpc_method_handler(self.deliver)
        return {"Deliver": handler, "DeliverOne": handler}

    def deliver(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        """gRPC entry point; a :class:`Rejected` becomes the call's status code."""
        try:
            peer = _peer_name(context)
            with self.streams.admit(peer, context) as stream:
                self._accept_stream(peer, stream, requests)
        except Rejected as exc:
            log.warning("%s refused a message: %s", self.name, exc.reason)
            context.abort(exc.code, exc.reason)
        return _OK

    def _accept_stream(self, peer: str, stream: _Stream, requests: Iterator[bytes]) -> None:
        try:
            self.accept(peer, stream.chunks(requests))
        except (Rejected, grpc.RpcError) as exc:
            if stream.cut is not None:  # whatever the handler saw after the cut
                _reject(grpc.StatusCode.DEADLINE_EXCEEDED, stream.cut)
            if isinstance(exc, grpc.RpcError):
                _reject(grpc.StatusCode.CANCELLED, f"{peer} cancelled its stream")
            raise

    def accept(self, peer: str, requests: Iterator[bytes]) -> Message:
        """Read one stream from the authenticated ``peer``, check it and queue it."""
        hold = _Hold(self.inbox)
        try:
            header, meta, payload = self._reassemble(peer, requests, hold)
            tensors = _decode_payload(payload)
            del payload
            hold.release(hold.bytes // 2)  # the bytes are gone, their decoded copy stays
            msg = Message(
                kind=Kind(header.kind),
                step=header.step,
                sender=header.sender,
                receiver=header.receiver,
                tensors=tensors,
                meta=meta,
            )
            with self._lock:  # check-and-commit: one seq is accepted at most once
                self._check_seq(header)
                self.inbox.put(msg, hold.bytes)
                hold.bytes = 0  # the inbox holds them now
                self._last_seq[header.sender] = header.seq
            return msg
        finally:
            hold.release()

    def _reassemble(
        self, peer: str, requests: Iterator[bytes], hold: _Hold
    ) -> tuple[_Header, dict[str, Any], bytes]:
        header: _Header | None = None
        payload: _Payload | None = None
        received = 0
        for raw in requests:
            env = _parse(raw)
            if header is None:
                header, meta = self._check_header(_Header.of(env), peer)
                payload = _Payload(header.kind, self.limits, hold)
            elif _Header.of(env) != header:
                _reject(grpc.StatusCode.INVALID_ARGUMENT, "chunk header differs from chunk 0")
            _check_chunk(env, received, header.chunk_count)
            received += 1
            payload.add(env.payload, last=received == header.chunk_count)
        if header is None or payload is None:
            _reject(grpc.StatusCode.INVALID_ARGUMENT, "empty stream: no envelope")
        if received != header.chunk_count:
            _reject(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"stream ended after {received} of {header.chunk_count} chunks",
            )
        return header, meta, payload.join()

    def _check_header(self, header: _Header, peer: str) -> tuple[_Header, dict[str, Any]]:
        """Identity, route, session, kind, meta, framing and inbox room; cheap checks first."""
        denied = grpc.StatusCode.PERMISSION_DENIED
        identity = header.sender if self.identities is None else self.identities.get(header.sender)
        if identity != peer:
            _reject(
                denied, f"sender {_show(header.sender)} does not match TLS identity {_show(peer)}"
            )
        if header.receiver != self.name:
            _reject(denied, f"message for {_show(header.receiver)} delivered to {self.name!r}")
        if header.session_id != self.session_id:
            _reject(denied, f"session {_show(header.session_id)} is not this party's session")
        if header.kind not in Kind._value2member_map_:
            _reject(grpc.StatusCode.INVALID_ARGUMENT, f"unknown message kind {_show(header.kind)}")
        group, caps = self.limits.caps(header.kind)
        meta_bytes = len(header.meta_json.encode())
        if meta_bytes > caps.max_meta_bytes:
            _reject(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{header.kind} meta of {meta_bytes} bytes is over "
                f"limits.{group}.max_meta_bytes {caps.max_meta_bytes}",
            )
        meta = _meta_object(header.meta_json)
        if header.chunk_count < 1:
            _reject(grpc.StatusCode.INVALID_ARGUMENT, "chunk_count must be at least 1")
        self.inbox.check_count()
        with self._lock:  # early refusal of replays, before reading a large payload
            self._check_seq(header)
        return header, meta

    def _check_seq(self, header: _Header) -> None:
        expected = self._last_seq.get(header.sender, 0) + 1
        if header.seq != expected:
            what = "replayed" if header.seq < expected else "out-of-order"
            _reject(
                grpc.StatusCode.ABORTED,
                f"{what} seq {header.seq} from {header.sender!r}: expected {expected}",
            )


def start_tls_server(
    name: str,
    listen: str,
    credentials: tuple[bytes, bytes, bytes],
    handlers: dict[str, grpc.RpcMethodHandler],
    limits: TransportLimits,
    envelope_bytes: int,
    thread_prefix: str,
) -> tuple[grpc.Server, ThreadPoolExecutor, int]:
    """A started mutual-TLS server of ``name`` on ``listen``: (server, executor, bound port).

    Clients must present a certificate of the CA in ``credentials`` (ca, cert, key).
    A thread for every admitted stream (``max_concurrent_streams`` plus
    ``max_streams_per_peer`` of headroom, which runs the refusals past the caps), so a
    stalled stream cannot hold back others; gRPC refuses calls beyond it rather than
    queueing them behind busy threads. The caller stops the server, then shuts the
    executor down. Binding happens here and only here: a transport used as a client only
    (``EpochTransport.send_join``, admission requests, a node session's sender) never
    calls this, so it may share the address of a party's listening server. A port that
    is taken or invalid raises :class:`OSError` (gRPC returns 0 or raises RuntimeError).
    """
    ca_pem, cert_pem, key_pem = credentials
    creds = grpc.ssl_server_credentials(
        [(key_pem, cert_pem)], root_certificates=ca_pem, require_client_auth=True
    )
    workers = limits.max_concurrent_streams + limits.max_streams_per_peer
    executor = ThreadPoolExecutor(workers, thread_name_prefix=thread_prefix)
    server = grpc.server(
        executor,
        options=server_options(limits, envelope_bytes),
        maximum_concurrent_rpcs=workers,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    try:
        port = server.add_secure_port(listen, creds)
    except RuntimeError:
        port = 0
    if not port:
        server.stop(None)
        executor.shutdown(wait=False)
        raise OSError(f"{name} cannot listen on {listen}: address in use or invalid")
    server.start()
    return server, executor, port


def peer_name(context: grpc.ServicerContext) -> str:
    """The Common Name of the verified TLS client certificate (Rejected without one)."""
    return _peer_name(context)


def parse_envelope(raw: bytes) -> Envelope:
    """One envelope from the wire (Rejected as malformed protobuf otherwise)."""
    return _parse(raw)


def _peer_name(context: grpc.ServicerContext) -> str:
    """The Common Name of the verified TLS client certificate."""
    names = context.auth_context().get("x509_common_name") or []
    if len(names) != 1:
        _reject(grpc.StatusCode.PERMISSION_DENIED, "no verified client certificate")
    return names[0].decode("utf-8", "replace")


def _parse(raw: bytes) -> Envelope:
    try:
        return Envelope.FromString(raw)
    except DecodeError:
        _reject(grpc.StatusCode.INVALID_ARGUMENT, "malformed protobuf: not an Envelope")


def _check_chunk(env: Envelope, received: int, count: int) -> None:
    """In-order chunks; no chunk beyond ``count``; no empty chunk in a split message.

    Forbidding empty chunks bounds the number of chunks by the byte limit.
    """
    bad = grpc.StatusCode.INVALID_ARGUMENT
    if received >= count:
        _reject(bad, f"more chunks than chunk_count {count}")
    if env.chunk_index != received:
        _reject(bad, f"chunk {env.chunk_index} arrived where chunk {received} was expected")
    if count > 1 and not env.payload:
        _reject(bad, f"chunk {received} of a split message is empty")


def _decode_payload(payload: bytes) -> dict[str, Any]:
    try:
        return decode_tensors(payload)
    except ProtocolError as exc:
        _reject(grpc.StatusCode.INVALID_ARGUMENT, _one_line(str(exc)))
    except Exception as exc:  # a decoder bug must not take the server down
        _reject(grpc.StatusCode.INVALID_ARGUMENT, f"undecodable payload ({type(exc).__name__})")


def _meta_object(text: str) -> dict[str, Any]:
    """``meta_json`` as a dict; strict JSON (NaN/Infinity refused like in tensors)."""
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        _reject(grpc.StatusCode.INVALID_ARGUMENT, "meta_json is not valid JSON")
    if not isinstance(value, dict):
        _reject(grpc.StatusCode.INVALID_ARGUMENT, "meta_json is not a JSON object")
    return value


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def _reject(code: grpc.StatusCode, reason: str) -> NoReturn:
    raise Rejected(code, reason)


def _show(text: str, limit: int = 40) -> str:
    """A peer-supplied string, quoted, ASCII-escaped and truncated for an error line."""
    return ascii(text[:limit]) + ("..." if len(text) > limit else "")


def _one_line(text: str) -> str:
    return " ".join(text.split())[:300]
