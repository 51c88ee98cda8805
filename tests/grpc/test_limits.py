"""Bounded resources of a served party (issue 9, point 5): real TLS servers on loopback.

Every limit of :class:`~clicooper.config.TransportLimits` is exercised against a
live endpoint by an authenticated peer (a valid session certificate), and every
refusal must name the limit that produced it.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch

from clicooper.common.messages import Kind, Message, ProtocolError
from clicooper.common.serde import encode_tensors
from clicooper.config import KIND_GROUPS, KindCaps, TransportLimits
from clicooper.models.presets import build_preset
from clicooper.proto import DELIVER_METHOD, Ack, Envelope
from clicooper.runtime.certs import load_party_credentials
from clicooper.runtime.transport.grpc import GrpcTransport
from clicooper.runtime.transport.grpc_wire import channel_options, open_channel

pytestmark = pytest.mark.timeout(90)
KIB, MIB = 1 << 10, 1 << 20


def _bundle(certs_dir: Path, party: str) -> Path:
    """``party``'s credentials: its own bundle folder where ``certs init`` writes one."""
    return certs_dir / party if (certs_dir / party).is_dir() else certs_dir


class Stalled:
    """A ``Deliver`` stream from ``as_party`` that sends one chunk of two, then stalls.

    Each stream has a connection of its own (a local subchannel pool), so the
    server's per-connection HTTP/2 stream limit cannot hide it from the server.
    """

    def __init__(self, net, as_party: str, server: GrpcTransport) -> None:
        self.release = threading.Event()
        ca, cert, key = load_party_credentials(_bundle(net.certs_dir, as_party), as_party)
        self.channel = grpc.secure_channel(
            f"127.0.0.1:{server.port}",
            grpc.ssl_channel_credentials(ca, key, cert),
            options=[
                *channel_options(4 * MIB),
                ("grpc.ssl_target_name_override", server.name),
                ("grpc.use_local_subchannel_pool", 1),
            ],
        )
        payload = encode_tensors({"x": torch.arange(8.0)})
        first = net.envelope(
            sender=as_party, receiver=server.name, payload=payload[:40], chunk_count=2
        )

        def requests():
            yield first.SerializeToString()
            self.release.wait(30)

        call = self.channel.stream_unary(DELIVER_METHOD, response_deserializer=Ack.FromString)
        self.future = call.future(requests(), timeout=30)

    def error(self, timeout: float) -> grpc.RpcError:
        """The stream's failure, waiting up to ``timeout`` seconds for it."""
        exc = self.future.exception(timeout=timeout)
        assert isinstance(exc, grpc.RpcError), exc
        return exc

    def close(self) -> None:
        self.release.set()
        self.future.cancel()
        self.channel.close()


@pytest.fixture
def stalled(net):
    """Factory of stalled streams, all released and closed at teardown."""
    opened: list[Stalled] = []

    def open_stalled(as_party: str, server: GrpcTransport) -> Stalled:
        opened.append(Stalled(net, as_party, server))
        return opened[-1]

    yield open_stalled
    for s in opened:
        s.close()


def _pending(streams: list[Stalled]) -> list[Stalled]:
    return [s for s in streams if not s.future.done()]


def _logged(caplog, text: str, within: float = 3.0) -> bool:
    """``text`` in the log within ``within`` s (the handler logs a cut once it wakes)."""
    deadline = time.monotonic() + within
    while text not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.02)
    return text in caplog.text


def _msg(sender: str = "t1", receiver: str = "t2", step: int = 0, **tensors) -> Message:
    return Message(Kind.FORWARD, step, sender, receiver, tensors or {"x": torch.ones(3)})


# -- streams: caps, idle timeout, deadline ----------------------------------------------


def test_stalled_streams_do_not_stop_a_party_from_serving_an_honest_peer(net, stalled) -> None:
    """16 stalled streams from two peers (the old server had 4 workers in all)."""
    t1, t2 = net.pair()
    streams = [stalled(peer, t2) for peer in ("t3", "do") for _ in range(8)]
    deadline = time.monotonic() + 5
    while len(_pending(streams)) > 8 and time.monotonic() < deadline:
        time.sleep(0.05)
    held = _pending(streams)
    assert len(held) == 8  # four per peer, at limits.max_streams_per_peer
    refused = [s.error(0) for s in streams if s not in held]
    assert all(e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for e in refused)
    assert all("at limits.max_streams_per_peer 4" in e.details() for e in refused)
    started = time.monotonic()
    t1.send(_msg(step=5))
    got = t2.recv("t2", timeout=3)
    assert got.step == 5 and time.monotonic() - started < 3
    assert len(_pending(held)) == 8  # still stalled: the honest message did not wait for them


