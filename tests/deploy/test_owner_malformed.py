"""The data owner survives malformed answers: recovery, or a one-line error; no traceback.

A misbehaving peer rewrites one message on its way out. In-process (no recovery
there) the run ends with one :class:`ProtocolError` line naming the field, which
``clicooper run`` prints as its one-line error. Over real gRPC the owner's
recovery path takes over: the run rolls back to the last checkpoint and finishes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
import torch
from cc_helpers import quick_config
from served import Served

from clicooper.common.messages import Kind, Message, ProtocolError
from clicooper.models.assembly import preset_split
from clicooper.parties.data_owner import DataOwner
from clicooper.parties.trainer import Trainer
from clicooper.runtime import checkpoint
from clicooper.runtime.driver import Driver
from clicooper.runtime.session import run
from clicooper.runtime.transport.epoch import EpochTransport
from clicooper.runtime.transport.inprocess import InProcessTransport

Rewrite = Callable[[Message], Message]


def meta(**changes: Any) -> Rewrite:
    """Set (or, for the value ``...``, drop) meta fields."""

    def rewrite(msg: Message) -> Message:
        new = {k: v for k, v in msg.meta.items() if changes.get(k, 0) is not ...}
        new.update({k: v for k, v in changes.items() if v is not ...})
        return Message(msg.kind, msg.step, msg.sender, msg.receiver, msg.tensors, new)

    return rewrite


def tensor(name: str, value: Callable[[torch.Tensor], torch.Tensor]) -> Rewrite:
    """Replace tensor ``name`` by ``value(the tensor)``."""

    def rewrite(msg: Message) -> Message:
        tensors = {**msg.tensors, name: value(msg.tensors[name])}
        return Message(msg.kind, msg.step, msg.sender, msg.receiver, tensors, msg.meta)

    return rewrite


def is_(kind: Kind, sender: str, op: str | None = None, step: int = 2) -> Callable[[Message], bool]:
    def match(msg: Message) -> bool:
        ok = msg.kind == kind and msg.sender == sender and msg.receiver == "do"
        return ok and (op is None or msg.meta.get("op") == op) and msg.step >= step

    return match


class Corrupting(InProcessTransport):
    """The in-process transport, rewriting the first message ``match`` picks."""

    def __init__(self, match: Callable[[Message], bool], rewrite: Rewrite) -> None:
        super().__init__()
        self.match, self.rewrite, self.done = match, rewrite, False

    def send(self, msg: Message) -> None:
        if not self.done and self.match(msg):
            self.done, msg = True, self.rewrite(msg)
        super().send(msg)


LOSS, BACK, REPLY = Kind.LOSS, Kind.BACKWARD, Kind.REPLY
CASES = {
    "micro not an integer": (is_(LOSS, "t2"), meta(micro="0"), "field 'micro' must be an integer"),
    "micro missing": (is_(LOSS, "t2"), meta(micro=...), "has no field 'micro'"),
    "micro a float": (is_(LOSS, "t2"), meta(micro=0.5), "field 'micro' must be an integer"),
    "micro negative": (is_(LOSS, "t2"), meta(micro=-1), "field 'micro' must be an integer in"),
    "micro out of range": (is_(LOSS, "t2"), meta(micro=5), "in [0, 0]"),
    "micro a bool": (is_(LOSS, "t2"), meta(micro=False), "field 'micro' must be an integer"),
    "loss missing": (is_(LOSS, "t2"), meta(loss=...), "has no field 'loss'"),
    "loss NaN": (is_(LOSS, "t2"), meta(loss=math.nan), "field 'loss' must be a finite number"),
    "loss a string": (is_(LOSS, "t2"), meta(loss="low"), "field 'loss' must be a finite number"),
    "loss negative": (is_(LOSS, "t2"), meta(loss=-2.0), "field 'loss' must be a finite number"),
    "logits of another shape": (
        is_(LOSS, "t2"),
        tensor("logits", lambda t: torch.zeros(3, 10)),  # noqa: ARG005
        "logits from t2 have shape (3, 10)",
    ),
    "gradient not finite": (
        is_(BACK, "t1"),
        tensor("g", lambda t: torch.full_like(t, math.nan)),
        "tensor 'g' holds NaN or Inf values",  # refused as it is decoded
    ),
    "gradient micro a string": (is_(BACK, "t1"), meta(micro="x"), "field 'micro'"),
    "checkpoint step a string": (
        is_(REPLY, "t1", "checkpoint", 0),
        meta(step="7"),
        "field 'step' must be an integer",
    ),
    "finish steps bogus": (
        is_(REPLY, "t2", "finish", 0),
        meta(steps_applied=-4),
        "field 'steps_applied' must be an integer in",
    ),
    "finish steps missing": (
        is_(REPLY, "t1", "finish", 0),
        meta(steps_applied=...),
        "has no field 'steps_applied'",
    ),
    "finish sealed bits bogus": (
        is_(REPLY, "t1", "finish", 0),
        meta(sealed_bits="all"),
        "field 'sealed_bits' must be a list",
    ),
    "finish compute missing": (
        is_(REPLY, "t1", "finish", 0),
        meta(compute=...),
        "has no field 'compute'",
    ),
    "finish flops bogus": (
        is_(REPLY, "t2", "finish", 0),
        meta(compute={"flops": -1, "inference_flops": 0, "cpu_seconds": 1.0}),
        "field 'flops' must be an integer in",
    ),
    "finish cpu seconds bogus": (
        is_(REPLY, "t1", "finish", 0),
        meta(compute={"flops": 1, "inference_flops": 0, "cpu_seconds": math.inf}),
        "field 'cpu_seconds' must be a finite number",
    ),
    "an error instead of a reply": (
        is_(REPLY, "t2", "checkpoint", 0),
        lambda m: Message(Kind.ERROR, m.step, m.sender, m.receiver, {}, {"error": "disk full"}),
        "got error: disk full",
    ),
}


def _inprocess(tmp_path: Path, digits: Any, transport: InProcessTransport) -> int:
    """A vanilla run of 4 steps, every party in this process; the steps t2 applied."""
    cfg = quick_config(mode="vanilla", trainers=2, epochs=1, batch_size=16, train_subset=64)
    data = digits.limit(64, 32, seed=0)
    split = preset_split(cfg, data.image_shape, data.num_classes)
    trainers = [Trainer(i, 2, seg, cfg.lr) for i, seg in enumerate(split.segments, start=1)]
    for trainer in trainers:
        transport.attach(trainer)
        checkpoint.attach_trainer(trainer, tmp_path / trainer.name)
    transport.add_mailbox("do")
    owner = DataOwner(transport, split.head, 2, cfg.lr)
    parties = ["t1", "t2"]
    driver = Driver(
        owner, None, data, epochs=1, batch_size=16, seed=0, parties=parties,
        checkpoint_dir=tmp_path / "do", checkpoint_steps=2,
    )  # fmt: skip
    driver.run()
    finished = {p: owner.control(p, "finish").meta for p in parties}
    return finished["t2"]["steps_applied"]


def test_an_honest_inprocess_run_finishes(tmp_path, digits) -> None:
    assert _inprocess(tmp_path, digits, InProcessTransport()) == 4


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_malformed_answer_ends_the_run_with_one_line(tmp_path, digits, case) -> None:
    match, rewrite, expected = CASES[case]
    transport = Corrupting(match, rewrite)
    with pytest.raises(ProtocolError) as caught:
        _inprocess(tmp_path, digits, transport)
    assert transport.done
    assert expected in str(caught.value)
    assert "\n" not in str(caught.value)


class CorruptingEpoch(EpochTransport):
    """t2's real transport, rewriting two of its messages to do on the way out: the
    LOSS of step 3 (micro not an integer), then its answer to "checkpoints" in the
    recovery that follows (steps not integers)."""

    plan = [
        (is_(LOSS, "t2", step=3), meta(micro="one")),
        (is_(REPLY, "t2", "checkpoints", 0), meta(steps=["3", None])),
    ]

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.rewritten: list[str] = []

    def send(self, msg: Message, timeout: float | None = None) -> None:
        super().send(self._rewrite(msg), timeout)

    def send_later(self, msg: Message) -> Future[None]:  # how the last trainer sends LOSS
        return super().send_later(self._rewrite(msg))

    def _rewrite(self, msg: Message) -> Message:
        if len(self.rewritten) < len(self.plan):
            match, rewrite = self.plan[len(self.rewritten)]
            if match(msg):
                self.rewritten.append(f"{msg.kind} {msg.meta.get('op', '')}".strip())
                return rewrite(msg)
        return msg


def test_malformed_answers_over_grpc_go_through_recovery(tmp_path, digits) -> None:
    """The bad LOSS fails the step; the bad listing fails the first recovery; the second
    recovery rolls every party back to the step-2 checkpoint and the run finishes."""
    cfg = quick_config(
        mode="vanilla", trainers=2, epochs=1, batch_size=16, train_subset=96,
        checkpoint_steps=2, transport="grpc",
    )  # fmt: skip
    out = tmp_path / "run"
    served = Served(cfg, out, tmp_path / "certs", verifier=False)
    served.start(transports={"t2": CorruptingEpoch})
    try:
        session = run(cfg, out, data=digits.limit(96, 64, seed=0), deployment=served.deployment())
    finally:
        served.stop()
    assert served.transports["t2"].rewritten == ["loss", "reply checkpoints"]
    transport = session.results["transport"]
    assert transport["steps_applied"] == {"t1": 6, "t2": 6}
    [recovery] = transport["recoveries"]
    assert "field 'steps'" in recovery["error"]
    assert (recovery["failed_at_step"], recovery["resumed_from_step"]) == (3, 2)
