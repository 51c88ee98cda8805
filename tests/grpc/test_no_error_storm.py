"""An ERROR is never answered with an ERROR: two served parties exchange one, not a storm.

Before, a party that could not handle an ERROR (no party accepts one) reported
that with an ERROR of its own, and the two bounced ERRORs for as long as they ran.
Both ways a party is served are checked: ``serve_forever`` (any party on its
transport) and ``deploy.serve`` (a ``PartyHost``, as ``clicooper serve`` runs it).
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import torch

from clicooper.common.messages import Kind, Message
from clicooper.node.processes import free_ports
from clicooper.parties.trainer import Trainer
from clicooper.runtime.deploy.host import PartyHost, serve
from clicooper.runtime.transport.epoch import EpochTransport
from clicooper.runtime.transport.grpc import GrpcTransport, serve_forever

WINDOW = 2.0  # seconds over which messages are counted


class CountingGrpc(GrpcTransport):
    """A real gRPC transport that counts what it sends, by kind."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.sent: Counter[str] = Counter()

    def send(self, msg: Message) -> None:
        self.sent[str(msg.kind)] += 1
        super().send(msg)


class CountingEpoch(EpochTransport):
    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.sent: Counter[str] = Counter()

    def send(self, msg: Message, timeout: float | None = None) -> None:
        self.sent[str(msg.kind)] += 1
        super().send(msg, timeout)


def _bad_forward() -> Message:
    """Activations t1 may send t2, without the micro-batch fields t2 needs: one ERROR."""
    return Message(Kind.FORWARD, 1, "t1", "t2", {"x": torch.zeros(2, 4)}, {})


def test_serve_forever_answers_an_error_with_nothing(net, certs_dir) -> None:
    t2 = CountingGrpc("t2", "127.0.0.1:0", {}, certs_dir / "t2", net.session, send_timeout=5.0)
    t2.start()
    t1 = CountingGrpc(
        "t1", "127.0.0.1:0", {"t2": f"127.0.0.1:{t2.port}"}, certs_dir / "t1", net.session
    ).start()
    t2.peers["t1"] = f"127.0.0.1:{t1.port}"
    net._transports += [t1, t2]  # closed by the fixture
    parties = {
        "t1": Trainer(1, 3, torch.nn.Linear(4, 4), 0.1),
        "t2": Trainer(2, 3, torch.nn.Linear(4, 4), 0.1),
    }
    stop = threading.Event()
    threads = [
        threading.Thread(target=serve_forever, args=(parties[n], t, stop), daemon=True)
        for n, t in (("t1", t1), ("t2", t2))
    ]
    for th in threads:
        th.start()
    try:
        t1.send(_bad_forward())
        time.sleep(WINDOW)
    finally:
        stop.set()
        for th in threads:
            th.join(timeout=5)
    assert t1.sent == Counter({"forward": 1})
    assert t2.sent == Counter({"error": 1})


def test_served_party_hosts_exchange_one_error(certs_dir, tmp_path) -> None:
    from cc_helpers import quick_config

    cfg = quick_config(trainers=3)
    peers = {p: f"127.0.0.1:{port}" for p, port in zip(("t1", "t2"), free_ports(2), strict=True)}
    transports = {
        n: CountingEpoch(n, peers, certs_dir / n, "storm", send_timeout=5.0) for n in peers
    }
    hosts = {n: PartyHost("trainer", n, cfg, tmp_path) for n in peers}  # not set up: t2 refuses
    stop = threading.Event()
    threads = [
        threading.Thread(target=serve, args=(hosts[n], transports[n], stop), daemon=True)
        for n in peers
    ]
    for th in threads:
        th.start()
    try:
        deadline = time.monotonic() + 10
        while any(t.inner is None for t in transports.values()) and time.monotonic() < deadline:
            time.sleep(0.02)
        transports["t1"].send(_bad_forward())
        time.sleep(WINDOW)
        # no ping-pong: t2's one ERROR, and t1 is not marked broken by it
        assert transports["t1"].sent == Counter({"forward": 1})
        assert transports["t2"].sent == Counter({"error": 1})
        assert not hosts["t1"].broken
    finally:
        stop.set()
        for th in threads:
            th.join(timeout=10)
    assert not any(th.is_alive() for th in threads)