def test_a_stream_idle_past_its_timeout_is_cut_and_frees_its_slot(net, stalled, caplog) -> None:
    limits = TransportLimits(stream_idle_timeout_s=0.5, max_streams_per_peer=2)
    t2 = net.transport("t2", limits=limits)
    started = time.monotonic()
    streams = [stalled("t3", t2) for _ in range(2)]
    errors = [s.error(timeout=5) for s in streams]
    assert all(e.code() == grpc.StatusCode.CANCELLED for e in errors)
    assert 0.4 < time.monotonic() - started < 3
    assert _logged(caplog, "sent no chunk for limits.stream_idle_timeout_s 0.5 s")
    # The slots are free again: t3 delivers at once.
    ch = net.channel("t3", t2)
    assert net.deliver(ch, [net.envelope(sender="t3", step=3)]).ok
    assert t2.recv("t2", timeout=5).step == 3


def test_a_delivery_past_its_deadline_is_cut_even_while_chunks_trickle(net, caplog) -> None:
    t2 = net.transport(
        "t2", limits=TransportLimits(stream_idle_timeout_s=0.5, delivery_deadline_s=1.0)
    )
    payload = encode_tensors({"x": torch.arange(64.0)})
    chunks = [payload[i : i + 4] for i in range(0, len(payload), 4)]  # 80 chunks

    def trickle():
        for i, part in enumerate(chunks):
            env = net.envelope(payload=part, chunk_index=i, chunk_count=len(chunks))
            yield env.SerializeToString()
            time.sleep(0.1)  # well inside the idle timeout

    started = time.monotonic()
    call = net.channel("t1", t2).stream_unary(DELIVER_METHOD, response_deserializer=Ack.FromString)
    with pytest.raises(grpc.RpcError) as err:
        call(trickle(), timeout=20)
    assert err.value.code() == grpc.StatusCode.CANCELLED
    assert 0.9 < time.monotonic() - started < 4  # the full stream would take 8 s
    assert _logged(caplog, "still sending after limits.delivery_deadline_s 1.0 s")
    with pytest.raises(TimeoutError):
        t2.recv("t2", timeout=0.05)
    assert net.deliver(net.channel("t1", t2), [net.envelope(step=4)]).ok  # seq 1 is still free


def test_concurrent_stream_cap_is_named(net, stalled) -> None:
    limits = TransportLimits(max_concurrent_streams=2, max_streams_per_peer=2)
    t2 = net.transport("t2", limits=limits)
    held = [stalled("t3", t2) for _ in range(2)]
    ch, seq, deadline = net.channel("do", t2), 1, time.monotonic() + 5
    while True:  # accepted until the server has admitted both stalled streams
        try:
            net.deliver(ch, [net.envelope(sender="do", seq=seq)])
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "t2 reads 2 streams, at limits.max_concurrent_streams 2" in err.details()
            break
        seq += 1
        assert time.monotonic() < deadline, "a third stream was admitted beside two held ones"
        # A stalled stream that arrived while a delivery of do's held the other slot was
        # refused, rightly: open it again, so that two stalled streams end up held.
        held = [s if not s.future.done() else _reopened(s, stalled, t2) for s in held]
        time.sleep(0.05)
    assert len(_pending(held)) == 2


def _reopened(stream: Stalled, stalled, server: GrpcTransport) -> Stalled:
    """A new stalled stream for one that the concurrency cap refused (any other end fails)."""
    err = stream.error(0)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
    assert "at limits.max_concurrent_streams 2" in err.details()
    return stalled("t3", server)


# -- connections -------------------------------------------------------------------------


def _closed_by_server(sock: socket.socket, within: float) -> bool:
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_a_connection_that_never_handshakes_is_closed_after_the_handshake_timeout(net) -> None:
    t2 = net.transport("t2", limits=TransportLimits(handshake_timeout_s=0.5))
    with socket.create_connection(("127.0.0.1", t2.port)) as sock:
        started = time.monotonic()
        assert _closed_by_server(sock, within=5)  # sends nothing: no TLS ClientHello
        assert 0.3 < time.monotonic() - started < 3
    assert net.deliver(net.channel("t1", t2), [net.envelope()]).ok


