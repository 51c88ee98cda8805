"""The owner's micro-batch count: measured over a concurrent transport, fixed otherwise;
and the trainer's send order (the gradient first, its optimizer step after)."""

from __future__ import annotations

import pytest
import torch

from clicooper.common.messages import Kind, Message
from clicooper.parties import pipelining
from clicooper.parties.pipelining import MicroBatches
from clicooper.parties.trainer import Trainer
from clicooper.runtime.transport.epoch import EpochTransport
from clicooper.runtime.transport.grpc import GrpcTransport
from clicooper.runtime.transport.inprocess import InProcessTransport

PROBE = pipelining.WARMUP_STEPS + 2 * pipelining.PROBE_ROUNDS * pipelining.BLOCK_STEPS


def _run(micros: MicroBatches, steps: int, seconds: dict[int, float]) -> list[int]:
    """The counts of ``steps`` steps, each taking ``seconds[count]``."""
    counts = []
    for _ in range(steps):
        counts.append(count := micros.next())
        micros.done(seconds[count])
    return counts


def test_fixed_count_without_a_concurrent_transport() -> None:
    micros = MicroBatches(4, adaptive=False)
    assert _run(micros, 50, {4: 9.0, 1: 1.0}) == [4] * 50
    assert micros.used == {4: 50}
    assert _run(MicroBatches(1, adaptive=True), 20, {1: 1.0}) == [1] * 20


@pytest.mark.parametrize(
    ("piped", "single", "kept"), [(0.5, 1.0, 4), (1.5, 1.0, 1), (0.99, 1.0, 1)]
)
def test_the_faster_count_is_kept_and_a_tie_goes_to_fewer_messages(piped, single, kept) -> None:
    """Both counts are timed in alternating blocks; pipelining is kept only when it is
    more than the margin faster (0.99 of the single-batch time is a tie)."""
    micros = MicroBatches(4, adaptive=True)
    counts = _run(micros, PROBE + 40, {4: piped, 1: single})
    probe = counts[pipelining.WARMUP_STEPS : PROBE]
    assert counts[: pipelining.WARMUP_STEPS] == [4] * pipelining.WARMUP_STEPS
    assert probe.count(4) == probe.count(1) == len(probe) // 2
    assert counts[PROBE:] == [kept] * 40


def test_the_count_is_measured_again_after_a_period() -> None:
    """The machine's load changes: after ``PERIOD_STEPS`` the counts are timed again."""
    micros = MicroBatches(2, adaptive=True)
    first = _run(micros, PROBE + pipelining.PERIOD_STEPS, {2: 2.0, 1: 1.0})
    assert set(first[PROBE:]) == {1}
    second = _run(
        micros, 2 * pipelining.PROBE_ROUNDS * pipelining.BLOCK_STEPS + 5, {2: 0.5, 1: 1.0}
    )
    assert set(second[:-5]) == {1, 2} and second[-5:] == [2] * 5


def test_a_confirmed_count_is_probed_ever_less_often_and_a_change_resets_the_wait() -> None:
    """Each probe that picks the count before it doubles the wait (to the maximum); a probe
    that picks the other count brings it back to ``PERIOD_STEPS``."""
    micros = MicroBatches(2, adaptive=True)
    probe = 2 * pipelining.PROBE_ROUNDS * pipelining.BLOCK_STEPS
    counts = _run(micros, pipelining.WARMUP_STEPS, {2: 2.0, 1: 1.0})
    waits = []
    for _ in range(5):  # pipelining loses every probe
        counts = _run(micros, probe, {2: 2.0, 1: 1.0})
        assert counts.count(2) == counts.count(1)  # a whole probe
        waits.append(micros._left)
        assert _run(micros, micros._left, {2: 2.0, 1: 1.0}) == [1] * waits[-1]
    p, top = pipelining.PERIOD_STEPS, pipelining.MAX_PERIOD_STEPS
    assert waits == [p, 2 * p, 4 * p, min(8 * p, top), min(16 * p, top)] and waits[-1] == top
    _run(micros, probe, {2: 0.5, 1: 1.0})  # now pipelining wins
    assert micros.chosen == 2 and micros._left == p


def test_a_lost_step_is_not_timed() -> None:
    """A step that failed (recovery: no ``done``) leaves no time behind; the next is timed,
    and ``done`` with no step begun is ignored."""
    micros = MicroBatches(2, adaptive=True)
    for _ in range(pipelining.WARMUP_STEPS):
        micros.next()
        micros.done(1.0)
    micros.next()  # the first timed step fails: no done()
    assert micros.next() == 2
    micros.done(3.0)
    micros.done(7.0)
    assert micros._times == {2: [3.0]}


def test_only_networked_transports_are_concurrent() -> None:
    assert not InProcessTransport.concurrent
    assert GrpcTransport.concurrent and EpochTransport.concurrent


class _Recording(InProcessTransport):
    """The in-process transport, noting each message and the segment's weight at send."""

    def __init__(self, segment: torch.nn.Module) -> None:
        super().__init__()
        self.segment, self.sent = segment, []

    def send(self, msg: Message) -> None:
        self.sent.append((msg.kind, msg.receiver, self.segment.weight.detach().clone()))
        super().send(msg)


def test_last_trainer_sends_its_loss_and_gradient_then_steps() -> None:
    """The last trainer's LOSS leaves (from the sender thread) without waiting behind its
    gradient, since with release once the owner sends the next step on it; the optimizer
    step runs after both are sent, within the same message's handling."""
    torch.manual_seed(0)
    segment = torch.nn.Linear(4, 3)
    before = segment.weight.detach().clone()
    transport = _Recording(segment)
    trainer = Trainer(2, 2, segment, 0.1)
    transport.attach(trainer)
    transport.add_mailbox("t1")
    transport.add_mailbox("do")
    trainer.handle(Message(Kind.LABELS, 1, "do", "t2", {"y": torch.tensor([0, 2])}, {"micros": 1}))
    meta = {"micro": 0, "micros": 1, "epoch": 1, "weight": 1.0}
    trainer.handle(Message(Kind.FORWARD, 1, "t1", "t2", {"x": torch.randn(2, 4)}, meta))
    assert [(kind, to) for kind, to, _ in transport.sent] == [
        (Kind.LOSS, "do"),
        (Kind.BACKWARD, "t1"),
    ]
    assert all(torch.equal(weight, before) for _, _, weight in transport.sent)
    assert trainer.steps_applied == 1 and not torch.equal(segment.weight, before)
    back = transport.recv("t1")
    assert back.tensors["g"].shape == (2, 4) and back.meta["loss"] > 0
