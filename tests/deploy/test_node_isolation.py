"""Identity and isolation on nodes (issue 13, point 3), adversarial, against real nodes.

alice's session has trainer-1 as t1; bob's has trainer-1 as t1 and trainer-2 as t2. Every
owner holds its own certificate from the pool's CA. A message is let into a session
only when the TLS certificate that carried it is the one the session's owner named for
the party the message claims to come from.
"""

from __future__ import annotations

import grpc
import pytest
from cc_helpers import quick_config
from nodes import LocalPool

from clicooper.common.messages import Kind, Message, ProtocolError
from clicooper.node.admission import NOT_ENDED, REFUSAL_KEY
from clicooper.node.artifacts import fetch, fetch_request
from clicooper.node.client import AdmissionRefused, NodeAddress, Owner
from clicooper.node.state import ABORTED, ACTIVE
from clicooper.proto import FETCH_METHOD, Envelope, FileChunk
from clicooper.runtime.certs import create_certificates, load_party_credentials
from clicooper.runtime.transport.grpc_wire import deliver, open_channel, split_message

VANILLA = {"mode": "vanilla", "transport": "grpc", "epochs": 1, "train_subset": 64}
#: What an owner may ask of its session's party: join it, read it, stop it, checkpoint it.
OPS = ["setup", "rekey", "status", "shutdown", "checkpoint", "restore", "finish"]


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    p = LocalPool(tmp_path_factory.mktemp("pool"), trainers=2, owners=["alice", "bob"])
    p.start()
    p.alice = p.admit("alice", quick_config(**VANILLA, trainers=1), trainers=["trainer-1"])
    p.bob = p.admit("bob", quick_config(**VANILLA, trainers=2))
    try:
        yield p
    finally:
        p.stop()


def _send(pool, cert, session_id, msg, seq=1, node="trainer-1", certs=None):
    """Deliver ``msg`` as the holder of ``cert`` (a bundle of ``certs``, default the pool's);
    "OK" or (status code, details)."""
    creds = load_party_credentials((certs or pool.root / "certs") / cert, cert)
    channel = open_channel(pool.nodes[node].listen, node, creds)
    try:
        deliver(channel, split_message(msg, session_id, seq), timeout=5.0)
        return "OK"
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    finally:
        channel.close()


def _error(sender="do", receiver="t1"):
    """An ERROR message: a party logs it and never answers, so it changes nothing."""
    return Message(Kind.ERROR, 0, sender, receiver, {}, {"error": "probe"})


def _active(pool, session, node="trainer-1"):
    return pool.nodes[node].state.get(session).state == ACTIVE


@pytest.mark.parametrize("op", OPS)
def test_an_owner_cannot_reach_another_owners_session(pool, op):
    """bob, as do, with any control op, in alice's session: refused by certificate."""
    msg = Message(Kind.CONTROL, 0, "do", "t1", {}, {"op": op, "epoch": 5, "ping": 1})
    for epoch in ("join", "1"):
        code, details = _send(pool, "bob", f"{pool.alice}.{epoch}", msg)
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert "'do' does not match TLS identity 'bob'" in details or "not this party" in details
    assert _active(pool, pool.alice)
    assert pool.nodes["trainer-1"]._served[pool.alice].transport.epoch is None  # never moved


def test_the_owner_itself_is_let_in_and_its_messages_cannot_be_replayed(pool):
    """alice's own message is accepted once; the same bytes again are a replay, and sent
    into bob's session (by alice, or rewritten) they are refused."""
    msg = _error()
    assert _send(pool, "alice", f"{pool.alice}.join", msg, seq=1) == "OK"
    code, details = _send(pool, "alice", f"{pool.alice}.join", msg, seq=1)
    assert code == grpc.StatusCode.ABORTED and "replayed seq 1" in details
    code, details = _send(pool, "alice", f"{pool.bob}.join", msg, seq=1)
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "'do' does not match TLS identity 'alice'" in details


def test_a_chain_neighbour_reaches_only_the_sessions_it_is_in(pool):
    """trainer-2 is bob's t2: it may send to bob's t1, never to alice's (it is not in her
    chain), whatever party it claims to be."""
    assert _send(pool, "trainer-2", f"{pool.bob}.join", _error("t2"), seq=1) == "OK"
    for claimed in ("t2", "t1", "do"):
        code, _ = _send(pool, "trainer-2", f"{pool.alice}.join", _error(claimed), seq=1)
        assert code == grpc.StatusCode.PERMISSION_DENIED
    # and bob's session has no t3 to be reached as, nor is trainer-1 bob's t2
    code, details = _send(pool, "trainer-2", f"{pool.bob}.join", _error("t2", "t3"), seq=2)
    assert code == grpc.StatusCode.PERMISSION_DENIED and "serves no session" in details


def test_an_owner_cannot_stop_or_take_another_owners_session_by_admission(pool):
    bob, node = pool.owners["bob"], pool.address("trainer-1")
    for op in ("abort", "commit", "rejoin"):
        with pytest.raises(ProtocolError, match=f"holds no session '{pool.alice}' of bob"):
            bob.request(node, op, session=pool.alice)
    with pytest.raises(AdmissionRefused, match=f"session id {pool.alice} is taken"):
        pool.admit("bob", quick_config(**VANILLA, trainers=1), session=pool.alice,
                   trainers=["trainer-1"])  # fmt: skip
    # a reservation naming someone else as do is refused as well
    with pytest.raises(ProtocolError, match="do must be the sender's certificate bob"):
        bob.request(node, "reserve", session="fresh", party="t1",
                    identities={"do": "alice", "t1": "trainer-1"},
                    peers={"do": bob.address, "t1": node.address}, settings={}, ttl=5)  # fmt: skip
    assert _active(pool, pool.alice)


