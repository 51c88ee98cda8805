"""Release once without the owner in each step's loop (issue 13, the transport's cost).

The owner sends a step's record ids as soon as it has the loss of the step before, not
after t1's word that the step is done; t1 holds the forward of a later step until the
step it is in is applied. So a step costs the chain's hops only, and trains exactly as
when the owner waits: the tests compare the weights bit for bit, and check each side's
refusals (an early forward held, not computed on stale weights; a word for a step never
sent, or a second one, refused; nothing else sent before every step is said done).
"""

from __future__ import annotations

import pytest
import torch
from cc_helpers import SpyTransport, quick_config

from clicooper.common.messages import Kind, Message, ProtocolError
from clicooper.parties import DataOwner, Trainer
from clicooper.parties.releases import OwnerRelease
from clicooper.privacy.activation import ActivationNoise
from clicooper.privacy.secrets import OwnerSecret
from clicooper.runtime import factory
from clicooper.runtime import session as session_mod
from clicooper.runtime.transport.inprocess import InProcessTransport

ONCE = {"privacy.release": "once", "labels.mode": "keyed", "head.source": "random"}
META = {"micro": 0, "micros": 1, "epoch": 1, "weight": 1.0}


def _weights(sess) -> list[torch.Tensor]:
    return [p.detach().clone() for p in sess.model.parameters()]


def test_steps_sent_early_train_exactly_as_steps_sent_after_each_is_done(
    tmp_path, small_digits, monkeypatch
):
    """Three trainers, two micro-batches: the owner has t3's loss before t2 has passed
    the gradient on, so the next step's ids reach t1 before the gradient of the step
    before, and t1 must hold them."""
    cfg = quick_config(trainers=3, micro_batches=2, **ONCE, **{"watermark.enabled": False})
    spy: list[SpyTransport] = []
    with monkeypatch.context() as m:
        m.setattr(factory, "InProcessTransport", lambda: spy.append(SpyTransport()) or spy[0])
        early = session_mod.run(cfg, tmp_path / "early", data=small_digits)
    to_t1 = spy[0].delivered["t1"]
    held = [
        m.step
        for i, m in enumerate(to_t1)
        if m.kind == Kind.FORWARD
        and any(b.kind == Kind.BACKWARD and b.step == m.step - 1 for b in to_t1[i + 1 :])
    ]
    assert len(held) > 10  # most steps reached t1 early

    real = DataOwner.cached_step

    def waiting(self, *args, **kwargs):  # the owner of before: every step said done first
        out = real(self, *args, **kwargs)
        self.settle()
        return out

    secret = tmp_path / "early" / "owner" / "owner.secret"
    with monkeypatch.context() as m:
        m.setattr(DataOwner, "cached_step", waiting)
        strict_cfg = cfg.model_copy(update={"owner_secret": secret})
        strict = session_mod.run(strict_cfg, tmp_path / "strict", data=small_digits)
    pairs = zip(_weights(early), _weights(strict), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    losses = [[h["loss"] for h in s.results["history"]] for s in (early, strict)]
    assert losses[0] == losses[1]
    assert early.results["accuracy"]["test"] == strict.results["accuracy"]["test"]


def _t1() -> tuple[Trainer, InProcessTransport, torch.nn.Linear]:
    torch.manual_seed(0)
    segment = torch.nn.Linear(4, 4)
    transport = InProcessTransport()
    trainer = Trainer(1, 2, segment, 0.1)
    transport.attach(trainer)
    transport.add_mailbox("t2")
    transport.add_mailbox("do")
    return trainer, transport, segment


def test_t1_holds_a_later_steps_forward_until_the_step_is_applied() -> None:
    trainer, transport, segment = _t1()
    x1, x2 = torch.randn(3, 4), torch.randn(3, 4)
    trainer.handle(Message(Kind.FORWARD, 1, "do", "t1", {"x": x1}, META))
    assert transport.recv("t2").step == 1
    with torch.no_grad():
        stale = segment(x2)
    trainer.handle(Message(Kind.FORWARD, 2, "do", "t1", {"x": x2}, META))
    with pytest.raises(ProtocolError, match="no party has work"):
        transport.recv("t2")  # held: nothing went on to t2
    trainer.handle(Message(Kind.BACKWARD, 1, "t2", "t1", {"g": torch.ones(3, 4)}, META))
    assert transport.recv("do").kind == Kind.BACKWARD and trainer.steps_applied == 1
    second = transport.recv("t2")
    assert second.step == 2
    with torch.no_grad():
        assert torch.allclose(second.tensors["x"], segment(x2))  # the applied weights
    assert not torch.allclose(second.tensors["x"], stale)


def test_held_forwards_are_bounded_and_a_rollback_forgets_them() -> None:
    trainer, transport, _ = _t1()
    trainer.handle(Message(Kind.FORWARD, 1, "do", "t1", {"x": torch.randn(3, 4)}, META))
    for step in range(2, 2 + trainer.max_pending):
        trainer.handle(Message(Kind.FORWARD, step, "do", "t1", {"x": torch.randn(3, 4)}, META))
    flood = Message(Kind.FORWARD, 9, "do", "t1", {"x": torch.randn(3, 4)}, META)
    with pytest.raises(ProtocolError, match="over the limit max_pending"):
        trainer.handle(flood)
    trainer.reset_transient()
    trainer.handle(flood)  # nothing held any more: computed and sent on at once
    assert [transport.recv("t2").step for _ in range(2)] == [1, 9]


def _owner() -> tuple[DataOwner, InProcessTransport]:
    torch.manual_seed(0)
    head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 8)).eval()
    rel = OwnerRelease(head, ActivationNoise(1.0, 0.5), OwnerSecret(bytes(32)), torch.rand(8, 64))
    rel.pending = []  # every chunk is at t1
    transport = InProcessTransport()
    for name in ("do", "t1", "t2"):
        transport.add_mailbox(name)
    return DataOwner(transport, head, 2, 1e-3, rel.noise, release=rel), transport


