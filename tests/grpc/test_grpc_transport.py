"""GrpcTransport end to end: real TLS servers, real certificates, hostile clients."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import grpc
import pytest
import torch

from clicooper.common.messages import Kind, Message, ProtocolError
from clicooper.common.serde import encode_tensors
from clicooper.proto import clicooper_pb2_grpc
from clicooper.runtime.transport.base import Party
from clicooper.runtime.transport.grpc import GrpcTransport, serve_forever
from clicooper.runtime.transport.grpc_wire import split_message

pytestmark = pytest.mark.timeout(60)
KIB = 1024
MIB = 1024 * KIB


def _msg(sender: str = "t1", receiver: str = "t2", step: int = 0, **tensors) -> Message:
    return Message(Kind.FORWARD, step, sender, receiver, tensors or {"x": torch.ones(3)})


def _assert_serving(net, server: GrpcTransport, seq: int = 1) -> None:
    """The server still accepts a correct message after whatever happened before."""
    ok = net.envelope(seq=seq, step=99, receiver=server.name)
    assert net.deliver(net.channel("t1", server), [ok]).ok
    got = server.recv(server.name, timeout=5)
    assert got.step == 99 and torch.equal(got.tensors["x"], torch.arange(4.0))


def _inbox_empty(t: GrpcTransport) -> bool:
    with pytest.raises(TimeoutError):
        t.recv(t.name, timeout=0.05)
    return True


# -- delivery ---------------------------------------------------------------


def test_round_trip_preserves_values_dtypes_shapes_and_header(net) -> None:
    t1, t2 = net.pair()
    tensors = {
        "act": torch.randn(4, 3, 2),
        "half": torch.randn(5).half(),
        "idx": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "mask": torch.tensor([True, False, True]),
    }
    t1.send(Message(Kind.FORWARD, 7, "t1", "t2", tensors, {"mb": 2, "tag": "é"}))
    got = t2.recv("t2", timeout=5)
    assert (got.kind, got.step, got.sender, got.receiver) == (Kind.FORWARD, 7, "t1", "t2")
    assert got.meta == {"mb": 2, "tag": "é"}
    assert set(got.tensors) == set(tensors)
    for name, value in tensors.items():
        assert got.tensors[name].dtype == value.dtype
        assert got.tensors[name].shape == value.shape
        assert torch.equal(got.tensors[name], value)
    # and back the other way on the same pair
    t2.send(Message(Kind.BACKWARD, 7, "t2", "t1", {"g": tensors["act"] * 2}))
    assert torch.equal(t1.recv("t1", timeout=5).tensors["g"], tensors["act"] * 2)
    assert t1.bytes_sent > sum(v.numel() * v.element_size() for v in tensors.values())


def test_messages_on_one_link_arrive_in_order(net) -> None:
    t1, t2 = net.pair()
    for step in range(6):
        t1.send(_msg(step=step, x=torch.full((2,), float(step))))
    assert [t2.recv("t2", timeout=5).step for _ in range(6)] == list(range(6))


def test_send_later_keeps_order_with_later_sync_sends(net) -> None:
    t1, t2 = net.pair()
    futures = [t1.send_later(_msg(step=i, x=torch.full((64, 64), float(i)))) for i in range(20)]
    t1.send(_msg(step=20))  # queued behind the 20 pending deliveries
    assert all(f.done() and f.exception() is None for f in futures)
    got = [t2.recv("t2", timeout=5) for _ in range(21)]
    assert [m.step for m in got] == list(range(21))
    assert all(float(m.tensors["x"][0, 0]) == m.step for m in got[:20])


def test_send_later_never_delivers_past_a_lost_message(net) -> None:
    t2 = net.transport("t2", max_message_bytes=256 * KIB)
    t1 = net.transport("t1", {"t2": f"127.0.0.1:{t2.port}"}, chunk_bytes=64 * KIB)
    too_big = t1.send_later(_msg(step=1, x=torch.zeros(128 * KIB)))  # 512 KiB: refused
    behind = t1.send_later(_msg(step=2))
    with pytest.raises(ProtocolError, match="262144-byte limit"):
        too_big.result(timeout=10)
    with pytest.raises(ConnectionError, match="not sent: an earlier message failed"):
        behind.result(timeout=10)
    assert _inbox_empty(t2)
    t1.send(_msg(step=3))  # the caller saw the failure; the link works again, no gap in seq
    assert t2.recv("t2", timeout=5).step == 3


def test_message_larger_than_chunk_is_split_and_reassembled(net) -> None:
    t1, t2 = net.pair(chunk_bytes=1 * MIB)
    big = torch.randn(3 * MIB // 4 + 17)  # just over 3 MiB of float32
    assert len(split_message(_msg(x=big), net.session, 1, 1 * MIB)) == 4
    t1.send(_msg(x=big))
    got = t2.recv("t2", timeout=10).tensors["x"]
    assert got.dtype == torch.float32 and torch.equal(got, big)
    assert t1.bytes_sent > 3 * MIB


def test_send_waits_for_a_peer_that_starts_late(net, certs_dir: Path) -> None:
    with socket.socket() as s:  # reserve a free port number, then release it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t1 = net.transport("t1", {"t2": f"127.0.0.1:{port}"})
    t2 = GrpcTransport("t2", f"127.0.0.1:{port}", {}, certs_dir / "t2", net.session)
    timer = threading.Timer(0.5, t2.start)
    timer.start()
    try:
        t1.send(_msg())
        assert torch.equal(t2.recv("t2", timeout=5).tensors["x"], torch.ones(3))
    finally:
        timer.join()
        t2.close()


def test_unreachable_peer_raises_connection_error(net) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t1 = net.transport("t1", {"t2": f"127.0.0.1:{port}"}, send_timeout=0.5)
    with pytest.raises(ConnectionError, match="could not reach t2"):
        t1.send(_msg())


# -- TLS and identity --------------------------------------------------------


def test_client_without_tls_is_refused(net) -> None:
    _, t2 = net.pair()
    stub = clicooper_pb2_grpc.PartyServiceStub(net.insecure(t2))
    with pytest.raises(grpc.RpcError) as err:
        stub.Deliver(iter([net.envelope()]), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert _inbox_empty(t2)
    _assert_serving(net, t2)


def _channel_from_files(server: GrpcTransport, ca: Path, cert: Path, key: Path) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(ca.read_bytes(), key.read_bytes(), cert.read_bytes())
    options = [("grpc.ssl_target_name_override", server.name)]
    return grpc.secure_channel(f"127.0.0.1:{server.port}", creds, options=options)


def test_party_of_another_session_is_refused(net, foreign_certs_dir: Path) -> None:
    _, t2 = net.pair()
    foreign = net.channel("t1", t2, certs=foreign_certs_dir)  # foreign CA, foreign t1
    with pytest.raises(grpc.RpcError) as err:
        net.deliver(foreign, [net.envelope()])
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert _inbox_empty(t2)
    _assert_serving(net, t2)


@pytest.mark.parametrize("issuer", ["session", "foreign"])
def test_server_accepts_only_client_certificates_of_the_session_ca(
    net, certs_dir: Path, foreign_certs_dir: Path, issuer: str
) -> None:
    """The client trusts our CA either way, so a refusal can only come from the server."""
    _, t2 = net.pair()
    client_dir = certs_dir if issuer == "session" else foreign_certs_dir
    channel = _channel_from_files(
        t2, certs_dir / "t2/ca.pem", client_dir / "t1/t1.pem", client_dir / "t1/t1.key"
    )
    try:
        if issuer == "session":
            assert net.deliver(channel, [net.envelope()]).ok
            assert t2.recv("t2", timeout=5).sender == "t1"
        else:
            with pytest.raises(grpc.RpcError) as err:
                net.deliver(channel, [net.envelope()])
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert _inbox_empty(t2)
            _assert_serving(net, t2)
    finally:
        channel.close()


def test_party_holding_t2_certificate_cannot_claim_to_be_t1(net) -> None:
    t3 = net.transport("t3")
    as_t2 = net.channel("t2", t3)
    with pytest.raises(grpc.RpcError) as err:
        net.deliver(as_t2, [net.envelope(sender="t1", receiver="t3")])
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "does not match TLS identity 't2'" in err.value.details()
    assert _inbox_empty(t3)
    net.deliver(as_t2, [net.envelope(sender="t2", receiver="t3")])  # its own name is fine
    assert t3.recv("t3", timeout=5).sender == "t2"


def test_client_refuses_a_server_that_is_not_the_named_peer(net) -> None:
    t3 = net.transport("t3")
    # t1 believes t2 lives at t3's address: t3's certificate does not name t2.
    t1 = net.transport("t1", {"t2": f"127.0.0.1:{t3.port}"}, send_timeout=1.0)
    with pytest.raises(ConnectionError):
        t1.send(_msg())
    assert _inbox_empty(t3)


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"receiver": "t3"}, "message for 't3' delivered to 't2'"),
        ({"session_id": "another-session"}, "is not this party's session"),
    ],
)
def test_wrong_route_or_session_is_permission_denied(net, fields, reason) -> None:
    _, t2 = net.pair()
    ch = net.channel("t1", t2)
    with pytest.raises(grpc.RpcError) as err:
        net.deliver(ch, [net.envelope(**fields)])
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert reason in err.value.details()
    _assert_serving(net, t2)


# -- sequence numbers ----------------------------------------------------------


def test_replayed_and_out_of_order_seq_are_rejected(net) -> None:
    _, t2 = net.pair()
    ch = net.channel("t1", t2)
    assert net.deliver(ch, [net.envelope(seq=1, step=1)]).ok
    for seq, what in [(1, "replayed seq 1"), (0, "replayed seq 0"), (3, "out-of-order seq 3")]:
        with pytest.raises(grpc.RpcError) as err:
            net.deliver(ch, [net.envelope(seq=seq, step=50 + seq)])
        assert err.value.code() == grpc.StatusCode.ABORTED
        assert what in err.value.details() and "expected 2" in err.value.details()
    assert net.deliver(ch, [net.envelope(seq=2, step=2)]).ok
    assert [t2.recv("t2", timeout=5).step for _ in range(2)] == [1, 2]
    assert _inbox_empty(t2)


def test_concurrent_streams_with_the_same_seq_are_accepted_once(net) -> None:
    _, t2 = net.pair()
    ch = net.channel("t1", t2)
    outcomes: list[bool] = []

    def attempt() -> None:
        try:
            outcomes.append(net.deliver(ch, [net.envelope(seq=1)]).ok)
        except grpc.RpcError:
            outcomes.append(False)

    threads = [threading.Thread(target=attempt) for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert outcomes.count(True) == 1
    t2.recv("t2", timeout=5)
    assert _inbox_empty(t2)


def test_rejected_message_does_not_consume_a_seq(net) -> None:
    t1, t2 = net.pair()
    with pytest.raises(ProtocolError, match="NaN or Inf"):
        t1.send(_msg(x=torch.tensor([1.0, float("nan")])))
    t1.send(_msg(step=5))  # same seq number 1, now valid
    assert t2.recv("t2", timeout=5).step == 5


# -- malformed input ----------------------------------------------------------

_NAN = encode_tensors({"x": torch.tensor([0.0, float("nan")])})
_INF = encode_tensors({"x": torch.tensor([float("-inf"), 1.0])})
_BAD_ST = (40).to_bytes(8, "little") + b'{"x": {"dtype": "F32", "shape": [9]}}' + b"\0" * 3


def _two_chunks(net, **second) -> list:
    """A valid message split in two chunks; ``second`` alters the second chunk."""
    payload = encode_tensors({"x": torch.arange(4.0)})
    first = net.envelope(payload=payload[:20], chunk_count=2)
    return [first, net.envelope(payload=payload[20:], chunk_count=2, chunk_index=1, **second)]


MALFORMED = {
    "protobuf": (lambda n: [b"\xff\xff\xff\xff\x0f"], "INVALID_ARGUMENT", "malformed protobuf"),
    "safetensors": (
        lambda n: [n.envelope(payload=b"not safetensors at all")],
        "INVALID_ARGUMENT",
        "malformed safetensors",
    ),
    "safetensors-header": (
        lambda n: [n.envelope(payload=_BAD_ST)],
        "INVALID_ARGUMENT",
        "malformed safetensors",
    ),
    "nan": (lambda n: [n.envelope(payload=_NAN)], "INVALID_ARGUMENT", "NaN or Inf"),
    "inf": (lambda n: [n.envelope(payload=_INF)], "INVALID_ARGUMENT", "NaN or Inf"),
    "kind": (lambda n: [n.envelope(kind="exec")], "INVALID_ARGUMENT", "unknown message kind"),
    "meta-list": (lambda n: [n.envelope(meta_json="[1, 2]")], "INVALID_ARGUMENT", "JSON object"),
    "meta-text": (lambda n: [n.envelope(meta_json="{oops")], "INVALID_ARGUMENT", "valid JSON"),
    "meta-nan": (lambda n: [n.envelope(meta_json='{"a": NaN}')], "INVALID_ARGUMENT", "valid JSON"),
    "empty-stream": (lambda n: [], "INVALID_ARGUMENT", "empty stream"),
    "zero-chunks": (lambda n: [n.envelope(chunk_count=0)], "INVALID_ARGUMENT", "at least 1"),
    "missing-chunk": (lambda n: _two_chunks(n)[:1], "INVALID_ARGUMENT", "after 1 of 2 chunks"),
    "extra-chunk": (
        lambda n: [n.envelope(), n.envelope()],
        "INVALID_ARGUMENT",
        "more chunks than chunk_count",
    ),
    "chunk-order": (lambda n: _two_chunks(n)[::-1], "INVALID_ARGUMENT", "arrived where chunk 0"),
    "chunk-header": (lambda n: _two_chunks(n, step=9), "INVALID_ARGUMENT", "differs from chunk 0"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_input_is_rejected_and_server_keeps_serving(net, case: str) -> None:
    build, code, reason = MALFORMED[case]
    _, t2 = net.pair()
    ch = net.channel("t1", t2)
    with pytest.raises(grpc.RpcError) as err:
        net.deliver(ch, build(net))
    assert err.value.code().name == code
    assert reason in err.value.details()
    assert "\n" not in err.value.details()
    assert _inbox_empty(t2)
    _assert_serving(net, t2)


def test_split_message_reassembles_from_valid_chunks(net) -> None:
    _, t2 = net.pair()
    assert net.deliver(net.channel("t1", t2), _two_chunks(net)).ok
    assert torch.equal(t2.recv("t2", timeout=5).tensors["x"], torch.arange(4.0))


def test_deliver_one_shares_the_checks_and_refuses_a_chunk_of_a_longer_message(net) -> None:
    _, t2 = net.pair()
    ch = net.channel("t1", t2)
    assert net.deliver_one(ch, net.envelope(seq=1, step=1)).ok
    with pytest.raises(grpc.RpcError) as err:  # a replay through the other endpoint
        net.deliver(ch, [net.envelope(seq=1, step=7)])
    assert err.value.code() == grpc.StatusCode.ABORTED and "replayed seq 1" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        net.deliver_one(ch, net.envelope(seq=2, payload=b"x" * 20, chunk_count=2))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "\n" not in err.value.details()
    assert [t2.recv("t2", timeout=5).step] == [1] and _inbox_empty(t2)
    _assert_serving(net, t2, seq=2)


def test_transport_sends_one_chunk_messages_through_deliver_one(net, monkeypatch) -> None:
    from clicooper.runtime.transport import grpc_wire

    t1, t2 = net.pair()
    streams: list[int] = []
    real = grpc_wire.send_stream
    monkeypatch.setattr(
        grpc_wire, "send_stream", lambda *a, **k: streams.append(1) or real(*a, **k)
    )
    t1.send(_msg(x=torch.arange(4.0)))
    assert torch.equal(t2.recv("t2", timeout=5).tensors["x"], torch.arange(4.0))
    assert streams == []  # one envelope: the unary DeliverOne


def test_oversize_message_is_refused_and_server_keeps_serving(net) -> None:
    t2 = net.transport("t2", max_message_bytes=256 * KIB)
    t1 = net.transport("t1", {"t2": f"127.0.0.1:{t2.port}"}, chunk_bytes=64 * KIB)
    with pytest.raises(ProtocolError, match="RESOURCE_EXHAUSTED.*262144-byte limit"):
        t1.send(_msg(x=torch.zeros(128 * KIB)))  # 512 KiB of float32
    assert _inbox_empty(t2)
    _assert_serving(net, t2)


def test_envelope_over_the_grpc_message_limit_is_refused(net) -> None:
    _, t2 = net.pair()
    ch = net.channel("t1", t2, envelope_bytes=8 * MIB)  # client allows it, server must not
    huge = net.envelope(payload=encode_tensors({"x": torch.zeros(5 * MIB // 4)}))
    with pytest.raises(grpc.RpcError) as err:
        net.deliver(ch, [huge])
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    _assert_serving(net, t2)


# -- API contract ---------------------------------------------------------------


def test_recv_checks_party_and_times_out_clearly(net) -> None:
    t1, _ = net.pair()
    with pytest.raises(ProtocolError, match="serves 't1', not 't2'"):
        t1.recv("t2", timeout=0.1)
    with pytest.raises(TimeoutError, match="t1 received no message within 0.1 s"):
        t1.recv("t1", timeout=0.1)


def test_send_refuses_unknown_peer_and_forged_sender(net) -> None:
    t1, _ = net.pair()
    with pytest.raises(ProtocolError, match="no address for peer 'verifier'"):
        t1.send(_msg(receiver="verifier"))
    with pytest.raises(ProtocolError, match="cannot send as 'do'"):
        t1.send(_msg(sender="do"))
    with pytest.raises(ProtocolError, match="not plain JSON"):
        t1.send(Message(Kind.CONTROL, 0, "t1", "t2", meta={"x": float("nan")}))


@pytest.mark.parametrize(
    ("kw", "reason"),
    [
        ({"listen": "localhost"}, "not host:port"),
        ({"peers": {"t2": "nowhere"}}, "not host:port"),
        ({"peers": {"T2": "127.0.0.1:1"}}, "invalid party name"),
        ({"session_id": ""}, "session_id is empty"),
        ({"chunk_bytes": 0}, "chunk_bytes 0 must be positive"),
        ({"chunk_bytes": 4 * MIB}, "at most envelope_bytes"),
    ],
)
def test_constructor_rejects_bad_settings(certs_dir: Path, kw, reason) -> None:
    args = {"listen": "127.0.0.1:0", "peers": {}, "session_id": "s"} | kw
    with pytest.raises(ValueError, match=reason):
        GrpcTransport("t1", certs_dir=certs_dir, **args)


def test_constructor_names_missing_certificates(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"ca\.pem.*clicooper certs init"):
        GrpcTransport("t1", "127.0.0.1:0", {}, tmp_path, "s")


def test_listen_on_a_busy_port_fails_clearly(net, certs_dir: Path) -> None:
    t2 = net.transport("t2")
    clash = GrpcTransport("t3", f"127.0.0.1:{t2.port}", {}, certs_dir / "t3", net.session)
    try:
        with pytest.raises(OSError, match="cannot listen on"):
            clash.start()
    finally:
        clash.close()


def test_a_client_only_transport_on_a_listening_address_sends_without_binding(net, certs_dir):
    """A one-off client on the address its own party listens on (the owner's send_join to a
    restarted party, admission requests, a node session's sender) sends and closes without
    binding: only start() and recv() listen, so it never clashes with its party's server."""
    t1, t2 = net.pair()
    t3 = net.transport("t3")
    address = f"127.0.0.1:{t1.port}"  # where t1's server listens
    one_off = GrpcTransport("t1", address, {"t3": f"127.0.0.1:{t3.port}"}, certs_dir / "t1",
                            net.session, send_timeout=10.0)  # fmt: skip
    try:
        one_off.send(Message(Kind.FORWARD, 1, "t1", "t3", {"x": torch.ones(2)}))
        assert t3.recv("t3", 5).sender == "t1"
        with pytest.raises(RuntimeError, match="not started"):
            _ = one_off.port
    finally:
        one_off.close()
    t2.send(Message(Kind.BACKWARD, 1, "t2", "t1", {"y": torch.ones(2)}))
    assert t1.recv("t1", 5).kind == Kind.BACKWARD  # t1's server still serves its port


# -- serve_forever ---------------------------------------------------------------


class _Doubler(Party):
    """Answers FORWARD with twice the activations; refuses LABELS."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.handled: list[Kind] = []

    def handle(self, msg: Message) -> None:
        self.handled.append(msg.kind)
        if msg.kind == Kind.LABELS:
            raise ProtocolError("labels are not for me")
        self.send(
            Message(Kind.BACKWARD, msg.step, self.name, msg.sender, {"y": 2 * msg.tensor("x")})
        )


def _serve(party: Party, transport: GrpcTransport, stop: threading.Event) -> threading.Thread:
    th = threading.Thread(target=serve_forever, args=(party, transport, stop), daemon=True)
    th.start()
    return th


def test_serve_forever_handles_answers_errors_and_shutdown(net) -> None:
    driver, server = net.pair()
    party = _Doubler("t2")
    worker = _serve(party, server, threading.Event())
    driver.send(_msg(step=1, x=torch.tensor([1.0, 2.0])))
    reply = driver.recv("t1", timeout=5)
    assert reply.kind == Kind.BACKWARD and torch.equal(reply.tensors["y"], torch.tensor([2.0, 4.0]))
    driver.send(Message(Kind.LABELS, 2, "t1", "t2", {"x": torch.ones(1)}))
    error = driver.recv("t1", timeout=5)
    assert error.kind == Kind.ERROR and "labels are not for me" in error.meta["error"]
    driver.send(Message(Kind.CONTROL, 3, "t1", "t2", meta={"op": "shutdown"}))
    refused = driver.recv("t1", timeout=5)  # only the data owner may stop a party
    assert refused.kind == Kind.ERROR and "shutdown" in refused.meta["error"]
    assert worker.is_alive()
    owner = net.transport("do", {"t2": f"127.0.0.1:{server.port}"})
    server.peers["do"] = f"127.0.0.1:{owner.port}"
    owner.send(Message(Kind.CONTROL, 1, "do", "t2", meta={"op": "shutdown"}))
    worker.join(timeout=5)
    assert not worker.is_alive()
    assert party.handled == [Kind.FORWARD, Kind.LABELS]


def test_serve_forever_stops_on_event(net) -> None:
    _, server = net.pair()
    stop = threading.Event()
    worker = _serve(_Doubler("t2"), server, stop)
    stop.set()
    worker.join(timeout=5)
    assert not worker.is_alive()
