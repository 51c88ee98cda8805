"""Server side of the gRPC wire: every check a delivered message must pass.

The handler takes *raw bytes* (no request deserializer) and parses each
envelope itself, so malformed protobuf is answered with INVALID_ARGUMENT and a
clear message rather than grpc's generic INTERNAL error. A stream is accepted
only when all of these hold, and a rejection changes no state:

* the sender named in the envelope is the Common Name of the TLS client
  certificate (mutual TLS already proved the certificate chains to the session
  CA), the receiver is this party and the session id is this session's;
* the kind is a known :class:`Kind`, ``meta_json`` is a JSON object, the chunks
  arrive in order with identical headers and their total stays within
  ``max_message_bytes``;
* the payload decodes as safetensors with finite values;
* ``seq`` is exactly one more than the last accepted seq of that sender
  (replays and reordering are refused). Check and commit happen under one lock,
  so two concurrent streams with the same seq cannot both be accepted.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
from google.protobuf.message import DecodeError

from clicooper.common.messages import Kind, Message, ProtocolError
from clicooper.common.serde import decode_tensors
from clicooper.proto import Ack, Envelope

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


class Receiver:
    """Validates delivered streams for party ``name`` and queues accepted messages."""

    def __init__(self, name: str, session_id: str, max_message_bytes: int) -> None:
        self.name = name
        self.session_id = session_id
        self.max_message_bytes = max_message_bytes
        self.inbox: queue.Queue[Message] = queue.Queue()
        self._last_seq: dict[str, int] = {}
        self._lock = threading.Lock()

    def handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        """``Deliver`` and ``DeliverOne``: raw request bytes in, serialized Ack out."""
        return {
            "Deliver": grpc.stream_unary_rpc_method_handler(self.deliver),
            "DeliverOne": grpc.unary_unary_rpc_method_handler(self.deliver_one),
        }

    def deliver_one(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        """``DeliverOne``: the stream of one envelope; a longer message fails its chunk check."""
        return self.deliver(iter((request,)), context)

    def deliver(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        """gRPC entry point; a :class:`Rejected` becomes the call's status code."""
        try:
            self.accept(_peer_name(context), requests)
        except Rejected as exc:
            log.warning("%s refused a message: %s", self.name, exc.reason)
            context.abort(exc.code, exc.reason)
        return _OK

    def accept(self, peer: str, requests: Iterator[bytes]) -> Message:
        """Read one stream from the authenticated ``peer``, check it and queue it."""
        header, payload = self._reassemble(peer, requests)
        msg = Message(
            kind=Kind(header.kind),
            step=header.step,
            sender=header.sender,
            receiver=header.receiver,
            tensors=_decode_payload(payload),
            meta=_meta_object(header.meta_json),
        )
        with self._lock:  # check-and-commit: one seq is accepted at most once
            self._check_seq(header)
            self._last_seq[header.sender] = header.seq
            self.inbox.put(msg)
        return msg

    def _reassemble(self, peer: str, requests: Iterator[bytes]) -> tuple[_Header, bytes]:
        header: _Header | None = None
        payload = bytearray()
        received = 0
        for raw in requests:
            env = _parse(raw)
            if header is None:
                header = self._check_header(_Header.of(env), peer)
            elif _Header.of(env) != header:
                _reject(grpc.StatusCode.INVALID_ARGUMENT, "chunk header differs from chunk 0")
            _check_chunk(env, received, header.chunk_count)
            if len(payload) + len(env.payload) > self.max_message_bytes:
                _reject(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"message exceeds the {self.max_message_bytes}-byte limit",
                )
            payload += env.payload
            received += 1
        if header is None:
            _reject(grpc.StatusCode.INVALID_ARGUMENT, "empty stream: no envelope")
        if received != header.chunk_count:
            _reject(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"stream ended after {received} of {header.chunk_count} chunks",
            )
        return header, bytes(payload)

    def _check_header(self, header: _Header, peer: str) -> _Header:
        """Identity, route, session, kind, meta and framing; cheap checks first."""
        denied = grpc.StatusCode.PERMISSION_DENIED
        if header.sender != peer:
            _reject(
                denied, f"sender {_show(header.sender)} does not match TLS identity {_show(peer)}"
            )
        if header.receiver != self.name:
            _reject(denied, f"message for {_show(header.receiver)} delivered to {self.name!r}")
        if header.session_id != self.session_id:
            _reject(denied, f"session {_show(header.session_id)} is not this party's session")
        if header.kind not in Kind._value2member_map_:
            _reject(grpc.StatusCode.INVALID_ARGUMENT, f"unknown message kind {_show(header.kind)}")
        _meta_object(header.meta_json)
        if header.chunk_count < 1:
            _reject(grpc.StatusCode.INVALID_ARGUMENT, "chunk_count must be at least 1")
        with self._lock:  # early refusal of replays, before reading a large payload
            self._check_seq(header)
        return header

    def _check_seq(self, header: _Header) -> None:
        expected = self._last_seq.get(header.sender, 0) + 1
        if header.seq != expected:
            what = "replayed" if header.seq < expected else "out-of-order"
            _reject(
                grpc.StatusCode.ABORTED,
                f"{what} seq {header.seq} from {header.sender!r}: expected {expected}",
            )


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
