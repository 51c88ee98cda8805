"""Real gRPC endpoints on 127.0.0.1 with real session certificates.

Every server and channel a test opens is registered with the ``net`` fixture
and closed at teardown, which then checks that no server worker thread is
left behind. (No ``__init__.py`` here on purpose: a package named ``grpc``
under tests/ would shadow the real grpc module.)
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from clicooper.common.serde import encode_tensors
from clicooper.proto import DELIVER_ONE_METHOD, Ack, Envelope
from clicooper.runtime.certs import create_certificates, load_party_credentials
from clicooper.runtime.transport.grpc import GrpcTransport
from clicooper.runtime.transport.grpc_wire import open_channel, send_stream

SESSION = "session-test-0001"
PARTIES = ["do", "t1", "t2", "t3"]


@pytest.fixture(scope="session")
def certs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The output of `certs init`: ``ca/`` and one bundle ``<party>/`` per party."""
    out = tmp_path_factory.mktemp("certs") / "session"
    create_certificates(PARTIES, out)
    return out


@pytest.fixture(scope="session")
def foreign_certs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same party names, but issued by a different CA."""
    out = tmp_path_factory.mktemp("foreign") / "session"
    create_certificates(PARTIES, out)
    return out


class Net:
    """Factory for transports and raw channels that are all closed at teardown."""

    session = SESSION

    def __init__(self, certs_dir: Path) -> None:
        self.certs_dir = certs_dir
        self._transports: list[GrpcTransport] = []
        self._channels: list[grpc.Channel] = []

    def transport(self, name: str, peers: dict[str, str] | None = None, **kw) -> GrpcTransport:
        """A started transport for ``name`` (its own bundle) listening on a free port."""
        kw.setdefault("send_timeout", 10.0)
        bundle = self.certs_dir / name
        t = GrpcTransport(name, "127.0.0.1:0", peers or {}, bundle, SESSION, **kw)
        self._transports.append(t)
        return t.start()

    def pair(self, **kw) -> tuple[GrpcTransport, GrpcTransport]:
        """``(t1, t2)`` where t1 can send to t2 and t2 to t1."""
        t2 = self.transport("t2", **kw)
        t1 = self.transport("t1", {"t2": f"127.0.0.1:{t2.port}"}, **kw)
        t2.peers["t1"] = f"127.0.0.1:{t1.port}"
        return t1, t2

    def channel(
        self,
        as_party: str,
        server: GrpcTransport,
        certs: Path | None = None,
        envelope_bytes: int = 4 << 20,
    ) -> grpc.Channel:
        """A mutual-TLS channel to ``server`` holding ``as_party``'s certificate (own bundle)."""
        creds = load_party_credentials((certs or self.certs_dir) / as_party, as_party)
        ch = open_channel(f"127.0.0.1:{server.port}", server.name, creds, envelope_bytes)
        self._channels.append(ch)
        return ch

    def insecure(self, server: GrpcTransport) -> grpc.Channel:
        ch = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        self._channels.append(ch)
        return ch

    @staticmethod
    def envelope(**fields) -> Envelope:
        """A valid one-chunk envelope t1 -> t2, seq 1, unless ``fields`` say otherwise."""
        values = {
            "session_id": SESSION,
            "seq": 1,
            "step": 0,
            "kind": "forward",
            "sender": "t1",
            "receiver": "t2",
            "meta_json": "{}",
            "payload": encode_tensors({"x": torch.arange(4.0)}),
            "chunk_index": 0,
            "chunk_count": 1,
        }
        values.update(fields)
        return Envelope(**values)

    @staticmethod
    def deliver(channel: grpc.Channel, stream: list[Envelope | bytes]) -> Ack:
        return send_stream(channel, stream, timeout=5.0)

    @staticmethod
    def deliver_one(channel: grpc.Channel, item: Envelope | bytes) -> Ack:
        """One request to ``DeliverOne`` (raw bytes are sent as they are)."""
        raw = item if isinstance(item, bytes) else item.SerializeToString()
        call = channel.unary_unary(DELIVER_ONE_METHOD, response_deserializer=Ack.FromString)
        return call(raw, timeout=5.0)

    def close(self) -> None:
        for ch in self._channels:
            ch.close()
        for t in self._transports:
            t.close()


@pytest.fixture
def net(certs_dir: Path) -> Iterator[Net]:
    n = Net(certs_dir)
    try:
        yield n
    finally:
        n.close()
    leaked = [t.name for t in threading.enumerate() if t.name.startswith("clicooper-grpc")]
    assert not leaked, f"server threads left running: {leaked}"
