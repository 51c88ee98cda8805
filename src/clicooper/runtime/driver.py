"""The data owner's training loop: resumable, with coordinated checkpoints.

The loop is a sequence of units, each either one training step or the end of
an epoch (stage close, test accuracy). Its position is the owner's step count
plus the number of finished epochs, so it can restart from any checkpoint.

Checkpoints (when enabled) are coordinated by the data owner after a step has
fully completed (every trainer has applied it, nothing is in flight): it asks
every party to checkpoint that step, waits for all of them, then writes its
own. They happen every ``checkpoint_steps`` steps and *before* every stage
close and epoch end (so the state a ledger record commits to is a checkpoint).

Resume protocol, on a transport error, a timeout, or an ERROR or a malformed answer
(a field missing, of the wrong type or out of range: see
:func:`clicooper.parties.data_owner.check_reply`) from a party the owner waits on;
messages from any other party are dropped, never taken for an answer:

1. the :class:`Recovery` (gRPC deployment) moves every party to a new
   transport epoch (fresh session id and sequence counters, so nothing from
   before the failure is accepted), waiting for restarted parties;
2. every party lists its checkpoints; the last step common to all parties
   (and the owner) is chosen and every party restores it: segment or head,
   optimizer, RNG states, step counters, watermark stage and ledger position;
3. a stage close interrupted by the failure is finished without appending
   again the records the verifier already holds (the ledger is append-only);
4. training continues from that step with the same batch order, so no step
   is lost or applied twice.

Release once (:mod:`clicooper.parties.releases`): the first units, after the
step-0 checkpoint, are the release phase, one chunk each. A release is never
rolled back: the owner's record of what it released lives outside its
checkpoints, and after every recovery it asks t1 again which chunks it holds, so
a restarted t1 that kept its cache is sent nothing and no record is released twice.
With a warm start (``warm_epochs`` over ``public``, the public split whose clean
activations t1 caches as the public set) the first ``warm_epochs`` epochs train the
chain on the public set, the rest on the releases; their history entries say
``"phase": "public"``. With ``replay`` every later epoch has the public set's batches
among the releases' too.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from clicooper.common.messages import Message, ProtocolError
from clicooper.data.base import Dataset, Split
from clicooper.parties.data_owner import DataOwner, epoch_batches
from clicooper.parties.watermarking import OwnerChain
from clicooper.runtime import checkpoint as ckpt
from clicooper.runtime.optim import load_scheduler, scheduler_state

log = logging.getLogger(__name__)
ProgressFn = Callable[[int, int, int, float], None]
#: What a failed party looks like to the owner.
FAILURES = (ConnectionError, TimeoutError, ProtocolError)
MAX_RECOVERIES = 10


class RecoveryFailed(ProtocolError):
    """The parties could not be brought back: the run ends with this one line."""


class Recovery(Protocol):
    """Brings every party back after a failure (see
    :class:`clicooper.runtime.deploy.remote.Remote`)."""

    def reconnect(self) -> None:
        """Every party reachable in a fresh transport epoch and set up again."""


@dataclass
class Position:
    """Where the loop is, besides ``owner.step``; checkpointed with the owner."""

    epochs_done: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


class Driver:
    """Runs ``epochs`` epochs of ``owner`` over ``data`` with checkpoints and recovery."""

    def __init__(
        self,
        owner: DataOwner,
        chain: OwnerChain | None,
        data: Dataset,
        *,
        epochs: int,
        batch_size: int,
        seed: int,
        parties: list[str],
        checkpoint_dir: Path | None = None,
        checkpoint_steps: int = 0,
        recovery: Recovery | None = None,
        progress: ProgressFn | None = None,
        on_epoch: Callable[[list[dict[str, Any]]], None] | None = None,
        resume: bool = False,
        public: Split | None = None,
        warm_epochs: int = 0,
        replay: bool = False,
    ) -> None:
        """``resume``: continue from the parties' last common checkpoint (a new process
        continuing a run that died, see :mod:`clicooper.runtime.resume`). ``public`` and
        ``warm_epochs``: release once's warm start, ``warm_epochs`` epochs on the public
        set before the ``epochs`` epochs on the releases (``epochs`` counts both).
        ``replay``: every epoch on the releases also passes over the public set once, its
        batches spread evenly among the releases' (:meth:`_batches`)."""
        if (warm_epochs or replay) and public is None:
            raise ValueError("a warm start or a replay needs the public split")
        self.owner, self.chain, self.data = owner, chain, data
        self.resume = resume
        self.epochs, self.batch_size, self.seed = epochs, batch_size, seed
        self.parties = parties
        self.checkpoint_dir = checkpoint_dir
        self.checkpoint_steps = checkpoint_steps
        self.recovery = recovery
        self.progress = progress
        self.on_epoch = on_epoch  # called with the whole history as each epoch ends
        self.pos = Position()
        self.public, self.warm_epochs = public, warm_epochs
        self.replay = replay
        self.public_steps = math.ceil(len(public) / batch_size) if public is not None else 0
        self.warm_steps = self.public_steps if warm_epochs else 0
        self.steps_per_epoch = math.ceil(len(data.train) / batch_size)
        self.steps_per_epoch += self.public_steps if replay else 0
        self.train_seconds = 0.0
        self.train_cpu_seconds = 0.0  # this process only: all parties when in-process
        self.recoveries: list[dict[str, Any]] = []
        self._pending: bool | None = None  # a stage close to finish after a restore (its `more`)
        self._done: dict[str, dict[str, Any]] | None = None  # records already in the ledger
        self._epoch_batches: tuple[int, list[tuple[bool, torch.Tensor]]] = (0, [])
        self._attempts = 0  # recoveries started, including ones that failed

    # -- the loop -----------------------------------------------------------------------

    def run(self) -> list[dict[str, Any]]:
        """Train to the end; the per-epoch history."""
        if self.resume:
            self._resume()
        else:
            self._checkpoint(pending=False)  # step 0: a common point before any failure
        while not self._finished():
            try:
                self._unit()
            except FAILURES as exc:
                if self.recovery is None or self.checkpoint_dir is None:
                    raise
                self._recover_retrying(exc)
        return self.pos.history

    def _recover_retrying(self, exc: BaseException) -> None:
        """Recover; a failure during recovery (a party lost again) starts it over.

        Every attempt counts towards :data:`MAX_RECOVERIES`, so a party that keeps
        answering recovery badly ends the run with one line instead of a loop.
        """
        while True:
            try:
                self._recover(exc)
                return
            except RecoveryFailed:
                raise
            except FAILURES as again:
                exc = again

    def _finished(self) -> bool:
        return self.pos.epochs_done == self.epochs and self._pending is None and not self._tail()

    def _tail(self) -> bool:
        """A partly done last stage (``stage_steps``) still to close."""
        return self.chain is not None and self.chain.steps_in_stage > 0

    def _unit(self) -> None:
        start, cpu = time.perf_counter(), time.process_time()
        if self.owner.releasing is not None:
            self.owner.release_next()
        elif self._pending is not None:
            self._close(self._pending)
        elif self.pos.epochs_done == self.epochs:
            self._checkpoint(pending=True, more=False)  # the partly done last stage
            self._close(False)
        elif self.owner.step < self.steps_until(self.pos.epochs_done + 1):
            self._step()
        else:
            self._end_epoch()
            return  # _end_epoch times itself (the test pass is not training)
        self.train_seconds += time.perf_counter() - start
        self.train_cpu_seconds += time.process_time() - cpu

    def steps_until(self, epoch: int) -> int:
        """Steps of the first ``epoch`` epochs (warm-start epochs are shorter)."""
        warm = min(epoch, self.warm_epochs)
        return warm * self.warm_steps + (epoch - warm) * self.steps_per_epoch

    def _split(self, epoch: int) -> Split:
        """What ``epoch`` trains on: the public set during the warm start, else the data."""
        return self.public if epoch <= self.warm_epochs else self.data.train

    def _step(self) -> None:
        owner, epoch = self.owner, self.pos.epochs_done + 1
        batch = owner.step - self.steps_until(epoch - 1)
        public, ids = self._batches(epoch)[batch]
        owner.train_mode()
        warm = epoch <= self.warm_epochs
        if public:
            loss, right = owner.warm_batch(self.public, ids, epoch)
        else:
            loss, right = owner.train_batch(self.data.train, ids, epoch)
        self.pos.loss_sum += loss * len(ids)
        self.pos.correct += right
        if self.progress:
            total = self.warm_steps if warm else self.steps_per_epoch
            self.progress(epoch, batch + 1, total, loss)
        if self.chain is not None and self.chain.count_step(owner.step):
            self._checkpoint(pending=True)
            self._close(True)
        elif self.checkpoint_steps and owner.step % self.checkpoint_steps == 0:
            self._checkpoint(pending=False)

    def _batches(self, epoch: int) -> list[tuple[bool, torch.Tensor]]:
        """The batches of ``epoch`` as ``(public, ids)``, drawn once an epoch: the same
        permutation that :func:`epoch_batches` gives, without its ~0.7 ms (60k samples) at
        every step. With ``replay`` an epoch on the releases has the public set's batches
        of that epoch too, public batch j after the releases' batch ceil((j+1) R / P) - 1
        (R release batches, P public ones): spread evenly, the last batch a public one."""
        if self._epoch_batches[0] != epoch:
            warm = epoch <= self.warm_epochs
            order = epoch_batches(len(self._split(epoch)), epoch, self.batch_size, self.seed)
            batches = [(warm, ids) for ids in order]
            if self.replay and not warm:
                public = epoch_batches(len(self.public), epoch, self.batch_size, self.seed)
                at = [math.ceil((j + 1) * len(order) / len(public)) for j in range(len(public))]
                for j in reversed(range(len(public))):
                    batches.insert(at[j], (True, public[j]))
            self._epoch_batches = (epoch, batches)
        return self._epoch_batches[1]

    def _end_epoch(self) -> None:
        start, cpu = time.perf_counter(), time.process_time()
        epoch = self.pos.epochs_done + 1
        closing = self.chain is not None and self.chain.epoch_close_due()
        self._checkpoint(pending=closing, more=epoch < self.epochs)
        if closing:
            self._close(epoch < self.epochs)
        self.train_seconds += time.perf_counter() - start
        self.train_cpu_seconds += time.process_time() - cpu
        test_accuracy = self.owner.accuracy(self.data.test)
        n = sum(len(ids) for _, ids in self._batches(epoch))
        if self.owner.noise is not None and self.owner.release is None:
            self.owner.releases += 1  # every epoch released every record again
        entry = {
            "epoch": epoch,
            "loss": self.pos.loss_sum / n,
            "train_accuracy": self.pos.correct / n,
            "test_accuracy": test_accuracy,
            "seconds": self.train_seconds,
        }
        if epoch <= self.warm_epochs:
            entry["phase"] = "public"
        self.pos.history.append(entry)
        self.pos.epochs_done, self.pos.loss_sum, self.pos.correct = epoch, 0.0, 0
        if self.on_epoch:
            self.on_epoch(self.pos.history)

    def _close(self, more: bool) -> None:
        done, self._done = self._done, None
        self.chain.close_stage(more, done)
        self._pending = None

    # -- checkpoints ----------------------------------------------------------------------

    def _checkpoint(self, pending: bool, more: bool = True) -> None:
        """Every party, then the owner, saves the state after ``owner.step``."""
        if self.checkpoint_dir is None:
            return
        step = self.owner.step
        self.ask_all("checkpoint", step=step)
        self._save_owner(step, {"pending_close": more if pending else None})

    def ask_all(self, op: str, **meta: Any) -> dict[str, Message]:
        """Send control ``op`` to every party at once, then collect every (checked) reply."""
        return self.owner.ask_all(self.parties, op, **meta)

    def _generators(self) -> dict[str, torch.Generator]:
        noise = self.owner.noise
        return {"noise": noise._gen} if noise is not None else {}  # noqa: SLF001

    def _save_owner(self, step: int, extra: dict[str, Any]) -> None:
        owner = self.owner
        opt_tensors, opt_doc = {}, None
        if owner.optimizer is not None:  # a frozen head (release once) has none
            opt_tensors, opt_doc = ckpt.optimizer_state(owner.optimizer)
        tensors = {
            **ckpt.module_tensors(owner.head, "head"),
            **opt_tensors,
            **ckpt.rng_tensors(self._generators()),
        }
        meta = {
            "optim": opt_doc,
            "sched": None if owner.scheduler is None else scheduler_state(owner.scheduler),
            "releases": owner.releases,
            "position": vars(self.pos),
            "chain": self.chain.state() if self.chain is not None else {},
            "compute": owner.compute.state(),
            **extra,
        }
        ckpt.save(self.checkpoint_dir, step, tensors, meta)

    def restore_owner(self, step: int) -> None:
        """The owner's state after ``step`` from its checkpoint."""
        owner = self.owner
        tensors, meta = ckpt.load(self.checkpoint_dir, step)
        ckpt.load_module(owner.head, tensors, "head")
        if owner.optimizer is not None:
            owner.optimizer.zero_grad(set_to_none=True)
            ckpt.load_optimizer(owner.optimizer, tensors, meta["optim"])
            load_scheduler(owner.scheduler, meta["sched"])
        ckpt.load_rng(tensors, self._generators())
        owner.step, owner.releases = step, int(meta["releases"])
        owner.compute.load_state(meta.get("compute"))
        keep = sum(1 for s in owner.log.steps if s <= step)
        for seq in (owner.log.steps, owner.log.epochs, owner.log.sample_ids):
            del seq[keep:]
        self.pos = Position(**meta["position"])
        if self.chain is not None:
            self.chain.load_state(meta["chain"])
        self._pending = meta["pending_close"]

    # -- recovery ---------------------------------------------------------------------------

    def _recover(self, exc: BaseException) -> None:
        self._attempts += 1
        if self._attempts > MAX_RECOVERIES:
            reason = " ".join(str(exc).split())[:300]
            raise RecoveryFailed(f"giving up after {MAX_RECOVERIES} recoveries: {reason}") from exc
        log.warning("do: party failure at step %d (%s); resuming", self.owner.step, exc)
        failed_at = self.owner.step
        self.owner.forget_steps_in_flight()  # rolled back below, not awaited
        self.recovery.reconnect()
        self._rollback(" ".join(str(exc).split())[:300], failed_at)

    def _resume(self) -> None:
        """Roll back to the last common checkpoint of a run this process did not start."""
        self._rollback("the run's process ended (--resume)", None)
        history = self.pos.history  # the finished epochs' time; the partial epoch's is lost
        self.train_seconds = float(history[-1]["seconds"]) if history else 0.0

    def _rollback(self, why: str, failed_at: int | None) -> None:
        """Every party, then the owner, restores the last step all of them checkpointed."""
        listed = self.ask_all("checkpoints")
        available = {p: list(m.meta["steps"]) for p, m in listed.items()}  # checked ints
        available["do"] = ckpt.steps(self.checkpoint_dir)
        step = ckpt.common_step(available)
        restored = self.ask_all("restore", step=step)
        self.restore_owner(step)
        self.owner.train_mode()
        for release in (self.owner.release, self.owner.public):
            if release is not None:
                release.pending = None  # ask t1 again what it holds
        if self._pending is not None and self.chain is not None:
            self._done = self.ask_ledger(self.chain.stage)
        self.recoveries.append(
            {
                "error": why,
                "failed_at_step": failed_at,
                "resumed_from_step": step,
                "steps_applied": {
                    p: m.meta["steps_applied"]
                    for p, m in restored.items()
                    if "steps_applied" in m.meta
                },
            }
        )

    def ask_ledger(self, stage: int) -> dict[str, dict[str, Any]]:
        """The verifier's records of ``stage`` (to finish an interrupted stage close)."""
        reply = self.owner.control("verifier", "ledger", stage=stage)
        return dict(reply.meta["done"])
