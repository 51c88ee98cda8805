"""A trainer: holds one consecutive segment of the model and trains it for the owner.

Forward: receive activations from the previous party, run the segment, pass
the output on (or, at the last trainer, compute the loss on pseudo-labels).
Backward: receive the gradient of the loss w.r.t. this segment's output,
backpropagate, send the gradient w.r.t. the input back. Gradients of the
micro-batches of one batch accumulate; the optimizer steps after the last one,
so pipelined micro-batches give the same update as one whole batch.

With release once (``releases``, t1 only: :mod:`clicooper.parties.releases`) t1
takes the owner's noisy activations once, as RELEASE chunks it caches, and each
training step names only record ids; it sends the owner no gradient, only an
empty BACKWARD saying the step is done. The owner does not wait for it: it sends the
next step's ids at once, and t1 holds a forward pass of a later step until the step it
is in is applied (:meth:`Trainer._on_forward`), so every step starts from the weights
the step before left, as in-process.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Callable, Sized
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clicooper.common.checks import (
    MAX_STEP,
    as_int,
    meta_float,
    meta_hex,
    meta_int,
    require_sender,
)
from clicooper.common.messages import Kind, Message, ProtocolError
from clicooper.common.modes import inference
from clicooper.parties.recorder import Recorder
from clicooper.parties.releases import ReleaseCache
from clicooper.privacy.gradient import GradientNoise
from clicooper.runtime.compute import ComputeMeter
from clicooper.runtime.optim import OptimSettings, make_optimizer, phase_reset_step
from clicooper.runtime.rundirs import RunDir
from clicooper.runtime.transport.base import Party
from clicooper.watermark.chain import save_segment

log = logging.getLogger(__name__)
Key = tuple[int, int]  # (step, micro-batch)
#: Steps whose micro-batches a trainer may hold at once: the owner keeps one step in
#: flight, and with release once sends the next one's ids to t1 before that one is done.
PENDING_STEPS = 2


def pending_limit(micro_batches: int) -> int:
    """The ``max_pending`` bound for a session of ``micro_batches`` micro-batches a step."""
    return PENDING_STEPS * micro_batches


class Trainer(Party):
    """Trainer ``t<index>`` of a chain of ``n_trainers``."""

    def __init__(
        self,
        index: int,
        n_trainers: int,
        segment: nn.Module,
        lr: float | OptimSettings,
        out_dir: Path | None = None,
        recorder: Recorder | None = None,
        gradient_noise: GradientNoise | None = None,
        max_pending: int = pending_limit(1),
        device: torch.device | str = "cpu",
        releases: ReleaseCache | None = None,
        public: ReleaseCache | None = None,
    ) -> None:
        """``gradient_noise``: protects the gradients the last trainer sends back.
        ``releases``: t1's cache of the owner's one release per record (release once);
        ``public``: t1's cache of the public split's clean activations (the warm start).

        ``lr``: the optimizer settings (a float: Adam at that constant rate). ``device``:
        where the segment computes; tensors received move there, and every tensor sent
        is encoded from a CPU copy (:mod:`clicooper.runtime.device`).

        ``max_pending`` bounds each map of half-done work (forward passes awaiting
        their gradient, activations awaiting labels, labels awaiting activations), so
        a peer that floods messages for steps that never complete cannot grow them;
        :func:`pending_limit` derives it from the session's ``micro_batches``.
        """
        if max_pending < 1:
            raise ValueError(f"max_pending must be positive, got {max_pending}")
        if (releases is not None or public is not None) and index != 1:
            raise ValueError("only t1 takes the owner's releases")
        if public is not None and releases is None:
            raise ValueError("a public cache goes with a release cache")
        self.index, self.n_trainers = index, n_trainers
        self.name = f"t{index}"
        self.prev = "do" if index == 1 else f"t{index - 1}"
        self.next = None if index == n_trainers else f"t{index + 1}"
        self.device = torch.device(device)
        self.segment = segment.to(self.device)
        self.optimizer, self.scheduler = make_optimizer(segment.parameters(), lr, self.name)
        self.reset_after = phase_reset_step(lr)  # the optimizer starts afresh after this step
        self.out_dir = out_dir
        self.recorder = recorder or Recorder(0)
        self.gradient_noise = gradient_noise
        self.regulariser: Callable[[nn.Module], torch.Tensor] | None = None
        self.control_handlers: dict[str, Callable[[Message], dict[str, Any] | None]] = {}
        self.loss_observers: list[Callable[[float | None, bool], None]] = []
        self._stash: dict[Key, tuple[torch.Tensor, torch.Tensor]] = {}
        self._labels: dict[Key, torch.Tensor] = {}
        self._waiting: dict[Key, Message] = {}
        self._deferred: deque[Message] = deque()  # forwards of the step after the open one
        self.max_pending = max_pending
        self._registering = False  # a register op waits for the verifier's reply
        self.steps_applied = 0
        self.registration: dict[str, Any] = {}  # what this trainer tells the verifier
        self.session: dict[str, Any] = {}
        self.chain: Any = None  # its TrainerChain, when the watermark chain runs
        self.releases, self.public = releases, public
        if releases is not None:
            self.control_handlers["releases"] = lambda m: self._cache(m).held_chunks(m)
        self.compute = ComputeMeter()  # FLOPs and CPU seconds (clicooper.runtime.compute)

    def reset_transient(self) -> None:
        """Forget half-done work (after a rollback): stashed passes, labels, gradients."""
        self._stash.clear()
        self._labels.clear()
        self._waiting.clear()
        self._deferred.clear()
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def is_last(self) -> bool:
        return self.next is None

    def handle(self, msg: Message) -> None:
        handler = {
            Kind.FORWARD: self._on_forward,
            Kind.LABELS: self._on_labels,
            Kind.BACKWARD: self._on_backward,
            Kind.INFER: self._on_infer,
            Kind.RELEASE: self._on_release,
            Kind.CONTROL: self._on_control,
            Kind.REPLY: self._on_reply,
        }.get(msg.kind)
        if handler is None:
            raise ProtocolError(f"{self.name} does not accept {msg.kind} messages")
        with self.compute.active(), self._counted(msg.kind):
            handler(msg)

    def _counted(self, kind: Kind) -> contextlib.AbstractContextManager[None]:
        """Control work (the watermark's stage-end seal and BER reads) is rare and varies:
        counted each time; training and inference count their own blocks by shape."""
        if kind in (Kind.CONTROL, Kind.REPLY):
            return self.compute.count(None)
        return contextlib.nullcontext()

    # -- training -------------------------------------------------------------

    def _key(self, msg: Message) -> Key:
        """``(step, micro-batch)`` of a training message, after checking its fields."""
        micros = meta_int(msg, "micros", 1, MAX_STEP)
        meta_int(msg, "epoch", 0, MAX_STEP)
        return as_int(msg, "step", msg.step), meta_int(msg, "micro", 0, micros - 1)

    def _hold(self, pending: dict[Key, Any], key: Key, value: Any, what: str) -> None:
        """``pending[key] = value`` within ``max_pending`` entries (see :meth:`_room`)."""
        if key not in pending:
            self._room(pending, 1, what)
        pending[key] = value

    def _room(self, pending: Sized, n: int, what: str) -> None:
        """ProtocolError naming the limit unless ``n`` more entries fit in ``pending``."""
        if len(pending) + n > self.max_pending:
            raise ProtocolError(
                f"{self.name} would hold {len(pending) + n} {what}, over the limit max_pending "
                f"= {self.max_pending} ({PENDING_STEPS} x the session's micro_batches): a peer "
                "sends work for steps that never complete"
            )

    def _on_forward(self, msg: Message) -> None:
        """A forward pass, unless this trainer is in another step: then it waits its turn.

        Only t1 can get one early (release once: the owner sends the next step's ids
        without waiting for the step before to be applied); a later trainer gets a step
        from the one before it, which has applied the step before by then.
        """
        require_sender(msg, {self.prev}, "activations", self.name)
        key = self._key(msg)
        if self._deferred or self._in_other_step(key[0]):
            self._room(self._deferred, 1, "forward passes of a later step")
            self._deferred.append(msg)
            return
        self._forward_now(msg, key)

    def _in_other_step(self, step: int) -> bool:
        """Whether a forward pass of a step other than ``step`` awaits its gradient."""
        return any(held != step for held, _ in self._stash)

    def _run_deferred(self) -> None:
        """The forwards held back, in the order they came, now that the step is applied."""
        while self._deferred:
            key = self._key(self._deferred[0])
            if self._in_other_step(key[0]):
                return
            self._forward_now(self._deferred.popleft(), key)

    def _forward_now(self, msg: Message, key: Key) -> None:
        if self.releases is not None and ("x" in msg.tensors or "ids" not in msg.tensors):
            raise ProtocolError(
                f"{self.name} trains on its cached releases (release once): a training step "
                "names record ids, it carries no activations"
            )
        if self.is_last and key not in self._labels:
            self._hold(self._waiting, key, msg, "activations awaiting labels")
            return  # labels travel separately and may come later
        x = self._input(msg)
        with self.compute.count(("forward", tuple(x.shape))):
            out = self.segment(x)
        if self.is_last:
            self._finish_forward(msg, key, x, out)
        else:
            self._hold(self._stash, key, (x, out), "forward passes awaiting their gradient")
            self.send(
                Message(Kind.FORWARD, msg.step, self.name, self.next, {"x": out.detach()}, msg.meta)
            )

    def _input(self, msg: Message) -> torch.Tensor:
        """The forward input: the tensor sent, or (release once) t1's cached releases.

        The cached input takes a gradient only when it is recorded: nobody is sent one.
        """
        if self.releases is None:
            return msg.tensor("x").to(self.device).requires_grad_(True)
        x = self._cache(msg).training_rows(msg.tensor("ids")).to(self.device)
        return x.requires_grad_(self._recording(msg))

    def _recording(self, msg: Message) -> bool:
        """Whether this step's tensors are recorded: the owner's records only, never the
        public set's (release once's warm start and replay), which are not the owner's."""
        return self.recorder.wants(int(msg.meta["epoch"])) and msg.meta.get("set") != "public"

    def _cache(self, msg: Message) -> ReleaseCache:
        """The cache a message's ``set`` names: the private releases (the default) or the
        public split's activations."""
        name = msg.meta.get("set", "private")
        cache = self.releases if name == "private" else self.public if name == "public" else None
        if cache is None:
            raise ProtocolError(
                f"{self.name} holds no release set {name!r} (private, or public with a warm start)"
            )
        return cache

    def _on_release(self, msg: Message) -> None:
        """One chunk of the owner's single release: cached, then acknowledged."""
        require_sender(msg, {"do"}, "releases", self.name)
        if self.releases is None:
            raise ProtocolError(f"{self.name} takes no releases: the session releases every epoch")
        chunk = self._cache(msg).add(msg)
        self.send(
            Message(Kind.REPLY, msg.step, self.name, "do", {}, {"op": "release", "chunk": chunk})
        )

    def _on_labels(self, msg: Message) -> None:
        if msg.sender != "do" or not self.is_last:
            raise ProtocolError(f"{self.name} accepts labels only as the last trainer, from do")
        # one message a step: the whole batch's labels, split as the owner splits its batch
        y_all, micros = msg.tensor("y").long().to(self.device), msg.meta.get("micros")
        if not isinstance(micros, int) or not 1 <= micros <= max(len(y_all), 1):
            raise ProtocolError(f"labels for step {msg.step}: bad micro-batch count {micros!r}")
        self._room(self._labels, micros, "labels awaiting activations")
        for micro, y in enumerate(y_all.tensor_split(micros)):
            key = (msg.step, micro)
            self._labels[key] = y
            if key in self._waiting:
                self._on_forward(self._waiting.pop(key))

    def _finish_forward(
        self, msg: Message, key: Key, x: torch.Tensor, logits: torch.Tensor
    ) -> None:
        y = self._labels.pop(key)
        if y.shape[0] != logits.shape[0] or int(y.max()) >= logits.shape[1] or int(y.min()) < 0:
            raise ProtocolError(f"labels for step {msg.step} do not fit the batch or the classes")
        weight = meta_float(msg, "weight", 1e-12, 1.0)
        loss = nn.functional.cross_entropy(logits, y)
        total = loss * weight if weight != 1.0 else loss  # x * 1.0 == x: one op less
        with self.compute.count(("loss-backward", tuple(x.shape))):
            total.backward()
        self._regularise(msg.meta)
        value = loss.item()
        if self._recording(msg):
            self.recorder.add(
                int(msg.meta["epoch"]),
                msg.step,
                key[1],
                activation=x,
                gradient=x.grad,
                pseudo_labels=y,
            )
        if self.gradient_noise is not None:  # after the record: Tn's own gradient is clean
            x.grad = self.gradient_noise(x.grad, len(y) / weight)
        loss_msg = Message(
            Kind.LOSS,
            msg.step,
            self.name,
            "do",
            {"logits": logits.detach()},
            {"loss": value, "micro": key[1]},
        )
        self._send_back(msg.step, {**msg.meta, "loss": value}, x, loss_msg)

    def _on_backward(self, msg: Message) -> None:
        require_sender(msg, {self.next} if self.next else set(), "gradients", self.name)
        key = self._key(msg)
        if "loss" in msg.meta:  # the last trainer's loss, passed back to the observers
            meta_float(msg, "loss")
        if key not in self._stash:
            raise ProtocolError(
                f"{self.name} has no forward pass for step {msg.step} micro {key[1]}"
            )
        x, out = self._stash.pop(key)
        grad = msg.tensor("g").to(self.device)
        if grad.shape != out.shape:
            raise ProtocolError(f"gradient shape {tuple(grad.shape)} != output {tuple(out.shape)}")
        with self.compute.count(("backward", tuple(out.shape))):
            out.backward(grad)
        self._regularise(msg.meta)
        if self._recording(msg):
            self.recorder.add(
                int(msg.meta["epoch"]), msg.step, key[1], activation=x, gradient=x.grad
            )
        self._send_back(msg.step, msg.meta, x)

    def _regularise(self, meta: dict[str, Any]) -> None:
        """Add the watermark term's gradient (see :meth:`_regularisation`) to the segment's.

        Its own backward pass, after the loss's: gradients add, so this is the gradient of
        loss + term; apart, its FLOPs (which the mark's lazy schedule varies) are counted
        every time, as the trainer's work, while the loss's passes reuse one count a shape.
        """
        if self.regulariser is None:
            return  # no mark (vanilla, or strength 0): not even an empty count
        with self.compute.count(None):
            reg = self._regularisation(meta)
            if reg is not None:
                reg.backward()

    def _regularisation(self, meta: dict[str, Any]) -> torch.Tensor | None:
        """The watermark term, once a step: with the batch's last micro-batch; None when
        there is none (a zero term would only add autograd work, not change a gradient).

        The weights do not change within a step, so one whole term equals the sum of
        the micro-batches' weighted terms, and the mark's lazy schedule counts steps
        whatever the number of micro-batches.
        """
        if self.regulariser is None or int(meta["micro"]) != int(meta["micros"]) - 1:
            return None
        return self.regulariser(self.segment)

    def _send_back(
        self, step: int, meta: dict[str, Any], x: torch.Tensor, loss_msg: Message | None = None
    ) -> None:
        """Pass the gradient (and loss) back, and the last trainer's LOSS to the owner; step
        after the batch's last micro-batch, then take the forwards held for the next step.

        The LOSS leaves from the link's sender thread, beside the gradient rather than
        behind it: with release once the owner sends the next step when it has the loss,
        so both paths to t1's next step (the gradients back down the chain, the loss to
        the owner and the next ids to t1) start at once. t1's word that a release-once
        step is done leaves the same way: the owner does not wait for it, so t1 applies
        the step and starts the next without waiting for the owner's receipt. The
        optimizer step (which leaves ``x.grad`` as it is) then runs while the chain works
        on. Messages are handled one at a time, so the step is applied before this
        trainer takes any later message, and a link keeps its order.
        """
        # release once: the owner's head takes no gradient, t1 only says the step is done
        back = {} if self.releases is not None else {"g": x.grad}
        if loss_msg is not None:  # to the owner at once: it sends the next step on it
            self.transport.send_later(loss_msg).add_done_callback(_log_failure)
        back_msg = Message(Kind.BACKWARD, step, self.name, self.prev, back, meta)
        if self.releases is not None:  # the word "done" the owner takes as it comes
            self.transport.send_later(back_msg).add_done_callback(_log_failure)
        else:
            self.send(back_msg)
        applied = int(meta["micro"]) == int(meta["micros"]) - 1
        if applied:
            self._apply()
            self._run_deferred()
        loss = meta.get("loss")
        for observe in self.loss_observers:
            observe(float(loss) if loss is not None else None, applied)

    def _apply(self) -> None:
        """The optimizer step of the gradients accumulated; after a release-once warm
        start's last step, with a fresh optimizer, the optimizer's state is dropped."""
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps_applied += 1
        if self.reset_after and self.scheduler.last_epoch == self.reset_after:
            self.optimizer.state.clear()  # the releases' steps: moments of their own

    # -- inference and control --------------------------------------------------

    def _on_infer(self, msg: Message) -> None:
        require_sender(msg, {self.prev}, "activations", self.name)
        x = msg.tensor("x").to(self.device)
        with inference(self.segment), self.compute.count(("infer", tuple(x.shape)), "infer"):
            out = self.segment(x)
        kind, to = (Kind.LOGITS, "do") if self.is_last else (Kind.INFER, self.next)
        self.send(Message(kind, msg.step, self.name, to, {"x": out}, msg.meta))

    def _on_control(self, msg: Message) -> None:
        """Control ops come only from the data owner, which drives the session."""
        op = msg.meta.get("op")
        require_sender(msg, {"do"}, f"control op {op!r}", self.name)
        self._check_step_arg(msg, op)
        if op == "finish":
            sealed = self.chain.sealed if self.chain is not None else []
            answer = {
                **self.save_segment(),
                "steps_applied": self.steps_applied,
                "sealed_bits": sealed,
                "compute": self.compute.report(),
            }
        elif op == "register":
            self._registering = True
            self.send(
                Message(
                    Kind.REGISTER,
                    msg.step,
                    self.name,
                    "verifier",
                    {},
                    {"party": self.name, **self.registration},
                )
            )
            return  # answered once the verifier replies
        elif op in self.control_handlers:
            answer = self.control_handlers[op](msg)
            if answer is None:
                return  # another party answers (e.g. the verifier, after an audit)
        else:
            raise ProtocolError(f"{self.name} does not know control op {op!r}")
        self.send(Message(Kind.REPLY, msg.step, self.name, msg.sender, {}, {"op": op, **answer}))

    def _check_step_arg(self, msg: Message, op: Any) -> None:
        """A checkpoint names the step this trainer has applied; a restore, a sane step."""
        if op == "checkpoint":
            step = meta_int(msg, "step")
            if step != self.steps_applied:
                raise ProtocolError(
                    f"{self.name} cannot checkpoint step {step}: it has applied "
                    f"{self.steps_applied} steps"
                )
        elif op == "restore":
            meta_int(msg, "step")

    def _on_reply(self, msg: Message) -> None:
        """Only the verifier's answer to this trainer's pending registration."""
        require_sender(msg, {"verifier"}, "replies", self.name)
        if msg.meta.get("op") != "register" or not self._registering:
            raise ProtocolError(f"{self.name} did not expect a reply from {msg.sender}")
        session_id = meta_hex(msg, "session_id", 16)
        self._registering = False
        self.session = dict(msg.meta)
        self.send(
            Message(
                Kind.REPLY,
                msg.step,
                self.name,
                "do",
                {},
                {"op": "register", "session_id": session_id},
            )
        )

    def save_segment(self) -> dict[str, Any]:
        """Write the segment to ``out_dir/segments/<name>.safetensors`` and the records."""
        if self.out_dir is None:
            return {}
        path = RunDir(self.out_dir).segment(self.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_segment(path, self.segment.state_dict())  # canonical bytes: file hash = ledger hash
        if self.recorder.limit:
            self.recorder.save(RunDir(self.out_dir).records / f"{self.name}.safetensors")
        return {"segment": str(path)}


def _log_failure(delivery: Future[None]) -> None:
    """A message to the owner that did not reach it (the loss, or t1's word that a step
    is done): the owner times out waiting for it and recovers the step."""
    if delivery.exception() is not None:
        log.warning("a message did not reach the owner: %s", delivery.exception())