def _step(owner: DataOwner, transport: InProcessTransport, step: int) -> None:
    """One cached step whose loss t2 has sent already (and t1 has said nothing)."""
    logits = {"logits": torch.zeros(4, 3)}
    transport.send(Message(Kind.LOSS, step, "t2", "do", logits, {"loss": 1.0, "micro": 0}))
    owner.cached_step(torch.zeros(4, dtype=torch.long), torch.arange(4), 1)


def _done(step: int, **tensors: torch.Tensor) -> Message:
    return Message(Kind.BACKWARD, step, "t1", "do", tensors, {"micro": 0, "micros": 1})


def test_the_owner_sends_the_next_step_without_t1s_word_and_settles_before_a_control():
    owner, transport = _owner()
    _step(owner, transport, 1)
    _step(owner, transport, 2)  # step 1 not said done: the owner went on
    assert [m.step for m in map(lambda _: transport.recv("t1"), range(2))] == [1, 2]
    with pytest.raises(ProtocolError, match="no party has work"):
        owner.control("t1", "checkpoints")  # waits for t1's word first: nothing sent
    with pytest.raises(ProtocolError, match="no party has work"):
        transport.recv("t1")
    transport.send(_done(1))
    transport.send(_done(2))
    transport.send(Message(Kind.REPLY, 2, "t1", "do", {}, {"op": "ping"}))
    assert owner.control("t1", "ping").meta["op"] == "ping"
    assert transport.recv("t1").meta["op"] == "ping"  # sent once both steps were done


@pytest.mark.parametrize(
    ("word", "match"),
    [
        (_done(1), "told already"),  # a second word for step 1
        (_done(5), "did not send"),  # a step never sent
        (_done(2, g=torch.zeros(4, 8)), "release once takes none"),  # a gradient
    ],
)
def test_the_owner_refuses_a_word_it_did_not_ask_for(word, match):
    owner, transport = _owner()
    _step(owner, transport, 1)
    transport.send(_done(1))
    owner.settle()
    _step(owner, transport, 2)
    transport.send(word)
    with pytest.raises(ProtocolError, match=match):
        owner.settle() if word.step == 2 else owner.receive({"t2"}, "a test")
