"""The data owner: holds the data, the labels, the head and every secret; drives training.

It is the only party that sees inputs and true labels. It sends noisy cut
activations to the first trainer and pseudo-labels to the last, and it alone
can map pseudo-logits back to true classes.

With release once (``release``: :mod:`clicooper.parties.releases`) the head is
frozen and has no optimizer; every training record's noisy activation goes to the
first trainer once, before training, and a training step sends the first trainer
only record ids and the last trainer the batch's pseudo-labels: the owner computes
no head pass and no backward pass while the chain trains.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from clicooper.common.checks import (
    MAX_STEP,
    meta_dict,
    meta_float,
    meta_hex,
    meta_int,
    meta_ints,
)
from clicooper.common.messages import Kind, Message, ProtocolError
from clicooper.data.base import Split
from clicooper.parties.pipelining import MicroBatches
from clicooper.parties.releases import MAX_CHUNKS, OwnerRelease
from clicooper.privacy.activation import ActivationNoise
from clicooper.privacy.labels import LabelObfuscator
from clicooper.runtime.compute import ComputeMeter
from clicooper.runtime.optim import OptimSettings, make_optimizer
from clicooper.runtime.transport.base import Transport

log = logging.getLogger(__name__)
ProgressFn = Callable[[int, int, int, float], None]  # epoch, batch, n_batches, loss
INFER_BATCH = 1024
#: Most checkpoint steps a party may list (it keeps a few; see runtime.checkpoint.KEEP).
MAX_LISTED = 1000
#: Bounds on what a trainer may report of its compute (``finish``): an exaFLOP a party, and
#: a CPU-year, far above any session; a value outside is a malformed reply.
MAX_FLOPS = 10**18
MAX_CPU_SECONDS = 3.2e7


@dataclass
class StepLog:
    """Which training samples went into each step (the owner's own bookkeeping)."""

    steps: list[int] = field(default_factory=list)
    epochs: list[int] = field(default_factory=list)
    sample_ids: list[torch.Tensor] = field(default_factory=list)


def epoch_batches(n: int, epoch: int, batch_size: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Sample ids of each batch of ``epoch``: a permutation seeded by ``seed + epoch``."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
    return order.split(batch_size)


class DataOwner:
    """Drives a split-learning session over a transport."""

    name = "do"

    def __init__(
        self,
        transport: Transport,
        head: nn.Module,
        n_trainers: int,
        lr: float | OptimSettings,
        noise: ActivationNoise | None = None,
        labels: LabelObfuscator | None = None,
        micro_batches: int = 1,
        noise_at_inference: bool = False,
        device: torch.device | str = "cpu",
        release: OwnerRelease | None = None,
        public: OwnerRelease | None = None,
        public_targets: torch.Tensor | None = None,
        adaptive: bool = False,
    ) -> None:
        """``lr``: the optimizer settings (a float: Adam at that constant rate); ``device``:
        where the head computes (data, noise and messages stay on the CPU); ``release``:
        release once, with this frozen head's single release (the head is
        ``release.head``); None: the head trains and is released every epoch.
        ``public``: release once's public set (the public split's clean activations, for
        the chain's warm start), with ``public_targets``, its records' pseudo-labels.
        ``adaptive``: each step's micro-batch count is measured, ``micro_batches`` or 1
        (:class:`~clicooper.parties.pipelining.MicroBatches`); False: ``micro_batches``."""
        self.transport = transport
        self.device = torch.device(device)
        self.head = head.to(self.device)
        self.trainers = [f"t{i}" for i in range(1, n_trainers + 1)]
        self.release, self.public, self.public_targets = release, public, public_targets
        if release is not None and release.head is not head:
            raise ValueError("release once releases the owner's own head")
        if public is not None and (release is None or public_targets is None):
            raise ValueError("a public set goes with release once and its pseudo-labels")
        self.optimizer, self.scheduler = (
            (None, None) if release else make_optimizer(head.parameters(), lr, self.name)
        )
        self.noise, self.labels = noise, labels
        self.micro_batches = micro_batches
        self.micros = MicroBatches(micro_batches, adaptive)
        self.noise_at_inference = noise_at_inference
        self.step = 0
        self._unacked: dict[int, set[int]] = {}  # release once: steps t1 has not said done
        self.releases = 0  # noisy releases of each training sample so far
        self.log = StepLog()
        self._classes: int | None = None  # pseudo-classes the last trainer reports
        self._frozen_outputs: tuple[torch.Tensor, list[torch.Tensor]] | None = None
        self.compute = ComputeMeter()  # FLOPs and CPU seconds (clicooper.runtime.compute)

    # -- training ---------------------------------------------------------------

    def train_mode(self) -> None:
        """The head in training mode, unless it is frozen (release once: always eval)."""
        if self.release is None:
            self.head.train()

    def warm_batch(self, public: Split, ids: torch.Tensor, epoch: int) -> tuple[float, int]:
        """One warm-start step on public records ``ids`` (their clean activations at t1,
        release once): (mean loss, correctly predicted samples)."""
        start = time.perf_counter()
        loss, pseudo_logits = self.cached_step(public.y[ids], ids, epoch, public=True)
        self.micros.done(time.perf_counter() - start)
        return loss, int((self.to_true(pseudo_logits).argmax(1) == public.y[ids]).sum())

    def train_batch(self, data: Split, ids: torch.Tensor, epoch: int) -> tuple[float, int]:
        """One training step on samples ``ids``: (mean loss, correctly predicted samples)."""
        start = time.perf_counter()
        if self.release is not None:
            loss, pseudo_logits = self.cached_step(data.y[ids], ids, epoch)
        else:
            loss, pseudo_logits = self.train_step(data.x[ids], data.y[ids], ids, epoch)
        self.micros.done(time.perf_counter() - start)
        return loss, int((self.to_true(pseudo_logits).argmax(1) == data.y[ids]).sum())

    def release_next(self) -> None:
        """One unit of the release phase: ask t1 what it holds, or send it one chunk.

        Each chunk's REPLY comes after t1 has written it, so a chunk t1 acknowledged
        survives its restart; after a recovery the driver sets ``pending`` to None and
        the owner asks again.
        """
        self.settle()
        release, first = self.releasing, self.trainers[0]
        if release.pending is None:
            reply = self.control(first, "releases", tag=release.tag, set=release.set)
            release.pending = sorted(set(range(release.chunks)) - set(reply.meta["chunks"]))
            return
        chunk = release.pending[0]
        if release.set == "public":  # the public split's pass: counted with its pretraining
            tensors, meta = release.message(chunk)
        else:
            # the frozen head's one pass is the owner's work; its FLOPs depend on the rows only
            with self.compute.count(("release", len(release.ids(chunk)))):
                tensors, meta = release.message(chunk)
        self.transport.send(Message(Kind.RELEASE, self.step, self.name, first, tensors, meta))
        if meta_int(self.expect_reply(first, "release"), "chunk") != chunk:
            raise ProtocolError(f"{first} acknowledged another release chunk than {chunk}")
        release.pending.pop(0)

    @property
    def releasing(self) -> OwnerRelease | None:
        """The release set still to send to t1 (the private one first), None when all are."""
        for release in (self.release, self.public):
            if release is not None and not release.done:
                return release
        return None

    def cached_step(
        self, y: torch.Tensor, ids: torch.Tensor, epoch: int, public: bool = False
    ) -> tuple[float, torch.Tensor]:
        """A release-once step: record ids to t1, labels to the last trainer; (loss,
        pseudo-logits). No head pass, no backward, nothing released. ``public``: ids of
        the public set (the warm start).

        It ends with the last trainer's loss, not with t1's word that the step is done:
        t1 holds the next step until this one is applied, so waiting here would only add
        the hops to t1 and back to every step. The word is taken as it comes
        (:meth:`receive`), and :meth:`settle` waits for it before anything else is sent."""
        if self.releasing is not None:
            raise ProtocolError("release once: training before every record was released")
        self._log_step(ids, epoch)
        micros = self.micros.next()
        if public:
            targets = self.public_targets[ids] if self.labels else y
        else:
            targets = self.labels.encode(y, ids) if self.labels else y
        sent = [self._send_labels(targets, micros)]
        parts = ids.tensor_split(micros)
        for micro, part in enumerate(parts):
            meta = {"micro": micro, "micros": micros, "weight": len(part) / len(y), "epoch": epoch}
            if public:
                meta["set"] = "public"
            to = self.trainers[0]
            msg = Message(Kind.FORWARD, self.step, self.name, to, {"ids": part}, meta)
            sent.append(self._forward(msg, last=micro == micros - 1))
        for delivery in sent:
            delivery.result()  # a failed delivery raises here, as send() would
        self._unacked[self.step] = set(range(micros))
        sizes = [len(part) for part in parts]
        logits, losses = self._collect(sizes)
        loss = sum(l_ * n for l_, n in zip(losses, sizes, strict=True)) / len(y)
        return float(loss), torch.cat(logits)

    def _log_step(self, ids: torch.Tensor, epoch: int) -> None:
        self.step += 1
        self.log.steps.append(self.step)
        self.log.epochs.append(epoch)
        self.log.sample_ids.append(ids.clone())

    def _send_labels(self, targets: torch.Tensor, micros: int) -> Any:
        """The step's pseudo-labels to the last trainer (delivery overlaps what follows)."""
        return self.transport.send_later(
            Message(
                Kind.LABELS,
                self.step,
                self.name,
                self.trainers[-1],
                {"y": targets},
                {"micros": micros},
            )
        )

    def train_step(
        self, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor, epoch: int
    ) -> tuple[float, torch.Tensor]:
        """:meth:`_train_step`, its FLOPs counted once per batch shape (runtime.compute)."""
        micros = self.micros.next()
        with self.compute.count(("step", tuple(x.shape), micros)):
            return self._train_step(x, y, ids, epoch, micros)

    def _train_step(
        self, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor, epoch: int, micros: int
    ) -> tuple[float, torch.Tensor]:
        """Forward through the chain, backward into the head, step; (loss, pseudo-logits).

        With micro-batches the head is pipelined too: micro-batch i leaves as soon as its
        head pass is done (the chain works on it while the head computes i + 1), and its
        gradient enters the head's backward as soon as it is back. The per-sample head,
        clip and one noise draw for the whole batch make this the same maths as one pass.
        """
        self._log_step(ids, epoch)
        targets = self.labels.encode(y, ids) if self.labels else y
        sent = [self._send_labels(targets, micros)]  # deliveries overlap the head's passes
        protected: list[torch.Tensor] = []
        noise: tuple[torch.Tensor, ...] = ()
        for micro, (xc, yc) in enumerate(
            zip(x.tensor_split(micros), y.tensor_split(micros), strict=True)
        ):
            z = self.head(xc.to(self.device))
            if self.noise is not None and not noise:  # one draw: the stream of one pass
                noise = self.noise.noise(torch.Size((len(x), *z.shape[1:]))).tensor_split(micros)
            protected.append(self.noise.clip(z) if self.noise else z)
            released = protected[-1].detach().cpu()  # the noise and every message: CPU
            if noise:  # encoding copies: without noise no tensor of its own is needed
                released = released + noise[micro]
            meta = {"micro": micro, "micros": micros, "weight": len(yc) / len(y), "epoch": epoch}
            msg = Message(
                Kind.FORWARD, self.step, self.name, self.trainers[0], {"x": released}, meta
            )
            sent.append(self._forward(msg, last=micro == micros - 1))
        for delivery in sent:
            delivery.result()  # a failed delivery raises here, as send() would
        logits, losses = self._collect([len(p) for p in protected], protected)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss = sum(l_ * len(p) for l_, p in zip(losses, protected, strict=True)) / len(y)
        return float(loss), torch.cat(logits)

    def _forward(self, msg: Message, last: bool) -> Future[None]:
        """Send a micro-batch to t1: the last one from this thread (nothing is left to
        overlap with its delivery, and a hand-off to a sender thread costs a wake-up on
        the critical path), the others in the background while the head computes."""
        if not last:
            return self.transport.send_later(msg)
        done: Future[None] = Future()
        self.transport.send(msg)  # raises like a failed delivery's result()
        done.set_result(None)
        return done

    def _collect(
        self, sizes: list[int], protected: list[torch.Tensor] | None = None
    ) -> tuple[list[torch.Tensor], list[float]]:
        """Backward each micro-batch's gradient (from t1) into the head as it arrives; the
        pseudo-logits and losses the last trainer reports. ``protected`` None (release
        once): only the losses; t1's empty acknowledgements are :meth:`receive`'s."""
        n = len(sizes)
        grads: set[int] = set()
        losses: dict[int, tuple[torch.Tensor, float]] = {}
        first, last = self.trainers[0], self.trainers[-1]
        wanted = n if protected is not None else 0
        while len(grads) < wanted or len(losses) < n:
            msg = self.receive({first, last}, "training")
            if msg.kind == Kind.BACKWARD and msg.sender == first and protected is not None:
                micro = self._micro(msg, n)
                if micro in grads:
                    raise ProtocolError(f"do got a second gradient for micro-batch {micro}")
                protected[micro].backward(self._gradient(msg, protected[micro]))
                grads.add(micro)
            elif msg.kind == Kind.LOSS and msg.sender == last:
                micro = self._micro(msg, n)
                if micro in losses:
                    raise ProtocolError(f"do got a second loss for micro-batch {micro}")
                logits = self._logits(msg, sizes[micro])
                losses[micro] = (logits, meta_float(msg, "loss", 0.0))
            else:
                raise ProtocolError(
                    f"do did not expect {msg.kind} from {msg.sender} while training: "
                    f"{msg.meta.get('error', '')}"
                )
        return [losses[i][0] for i in range(n)], [losses[i][1] for i in range(n)]

    def _micro(self, msg: Message, n: int) -> int:
        """The micro-batch a training answer belongs to (of this step, ``0 .. n - 1``)."""
        if msg.step != self.step:
            raise ProtocolError(f"do expected step {self.step}, got {msg.kind} for step {msg.step}")
        return meta_int(msg, "micro", 0, n - 1)

    @staticmethod
    def _gradient(msg: Message, activation: torch.Tensor) -> torch.Tensor:
        gradient = msg.tensor("g")
        if gradient.shape != activation.shape or gradient.dtype != activation.dtype:
            raise ProtocolError(
                f"gradient {gradient.dtype} {tuple(gradient.shape)} != activation "
                f"{activation.dtype} {tuple(activation.shape)}"
            )
        return gradient.to(activation.device)

    def _logits(self, msg: Message, rows: int, name: str = "logits") -> torch.Tensor:
        """Pseudo-logits of ``rows`` samples, as many classes as the labels (or as before)."""
        logits = msg.tensor(name)
        classes = self.labels.pseudo_classes if self.labels else self._classes
        ok = logits.ndim == 2 and logits.shape[0] == rows and logits.is_floating_point()
        if not ok or (classes is not None and logits.shape[1] != classes):
            raise ProtocolError(
                f"logits from {msg.sender} have shape {tuple(logits.shape)}, expected "
                f"({rows}, {classes if classes is not None else 'classes'})"
            )
        self._classes = logits.shape[1]
        return logits

    def receive(self, senders: Collection[str], what: str) -> Message:
        """The next message from one of ``senders``; any other is logged and dropped.

        Only the parties the owner is waiting on can answer it: a message from
        anyone else is never taken for their answer. t1's word that a step is done
        (release once) is taken on the way (:meth:`_acknowledgement`).
        """
        deadline = self._deadline()
        while True:
            msg = self._next(deadline, senders, what)
            if self._acknowledgement(msg):
                continue
            if msg.sender in senders:
                return msg
            self._drop(msg, senders, what)

    def settle(self) -> None:
        """Wait until t1 has said done every step sent (release once): before any other
        message leaves, so that every party takes it after the steps are applied."""
        first, deadline = self.trainers[0], self._deadline()
        what = "its word that the steps sent are done"
        while self._unacked:
            msg = self._next(deadline, {first}, what)
            if self._acknowledgement(msg):
                continue
            if msg.sender == first:
                raise ProtocolError(
                    f"do expected {first} to say step {min(self._unacked)} is done, got "
                    f"{msg.kind}: {msg.meta.get('error', '')}"
                )
            self._drop(msg, {first}, what)

    def forget_steps_in_flight(self) -> None:
        """After a failure: the steps not yet said done are rolled back, not awaited."""
        self._unacked.clear()

    def _acknowledgement(self, msg: Message) -> bool:
        """Whether ``msg`` is t1's word that a step sent is done (release once), taken."""
        if self.release is None or msg.kind != Kind.BACKWARD or msg.sender != self.trainers[0]:
            return False
        if msg.tensors:
            raise ProtocolError(
                f"{msg.sender} sent do a gradient: release once takes none (the head is frozen)"
            )
        due = self._unacked.get(msg.step, set())
        micro = meta_int(msg, "micro", 0, max(due, default=0))
        if micro not in due:
            raise ProtocolError(
                f"{msg.sender} said step {msg.step} micro-batch {micro!r} is done, which do "
                "did not send or was told already"
            )
        due.discard(micro)
        if not due:
            del self._unacked[msg.step]
        return True

    def _deadline(self) -> float | None:
        """When a wait ends: the transport's ``recv_timeout`` (when it has one) bounds the
        whole wait, so a peer that keeps sending cannot hold the owner forever."""
        timeout = getattr(self.transport, "recv_timeout", None)
        return None if timeout is None else time.monotonic() + timeout

    def _next(self, deadline: float | None, senders: Collection[str], what: str) -> Message:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            raise TimeoutError(f"do got no answer from {', '.join(sorted(senders))} ({what})")
        return self.transport.recv(self.name, left)

    def _drop(self, msg: Message, senders: Collection[str], what: str) -> None:
        log.warning(
            "do dropped %s from %s while waiting for %s (%s)",
            msg.kind,
            msg.sender,
            ", ".join(sorted(senders)),
            what,
        )

    # -- inference ----------------------------------------------------------------

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """True-class log-scores of ``x`` through the chain (only the owner can decode)."""
        self.settle()
        self.head.eval()
        outputs = []
        with torch.no_grad():
            for chunk, z in zip(x.split(INFER_BATCH), self.head_outputs(x), strict=True):
                if self.noise is not None and self.noise_at_inference:
                    z = self.noise(z)
                self.transport.send(
                    Message(Kind.INFER, self.step, self.name, self.trainers[0], {"x": z}, {})
                )
                reply = self.receive({self.trainers[-1]}, "inference")
                if reply.kind != Kind.LOGITS:
                    raise ProtocolError(f"do expected logits, got {reply.kind} from {reply.sender}")
                outputs.append(self.to_true(self._logits(reply, len(chunk), "x")))
        self.train_mode()
        return torch.cat(outputs)

    def head_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The head's outputs on ``x`` in inference batches. A frozen head (release once)
        gives the same outputs every time: they are kept for the same ``x`` (the test set
        each epoch), so the owner computes them once."""
        kept = self._frozen_outputs
        if self.release is not None and kept is not None and kept[0] is x:
            return kept[1]
        outputs = []
        for chunk in x.split(INFER_BATCH):
            with self.compute.count(("infer", tuple(chunk.shape)), "infer"):
                outputs.append(self.head(chunk.to(self.device)))
        if self.release is not None:
            self._frozen_outputs = (x, outputs)
        return outputs

    def accuracy(self, data: Split) -> float:
        return float((self.predict(data.x).argmax(1) == data.y).float().mean())

    def to_true(self, pseudo_logits: torch.Tensor) -> torch.Tensor:
        return self.labels.decode_logits(pseudo_logits) if self.labels else pseudo_logits

    # -- control --------------------------------------------------------------------

    def control(self, party: str, op: str, reply_from: str | None = None, **meta: Any) -> Message:
        """Send a control op to ``party`` and wait for the reply of ``reply_from`` (``party``
        itself unless another party answers for it, e.g. the verifier after a stage_end)."""
        self.settle()
        self.transport.send(
            Message(Kind.CONTROL, self.step, self.name, party, {}, {"op": op, **meta})
        )
        return self.expect_reply(reply_from or party, op)

    def expect_reply(self, sender: str, op: str) -> Message:
        """``sender``'s checked reply to ``op`` (:func:`check_reply`); others are dropped."""
        return check_reply(self.receive({sender}, f"its reply to {op!r}"), op)

    def ask_all(self, parties: list[str], op: str, **meta: Any) -> dict[str, Message]:
        """Send control ``op`` to every party at once, then collect one checked reply each."""
        self.settle()
        for party in parties:
            self.transport.send(
                Message(Kind.CONTROL, self.step, self.name, party, {}, {"op": op, **meta})
            )
        replies: dict[str, Message] = {}
        while len(replies) < len(parties):
            msg = self.receive(set(parties) - set(replies), f"replies to {op!r}")
            replies[msg.sender] = check_reply(msg, op)
        return replies


def _verdict(msg: Message) -> None:
    """A stage_end answer: the attested record's stage, party, BER, verdict and link."""
    meta_int(msg, "stage", 1)
    if not isinstance(msg.meta.get("party"), str):
        raise ProtocolError(f"{msg.kind} from {msg.sender}: field 'party' must be a name")
    if msg.meta.get("ber") is not None:
        meta_float(msg, "ber", 0.0, 1.0)
    if msg.meta.get("verdict") not in ("ok", "fail"):
        raise ProtocolError(f"{msg.kind} from {msg.sender}: field 'verdict' must be ok or fail")
    meta_hex(msg, "tip", 32)


def _restored(msg: Message) -> None:
    meta_int(msg, "step")
    if msg.sender == "verifier":
        meta_int(msg, "records")
    else:
        meta_int(msg, "steps_applied")


def _finished(msg: Message) -> None:
    meta_int(msg, "steps_applied")
    compute = meta_dict(msg, "compute")
    probe = Message(msg.kind, msg.step, msg.sender, msg.receiver, {}, compute)
    meta_int(probe, "flops", 0, MAX_FLOPS)
    meta_int(probe, "inference_flops", 0, MAX_FLOPS)
    meta_float(probe, "cpu_seconds", 0.0, MAX_CPU_SECONDS)
    meta_ints(msg, "sealed_bits", MAX_STEP)
    if not isinstance(msg.meta.get("segment", ""), str):
        raise ProtocolError(f"{msg.kind} from {msg.sender}: field 'segment' must be a path")


def _ledger(msg: Message) -> None:
    for party, entry in meta_dict(msg, "done").items():
        if not isinstance(entry, dict):
            raise ProtocolError(f"ledger reply from {msg.sender}: entry of {party!r} is no object")
        probe = Message(msg.kind, msg.step, msg.sender, msg.receiver, {}, entry)
        if party == "do":
            meta_hex(probe, "tip", 32)
        else:
            _verdict(probe)


#: The fields each control op's reply must carry, checked before the owner uses one.
REPLY_CHECKS: dict[str, Callable[[Message], Any]] = {
    "register": lambda m: meta_hex(m, "session_id", 16),
    "open": lambda m: (meta_hex(m, "session_id", 16), meta_hex(m, "tip", 32)),
    "record": lambda m: meta_hex(m, "tip", 32),
    "stage_begin": lambda m: meta_int(m, "stage", 1),
    "stage_end": _verdict,
    "checkpoint": lambda m: meta_int(m, "step"),
    "checkpoints": lambda m: meta_ints(m, "steps", MAX_LISTED),
    "releases": lambda m: meta_ints(m, "chunks", MAX_CHUNKS),
    "release": lambda m: meta_int(m, "chunk", 0, MAX_CHUNKS - 1),
    "restore": _restored,
    "ledger": _ledger,
    "finish": _finished,
}


def check_reply(msg: Message, op: str) -> Message:
    """``msg`` if it is a well-formed reply to ``op``; else a one-line ProtocolError.

    An ERROR, a reply to another op or a reply missing a field (or with one of the
    wrong type or range) fails the same way as a lost party, so the driver's
    recovery path handles it.
    """
    if msg.kind != Kind.REPLY or msg.meta.get("op") != op:
        raise ProtocolError(
            f"do expected {msg.sender}'s reply to {op!r}, got {msg.kind}"
            + (f": {msg.meta['error']}" if msg.meta.get("error") else "")
        )
    REPLY_CHECKS.get(op, lambda m: None)(msg)
    return msg