def test_connections_past_the_cap_are_closed_at_once(net) -> None:
    t2 = net.transport("t2", limits=TransportLimits(max_connections=2, handshake_timeout_s=5))
    held = [socket.create_connection(("127.0.0.1", t2.port)) for _ in range(2)]
    try:
        time.sleep(0.2)
        with socket.create_connection(("127.0.0.1", t2.port)) as extra:
            assert _closed_by_server(extra, within=2)
        assert not _closed_by_server(held[0], within=0.2)
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 5
    while True:  # the quota frees as the server notices the closed sockets
        try:
            assert net.deliver(net.channel("t1", t2), [net.envelope()]).ok
            break
        except grpc.RpcError:
            assert time.monotonic() < deadline
            time.sleep(0.2)


# -- per-kind caps, checked before decoding ------------------------------------------------


def _empty_tensors_payload(n: int) -> bytes:
    """A safetensors blob of ``n`` empty float32 tensors, written directly (fast)."""
    entry = '"t%d":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}'
    header = ("{" + ",".join(entry % i for i in range(n)) + "}").encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header


def _chunks(net, payload: bytes, chunk: int = 1 * MIB, **fields) -> list[Envelope]:
    parts = [payload[i : i + chunk] for i in range(0, len(payload), chunk)]
    return [
        net.envelope(payload=p, chunk_index=i, chunk_count=len(parts), **fields)
        for i, p in enumerate(parts)
    ]


@pytest.mark.parametrize(("kind", "limit"), [("forward", "limits.work"), ("audit", "limits.audit")])
def test_200000_empty_tensors_are_refused_in_under_a_second(net, kind: str, limit: str) -> None:
    _, t2 = net.pair()
    payload = _empty_tensors_payload(200_000)
    assert len(payload) > 10 * MIB
    stream = _chunks(net, payload, kind=kind, seq=2)
    ch = net.channel("t1", t2)
    assert net.deliver(ch, [net.envelope(step=1)]).ok  # connected: time the refusal alone
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        net.deliver(ch, stream)
    elapsed = time.monotonic() - started
    print(f"200,000 empty tensors ({kind}) refused in {elapsed:.3f} s")
    assert elapsed < 1.0, elapsed
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"safetensors header, over {limit}.max_header_bytes" in err.value.details()
    assert net.deliver(ch, [net.envelope(seq=2, step=2)]).ok  # serving, seq 2 unused
    assert [t2.recv("t2", timeout=5).step for _ in range(2)] == [1, 2]


@pytest.mark.parametrize(
    ("kind", "tensors", "reason"),
    [
        ("forward", 5, "forward message has 5 tensors, over limits.work.max_tensors 4"),
        ("reply", 1, "reply message has 1 tensors, over limits.control.max_tensors 0"),
        ("audit", 5000, "audit message has 5000 tensors, over limits.audit.max_tensors 1024"),
    ],
)
def test_too_many_tensors_are_refused_by_kind(net, kind: str, tensors: int, reason: str) -> None:
    _, t2 = net.pair()
    payload = _empty_tensors_payload(tensors)
    with pytest.raises(grpc.RpcError) as err:
        net.deliver(net.channel("t1", t2), _chunks(net, payload, kind=kind))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert reason in err.value.details()


def test_declared_bytes_over_the_kind_cap_are_refused_before_they_are_read(net) -> None:
    caps = KindCaps(max_tensors=4, max_header_bytes=4 * KIB, max_bytes=4 * KIB, max_meta_bytes=KIB)
    t2 = net.transport("t2", limits=TransportLimits(work=caps))
    big = encode_tensors({"x": torch.zeros(2 * KIB)})  # 8 KiB of data
    first = _chunks(net, big, chunk=128)[:1]  # only the first 128 bytes are sent
    with pytest.raises(grpc.RpcError) as err:
        net.deliver(net.channel("t1", t2), first)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"forward payload of {len(big)} bytes exceeds the 4096-byte limit" in err.value.details()
    assert "(limits.work.max_bytes)" in err.value.details()


def test_meta_over_the_kind_cap_is_refused_with_a_clear_send_error(net) -> None:
    t1, t2 = net.pair()
    meta = {"op": "status", "pad": "a" * (300 * KIB)}
    with pytest.raises(ProtocolError, match="limits.control.max_meta_bytes 262144"):
        t1.send(Message(Kind.REPLY, 0, "t1", "t2", {}, meta))
    t1.send(Message(Kind.REPLY, 1, "t1", "t2", {}, {"op": "status"}))
    assert t2.recv("t2", timeout=5).step == 1


