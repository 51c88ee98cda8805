"""Parties not named after their certificates (nodes serving many sessions, issue 13).

``peer_identities`` binds each peer's party name to the certificate it must hold, both
ways: a message claiming to come from ``t1`` is accepted only over ``node-a``'s
certificate, and a message for ``t1`` is delivered only to a server proving it is
``node-a``. Real servers on 127.0.0.1, real certificates.
"""

from __future__ import annotations

import pytest
import torch

from clicooper.common.messages import Kind, Message, ProtocolError
from clicooper.runtime.certs import create_certificates
from clicooper.runtime.transport.grpc import GrpcTransport

SESSION = "ids-0001.1"


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ids")
    create_certificates(["alice", "node-a", "node-b", "t1"], out)
    return out


@pytest.fixture
def transports():
    opened = []
    yield opened
    for t in opened:
        t.close()


def _transport(opened, certs, name, identity, peers=None, peer_identities=None):
    t = GrpcTransport(
        name, "127.0.0.1:0", peers or {}, certs / identity, SESSION, send_timeout=3.0,
        identity=identity, peer_identities=peer_identities,
    )  # fmt: skip
    opened.append(t)
    return t.start()


def _forward():
    return Message(Kind.FORWARD, 1, "t1", "do", {"x": torch.ones(2)}, {})


def test_a_sender_is_bound_to_the_certificate_named_for_it(certs, transports):
    owner = _transport(transports, certs, "do", "alice", peer_identities={"t1": "node-a"})
    to_owner = {"do": f"127.0.0.1:{owner.port}"}
    ids = {"do": "alice"}
    honest = _transport(transports, certs, "t1", "node-a", to_owner, ids)
    honest.send(_forward())
    assert owner.recv("do", timeout=5).sender == "t1"
    for impostor in ("node-b", "t1"):  # another node; a certificate named after the role
        t = _transport(transports, certs, "t1", impostor, to_owner, ids)
        with pytest.raises(ProtocolError, match=f"'t1' does not match TLS identity '{impostor}'"):
            t.send(_forward())


def test_a_receiver_must_prove_the_certificate_named_for_it(certs, transports):
    """alice sends to t1 at an address where node-b listens: the handshake refuses it."""
    node_b = _transport(transports, certs, "t1", "node-b", peer_identities={"do": "alice"})
    owner = _transport(
        transports, certs, "do", "alice", {"t1": f"127.0.0.1:{node_b.port}"}, {"t1": "node-a"}
    )
    with pytest.raises(ConnectionError):
        owner.send(Message(Kind.CONTROL, 0, "do", "t1", {}, {"op": "status"}))
    with pytest.raises(TimeoutError):
        node_b.recv("t1", timeout=0.5)
