"""A peer that floods a trainer with activations for steps that never complete cannot
grow its maps of half-done work past ``max_pending`` (real trainer, real gRPC).

A middle trainer keeps a step's forward passes until their gradient comes back
(``_stash``) and holds the forwards of later steps until then (``_deferred``); the last
one keeps activations until their labels arrive (``_waiting``). t1 sends activations for
40 distinct steps and never a gradient or a label.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from clicooper.common.messages import Kind, Message, ProtocolError
from clicooper.parties.trainer import Trainer, pending_limit
from clicooper.runtime.transport.grpc import serve_forever

FLOOD = 40


@pytest.mark.parametrize(("n_trainers", "held", "kept"), [(3, "_deferred", 5), (2, "_waiting", 4)])
def test_flooded_trainer_holds_at_most_max_pending(net, n_trainers, held, kept) -> None:
    t1, t2 = net.pair()
    t3 = net.transport("t3")
    t2.peers["t3"] = f"127.0.0.1:{t3.port}"
    trainer = Trainer(2, n_trainers, torch.nn.Linear(4, 4), 0.1, max_pending=pending_limit(2))
    stop = threading.Event()
    serving = threading.Thread(target=serve_forever, args=(trainer, t2, stop), daemon=True)
    serving.start()
    try:
        for step in range(1, FLOOD + 1):
            meta = {"micro": 0, "micros": 2, "epoch": 1, "weight": 0.5}
            t1.send(Message(Kind.FORWARD, step, "t1", "t2", {"x": torch.ones(3, 4)}, meta))
        errors = []
        deadline = time.monotonic() + 20
        while len(errors) < FLOOD - kept and time.monotonic() < deadline:
            msg = t1.recv("t1", timeout=max(0.1, deadline - time.monotonic()))
            assert msg.kind == Kind.ERROR
            errors.append(msg.meta["error"])
    finally:
        stop.set()
        serving.join(timeout=5)
    assert len(getattr(trainer, held)) == 4 == trainer.max_pending
    assert len(errors) == FLOOD - kept
    assert all("over the limit max_pending = 4" in e for e in errors), errors[0]
    assert all("\n" not in e for e in errors)
    if n_trainers == 3:  # step 1's pass went on to t3; the held ones wait for its gradient
        assert len(trainer._stash) == 1
        assert t3.recv("t3", timeout=5).step == 1
        with pytest.raises(TimeoutError):
            t3.recv("t3", timeout=0.5)


def test_labels_beyond_max_pending_are_refused() -> None:
    """The last trainer's labels (sent by do alone) are bounded the same way."""
    from clicooper.runtime.transport.inprocess import InProcessTransport

    transport = InProcessTransport()
    trainer = Trainer(1, 1, torch.nn.Linear(4, 4), 0.1, max_pending=4)
    transport.attach(trainer)
    y = torch.zeros(8, dtype=torch.long)
    trainer.handle(Message(Kind.LABELS, 1, "do", "t1", {"y": y}, {"micros": 4}))
    with pytest.raises(ProtocolError, match="over the limit max_pending = 4"):
        trainer.handle(Message(Kind.LABELS, 2, "do", "t1", {"y": y}, {"micros": 1}))
    assert len(trainer._labels) == 4