def test_the_protocol_messages_fit_the_default_caps(net) -> None:
    """What the parties really send passes: a whole CNN as an audit, batch tensors, replies."""
    t1, t2 = net.pair()
    blocks = build_preset("cnn", (3, 32, 32), 10, 8)
    state = {f"{n}.{k}": v for n, block in blocks for k, v in block.state_dict().items()}
    sent = [
        Message(Kind.AUDIT, 1, "t1", "t2", state, {"record": {"stage": 1, "body": {}}}),
        Message(Kind.FORWARD, 2, "t1", "t2", {"x": torch.randn(128, 16, 16, 16)}, {"micro": 0}),
        Message(Kind.LOSS, 3, "t1", "t2", {"logits": torch.randn(128, 40)}, {"loss": 0.5}),
        Message(Kind.LABELS, 4, "t1", "t2", {"y": torch.arange(128)}, {"micros": 4}),
        Message(Kind.REPLY, 5, "t1", "t2", {}, {"op": "finish", "sealed_bits": [1] * 4096}),
    ]
    for msg in sent:
        t1.send(msg)
    for msg in sent:
        got = t2.recv("t2", timeout=5)
        assert got.kind == msg.kind and set(got.tensors) == set(msg.tensors)


def test_every_kind_has_caps() -> None:
    assert set(KIND_GROUPS) == {k.value for k in Kind}
    limits = TransportLimits()
    assert {limits.caps(k.value)[0] for k in Kind} == {"work", "control", "audit"}


def test_one_cap_of_a_group_can_be_changed_alone() -> None:
    limits = TransportLimits.model_validate({"audit": {"max_tensors": 4096}})
    assert limits.audit.max_tensors == 4096
    assert limits.audit.max_header_bytes == TransportLimits().audit.max_header_bytes
    assert limits.work == TransportLimits().work


def test_limits_that_cannot_hold_a_message_are_refused(certs_dir: Path) -> None:
    with pytest.raises(ValueError, match="max_inbox_bytes .* at least twice"):
        TransportLimits(max_inbox_bytes=300 * MIB)
    with pytest.raises(ValueError, match="max_streams_per_peer 8 exceeds"):
        TransportLimits(max_concurrent_streams=4, max_streams_per_peer=8)
    with pytest.raises(ValueError, match="max_message_bytes"):
        GrpcTransport("t1", "127.0.0.1:0", {}, _bundle(certs_dir, "t1"), "s", max_message_bytes=0)


# -- the inbox ------------------------------------------------------------------------------


def test_a_full_inbox_refuses_with_the_limit_named_until_it_is_read(net) -> None:
    t2 = net.transport("t2", limits=TransportLimits(max_inbox_messages=3))
    t1 = net.transport("t1", {"t2": f"127.0.0.1:{t2.port}"})
    for step in range(3):
        t1.send(_msg(step=step))
    with pytest.raises(ProtocolError, match="RESOURCE_EXHAUSTED.*limits.max_inbox_messages 3"):
        t1.send(_msg(step=3))
    assert t2.recv("t2", timeout=5).step == 0
    t1.send(_msg(step=4))  # room again, and the refused message used no seq
    assert [t2.recv("t2", timeout=5).step for _ in range(3)] == [1, 2, 4]


_RECEIVER = """
import json, sys
from pathlib import Path
from clicooper.config import TransportLimits
from clicooper.runtime.transport.grpc import GrpcTransport

def memory():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}

bundle, session, limits = sys.argv[1:4]
t = GrpcTransport("t2", "127.0.0.1:0", {}, Path(bundle), session,
                  limits=TransportLimits.model_validate_json(limits)).start()
print(json.dumps({"port": t.port, **memory()}), flush=True)
sys.stdin.readline()  # the party does not read while the messages arrive
after = memory()
steps = []
while True:
    try:
        steps.append(t.recv("t2", timeout=0.2).step)
    except TimeoutError:
        break
print(json.dumps({"steps": steps, **after}), flush=True)
t.close()
"""