def test_an_admission_request_cannot_be_replayed(pool):
    msg = Message(Kind.CONTROL, 0, "do", "trainer-1", {}, {"op": "abort", "session": "x"})
    code, details = _send(pool, "bob", "admit.0123456789ab", msg)
    assert code == grpc.StatusCode.PERMISSION_DENIED and "holds no session 'x'" in details
    code, details = _send(pool, "bob", "admit.0123456789ab", msg)
    assert code == grpc.StatusCode.ABORTED and "replayed admission request" in details


def test_a_session_id_is_never_used_twice(pool):
    cfg = quick_config(**VANILLA, trainers=1)
    session = pool.admit("alice", cfg, trainers=["trainer-2"])
    pool.owners["alice"].request(pool.address("trainer-2"), "abort", session=session)
    assert pool.nodes["trainer-2"].state.get(session).state == ABORTED
    code, _ = _send(pool, "alice", f"{session}.join", _error(), node="trainer-2")
    assert code == grpc.StatusCode.PERMISSION_DENIED  # nothing serves it any more
    with pytest.raises(AdmissionRefused, match="a session id is used once"):
        pool.admit("alice", cfg, session=session, trainers=["trainer-2"])
    with pytest.raises(ProtocolError, match="cannot be rejoined: aborted: aborted by its owner"):
        pool.owners["alice"].request(pool.address("trainer-2"), "rejoin", session=session)


def test_a_certificate_of_another_ca_is_refused(pool, tmp_path):
    """Same names, another CA: the TLS handshake fails, for an owner and for a node."""
    create_certificates(["alice", "trainer-2"], tmp_path / "foreign")
    for cert in ("alice", "trainer-2"):
        code, _ = _send(pool, cert, f"{pool.alice}.join", _error(), certs=tmp_path / "foreign")
        assert code == grpc.StatusCode.UNAVAILABLE
    forged = Owner("alice", tmp_path / "foreign" / "alice", "127.0.0.1:1")
    with pytest.raises(ConnectionError):
        forged.request(NodeAddress("trainer-1", pool.nodes["trainer-1"].listen), "abort",
                       timeout=2.0, session=pool.alice)  # fmt: skip
    assert _active(pool, pool.alice)


def _fetch(pool, cert, session_id, msg, node="trainer-1", refusal=False):
    """A raw ``Fetch`` as the holder of ``cert``: the paths sent, or (status code, details),
    with ``refusal``: (status code, the refusal kind the node's trailing metadata names)."""
    creds = load_party_credentials(pool.root / "certs" / cert, cert)
    channel = open_channel(pool.nodes[node].listen, node, creds)
    call = channel.unary_stream(
        FETCH_METHOD,
        request_serializer=Envelope.SerializeToString,
        response_deserializer=FileChunk.FromString,
    )
    try:
        (request,) = split_message(msg, session_id, 1)
        return sorted({chunk.path for chunk in call(request, timeout=5.0)})
    except grpc.RpcError as exc:
        if refusal:
            return exc.code(), dict(exc.trailing_metadata() or ()).get(REFUSAL_KEY)
        return exc.code(), exc.details()
    finally:
        channel.close()


def test_an_owner_cannot_fetch_another_owners_files_nor_its_own_while_active(pool, tmp_path):
    bob, alice, node = pool.owners["bob"], pool.owners["alice"], pool.address("trainer-1")
    with pytest.raises(ProtocolError, match=f"holds no session '{pool.alice}' of bob"):
        fetch(bob, node, "t1", pool.alice, tmp_path, timeout=1.0)
    with pytest.raises(TimeoutError, match="is still active"):
        fetch(alice, node, "t1", pool.alice, tmp_path, timeout=0.5)
    # "not yet" is named in the trailers, not only in words: the owner tries again
    raw = _fetch(pool, "alice", "admit.00a1", fetch_request("trainer-1", pool.alice), refusal=True)
    assert raw == (grpc.StatusCode.FAILED_PRECONDITION, NOT_ENDED)
    # a chain neighbour is not the owner either: trainer-2 is in bob's chain
    code, details = _fetch(pool, "trainer-2", "admit.00aa", fetch_request("trainer-1", pool.bob))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert not any(tmp_path.iterdir()) and _active(pool, pool.alice)


def test_a_fetch_must_be_a_fresh_admission_request_with_op_fetch(pool):
    msg = fetch_request("trainer-1", "x")
    code, details = _fetch(pool, "bob", "admit.00bb", msg)
    assert code == grpc.StatusCode.PERMISSION_DENIED and "holds no session 'x'" in details
    code, details = _fetch(pool, "bob", "admit.00bb", msg)
    assert code == grpc.StatusCode.ABORTED and "replayed admission request" in details
    code, details = _fetch(pool, "bob", f"{pool.bob}.join", msg)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "admit.<nonce>" in details
    abort = Message(Kind.CONTROL, 0, "do", "trainer-1", {}, {"op": "abort", "session": pool.bob})
    code, details = _fetch(pool, "bob", "admit.00cc", abort)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "op 'fetch'" in details
    assert _active(pool, pool.bob)  # the abort in a fetch did nothing


def test_the_owner_fetches_its_ended_session_once_it_is_over(pool, tmp_path):
    cfg = quick_config(**VANILLA, trainers=1)
    session = pool.admit("alice", cfg, trainers=["trainer-2"])
    alice, node = pool.owners["alice"], pool.address("trainer-2")
    alice.request(node, "abort", session=session)
    assert fetch(alice, node, "t1", session, tmp_path, timeout=5.0) == []  # never set up
    code, _ = _fetch(pool, "bob", "admit.00dd", fetch_request("trainer-2", session), "trainer-2")
    assert code == grpc.StatusCode.PERMISSION_DENIED
