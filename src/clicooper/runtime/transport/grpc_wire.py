"""Client side of the gRPC wire: channels, chunking and raw delivery (and the
server's connection options, :func:`server_options`).

A :class:`~clicooper.common.messages.Message` becomes one client stream of
``Envelope``s: the header (session, seq, step, kind, route, meta as JSON) is
repeated in every envelope and the safetensors payload is cut into slices of
at most ``chunk_bytes``. One gRPC message therefore never exceeds the
per-envelope limit, while a whole message may be far larger (up to the
receiver's ``max_message_bytes``).

:func:`send_stream` takes envelopes *or raw bytes*, because tests and fuzzers
must be able to put arbitrary, even non-protobuf, bytes on the wire through
the same code path the transport uses.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import grpc

from clicooper.common.messages import Message, ProtocolError
from clicooper.common.serde import encode_tensors
from clicooper.config import TransportLimits
from clicooper.proto import DELIVER_METHOD, DELIVER_ONE_METHOD, Ack, Envelope

MIB = 1 << 20
DEFAULT_CHUNK_BYTES = 1 * MIB
DEFAULT_ENVELOPE_BYTES = 4 * MIB
DEFAULT_MAX_MESSAGE_BYTES = TransportLimits().max_message_bytes
#: Room left in an envelope for its header (route, kind, meta JSON) beside the chunk.
HEADER_ROOM = 256 * 1024

Credentials = tuple[bytes, bytes, bytes]  # (ca_pem, cert_pem, key_pem)
#: Status codes meaning "the peer could not be reached", as opposed to "refused".
UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def channel_options(envelope_bytes: int) -> list[tuple[str, int | str]]:
    """Options shared by servers and channels.

    The HTTP proxy is disabled because parties talk to each other directly; an
    ``http_proxy`` variable in the environment must not reroute (or break)
    session traffic.
    """
    return [
        ("grpc.max_send_message_length", envelope_bytes),
        ("grpc.max_receive_message_length", envelope_bytes),
        ("grpc.enable_http_proxy", 0),
    ]


def server_options(limits: TransportLimits, envelope_bytes: int) -> list[tuple[str, int | str]]:
    """gRPC core options of a party's server: the connection-level limits.

    * ``so_reuseport`` off: a second process must not silently share our port.
    * ``grpc.server_handshake_timeout_ms``: a TCP connection that does not finish its
      TLS (and HTTP/2) handshake in ``handshake_timeout_s`` is closed (default 120 s).
    * ``grpc.max_allowed_incoming_connections``: at most ``max_connections`` open
      connections; more are closed on accept.
    * ``grpc.max_concurrent_streams``: HTTP/2 streams per connection, at
      ``max_streams_per_peer`` (the client queues more until one ends).
    * ``grpc.max_connection_idle_ms``: a connection without calls for
      ``connection_idle_s`` is closed (a channel reconnects when it next sends).
    * Ping policy pinned at gRPC's defaults (a client pinging without data more often
      than every 5 minutes gets two strikes, then GOAWAY), so an upgrade cannot loosen it.
    """
    return [
        *channel_options(envelope_bytes),
        ("grpc.so_reuseport", 0),
        ("grpc.server_handshake_timeout_ms", _ms(limits.handshake_timeout_s)),
        ("grpc.max_allowed_incoming_connections", limits.max_connections),
        ("grpc.max_concurrent_streams", limits.max_streams_per_peer),
        ("grpc.max_connection_idle_ms", _ms(limits.connection_idle_s)),
        ("grpc.http2.min_ping_interval_without_data_ms", 300_000),
        ("grpc.http2.max_ping_strikes", 2),
    ]


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def open_channel(
    address: str,
    peer: str,
    credentials: Credentials,
    envelope_bytes: int = DEFAULT_ENVELOPE_BYTES,
) -> grpc.Channel:
    """A mutual-TLS channel to ``peer`` at ``address`` ("host:port").

    The server certificate must chain to the session CA *and* carry the DNS
    name ``peer`` (``ssl_target_name_override``), so a different party
    listening at that address is refused even though its certificate is valid.
    """
    ca_pem, cert_pem, key_pem = credentials
    creds = grpc.ssl_channel_credentials(
        root_certificates=ca_pem, private_key=key_pem, certificate_chain=cert_pem
    )
    options = [
        *channel_options(envelope_bytes),
        ("grpc.ssl_target_name_override", peer),
        # Reconnect quickly while peers are still starting up.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
    ]
    return grpc.secure_channel(address, creds, options=options)


def encode_meta(msg: Message) -> str:
    """``msg.meta`` as strict JSON (no NaN/Infinity, which the receiver refuses)."""
    try:
        return json.dumps(msg.meta, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"meta of the {msg.kind} message is not plain JSON: {exc}") from None


def split_message(
    msg: Message, session_id: str, seq: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> list[Envelope]:
    """``msg`` as ``ceil(len(payload) / chunk_bytes)`` envelopes (at least one)."""
    payload = encode_tensors(msg.tensors)
    starts = range(0, max(len(payload), 1), chunk_bytes)
    try:
        return [
            Envelope(
                session_id=session_id,
                seq=seq,
                step=msg.step,
                kind=str(msg.kind),
                sender=msg.sender,
                receiver=msg.receiver,
                meta_json=encode_meta(msg),
                payload=payload[start : start + chunk_bytes],
                chunk_index=index,
                chunk_count=len(starts),
            )
            for index, start in enumerate(starts)
        ]
    except (ValueError, TypeError) as exc:  # e.g. a step outside int64
        raise ProtocolError(f"{msg.kind} message cannot be framed: {exc}") from None


def send_stream(
    channel: grpc.Channel,
    requests: Iterable[Envelope | bytes],
    timeout: float,
    wait_for_ready: bool = False,
) -> Ack:
    """Deliver one stream of envelopes (or raw byte strings) and return the Ack.

    Raises :class:`grpc.RpcError` with the server's status when it rejects
    the stream. ``wait_for_ready`` makes the call wait (until ``timeout``) for
    a peer that is not listening yet instead of failing at once.
    """
    call = channel.stream_unary(
        DELIVER_METHOD,
        request_serializer=_serialize,
        response_deserializer=Ack.FromString,
    )
    return call(iter(requests), timeout=timeout, wait_for_ready=wait_for_ready)


def deliver(
    channel: grpc.Channel, envelopes: list[Envelope], timeout: float, wait_for_ready: bool = False
) -> Ack:
    """Deliver one framed message: ``DeliverOne`` for one envelope, else a ``Deliver`` stream."""
    if len(envelopes) > 1:
        return send_stream(channel, envelopes, timeout, wait_for_ready)
    call = channel.unary_unary(
        DELIVER_ONE_METHOD, request_serializer=_serialize, response_deserializer=Ack.FromString
    )
    return call(envelopes[0], timeout=timeout, wait_for_ready=wait_for_ready)


def rpc_status(exc: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    """``(code, details on one line)`` of a failed call (UNKNOWN when it carries none)."""
    # Errors raised by a call are also grpc.Call objects carrying code() and details().
    if isinstance(exc, grpc.Call):
        return exc.code(), " ".join(str(exc.details()).split())
    return grpc.StatusCode.UNKNOWN, " ".join(str(exc).split())


def _serialize(item: Envelope | bytes) -> bytes:
    return item if isinstance(item, bytes) else item.SerializeToString()