def _lazy_stream(net, step: int, n_floats: int, made: list[int], chunk: int = 1 * MIB):
    """One message of ``n_floats`` float32 ones from t3, as envelopes made as they are sent.

    The bytes are what :func:`encode_tensors` writes, but no chunk exists before the
    stream asks for it (``made`` counts them), so a refusal costs the sender nothing.
    """
    header = json.dumps(
        {"x": {"dtype": "F32", "shape": [n_floats], "data_offsets": [0, 4 * n_floats]}},
        separators=(",", ":"),
    ).encode()
    header += b" " * (-len(header) % 8)
    prefix = len(header).to_bytes(8, "little") + header
    total = len(prefix) + 4 * n_floats
    count = -(-total // chunk)
    ones = torch.ones(chunk // 4).numpy().tobytes()  # float32 1.0 repeated

    def envelopes():
        for i in range(count):
            size = min(chunk, total - i * chunk)
            part = prefix + ones[: size - len(prefix)] if i == 0 else ones[:size]
            env = net.envelope(
                sender="t3", step=step, payload=part, chunk_index=i, chunk_count=count
            )
            made.append(i)
            yield env.SerializeToString()

    return envelopes()


def test_20_messages_of_100_mib_keep_a_party_that_is_not_reading_under_its_bound(
    net, certs_dir: Path, tmp_path: Path
) -> None:
    """Growth of the receiver's peak resident memory stays under 400 MiB.

    The bound is the inbox: max_inbox_bytes 256 MiB holds a message being read
    twice (its bytes and their decoded copy), so the first 100 MiB message is
    accepted and every later one is refused at its first chunk, before its payload
    is read; the rest of the 400 MiB is room for gRPC's buffers and the allocator.
    t1 sends two through its transport (the second fails with a clear error), t3
    the other 18 as raw streams made chunk by chunk. The receiver runs in its own
    process so that its /proc/self/status measures it alone.
    """
    limits = TransportLimits(max_message_bytes=128 * MIB, max_inbox_bytes=256 * MIB)
    script = tmp_path / "receiver.py"
    script.write_text(_RECEIVER)
    proc = subprocess.Popen(
        [
            sys.executable,
            str(script),
            str(_bundle(certs_dir, "t2")),
            net.session,
            limits.model_dump_json(),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=(tmp_path / "receiver.log").open("w"),
        text=True,
    )
    try:
        start = json.loads(proc.stdout.readline())
        t1 = net.transport("t1", {"t2": f"127.0.0.1:{start['port']}"}, send_timeout=30)
        x = torch.ones(25 * MIB)  # 100 MiB of float32
        t1.send(_msg(step=0, x=x))
        with pytest.raises(ProtocolError, match="RESOURCE_EXHAUSTED.*limits.max_inbox_bytes"):
            t1.send(_msg(step=1, x=x))
        del x
        creds = load_party_credentials(_bundle(certs_dir, "t3"), "t3")
        with open_channel(f"127.0.0.1:{start['port']}", "t2", creds) as ch:
            for step in range(2, 20):
                made: list[int] = []
                with pytest.raises(grpc.RpcError) as err:
                    net.deliver(ch, _lazy_stream(net, step, 25 * MIB, made))
                assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "limits.max_inbox_bytes 268435456" in err.value.details()
                assert len(made) < 50, len(made)  # of 101 chunks: refused before it was read
        proc.stdin.write("report\n")
        proc.stdin.flush()
        end = json.loads(proc.stdout.readline())
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
    assert end["steps"] == [0]
    growth = end["VmHWM"] - start["VmHWM"]
    print(f"20 x 100 MiB to a party not reading: peak resident memory grew {growth / MIB:.0f} MiB")
    assert growth < 400 * MIB, f"peak resident memory grew by {growth / MIB:.0f} MiB"


def test_limits_set_in_the_config_reach_a_served_party(certs_dir) -> None:
    """`[limits]` in the TOML every process reads: written by launch, honoured by serve."""
    import tomllib

    from clicooper.config import RunConfig
    from clicooper.runtime.deploy.peers import config_toml
    from clicooper.runtime.transport.epoch import EpochTransport

    cfg = RunConfig.load(None, dataset="digits", **{"limits.work.max_tensors": 2})
    again = RunConfig.model_validate(tomllib.loads(config_toml(cfg)))
    assert again == cfg and again.limits.work.max_tensors == 2
    transport = EpochTransport(
        "t1", {"t1": "127.0.0.1:0"}, certs_dir / "t1", "s-limits", limits=again.limits
    )
    transport.rekey(1)
    try:
        assert transport.inner is not None and transport.inner.limits.work.max_tensors == 2
    finally:
        transport.close()
