"""The data owner: holds the data, the labels, the head and every secret; drives training.

It is the only party that sees inputs and true labels. It sends noisy cut
activations to the first trainer and pseudo-labels to the last, and it alone
can map pseudo-logits back to true classes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from clicooper.common.messages import Kind, Message, ProtocolError
from clicooper.data.base import Split
from clicooper.privacy.activation import ActivationNoise
from clicooper.privacy.labels import LabelObfuscator
from clicooper.runtime.transport.base import Transport

ProgressFn = Callable[[int, int, int, float], None]  # epoch, batch, n_batches, loss
INFER_BATCH = 1024


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
        lr: float,
        noise: ActivationNoise | None = None,
        labels: LabelObfuscator | None = None,
        micro_batches: int = 1,
        noise_at_inference: bool = False,
    ) -> None:
        self.transport = transport
        self.head = head
        self.trainers = [f"t{i}" for i in range(1, n_trainers + 1)]
        self.optimizer = torch.optim.Adam(head.parameters(), lr=lr)
        self.noise, self.labels = noise, labels
        self.micro_batches = micro_batches
        self.noise_at_inference = noise_at_inference
        self.step = 0
        self.releases = 0  # noisy releases of each training sample so far
        self.log = StepLog()

    # -- training ---------------------------------------------------------------

    def train_batch(self, data: Split, ids: torch.Tensor, epoch: int) -> tuple[float, int]:
        """One training step on samples ``ids``: (mean loss, correctly predicted samples)."""
        loss, pseudo_logits = self.train_step(data.x[ids], data.y[ids], ids, epoch)
        return loss, int((self.to_true(pseudo_logits).argmax(1) == data.y[ids]).sum())

    def train_step(
        self, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor, epoch: int
    ) -> tuple[float, torch.Tensor]:
        """Forward through the chain, backward into the head, step; (loss, pseudo-logits).

        With micro-batches the head is pipelined too: micro-batch i leaves as soon as its
        head pass is done (the chain works on it while the head computes i + 1), and its
        gradient enters the head's backward as soon as it is back. The per-sample head,
        clip and one noise draw for the whole batch make this the same maths as one pass.
        """
        self.step += 1
        self.log.steps.append(self.step)
        self.log.epochs.append(epoch)
        self.log.sample_ids.append(ids.clone())
        targets = self.labels.encode(y, ids) if self.labels else y
        micros = self.micro_batches
        sending = self.transport.send_later(  # deliveries overlap the head's passes
            Message(
                Kind.LABELS,
                self.step,
                self.name,
                self.trainers[-1],
                {"y": targets},
                {"micros": micros},
            )
        )
        sent = [sending]
        protected: list[torch.Tensor] = []
        noise: tuple[torch.Tensor, ...] = ()
        for micro, (xc, yc) in enumerate(
            zip(x.tensor_split(micros), y.tensor_split(micros), strict=True)
        ):
            z = self.head(xc)
            if self.noise is not None and not noise:  # one draw: the stream of one pass
                noise = self.noise.noise(torch.Size((len(x), *z.shape[1:]))).tensor_split(micros)
            protected.append(self.noise.clip(z) if self.noise else z)
            released = protected[-1].detach()
            if noise:  # encoding copies: without noise no tensor of its own is needed
                released = released + noise[micro]
            meta = {"micro": micro, "micros": micros, "weight": len(yc) / len(y), "epoch": epoch}
            sent.append(
                self.transport.send_later(
                    Message(
                        Kind.FORWARD, self.step, self.name, self.trainers[0], {"x": released}, meta
                    )
                )
            )
        for delivery in sent:
            delivery.result()  # a failed delivery raises here, as send() would
        logits, losses = self._collect(protected)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss = sum(l_ * len(p) for l_, p in zip(losses, protected, strict=True)) / len(y)
        return float(loss), torch.cat(logits)

    def _collect(self, protected: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[float]]:
        """Backward each micro-batch's gradient (from t1) into the head as it arrives; the
        pseudo-logits and losses the last trainer reports."""
        n = len(protected)
        grads: set[int] = set()
        losses: dict[int, tuple[torch.Tensor, float]] = {}
        while len(grads) < n or len(losses) < n:
            msg = self.transport.recv(self.name)
            micro = int(msg.meta.get("micro", -1))
            if msg.step != self.step or not 0 <= micro < n:
                raise ProtocolError(
                    f"do expected step {self.step}, got {msg.kind} for step {msg.step}"
                )
            if msg.kind == Kind.BACKWARD and msg.sender == self.trainers[0]:
                if micro in grads:
                    raise ProtocolError(f"do got a second gradient for micro-batch {micro}")
                gradient = msg.tensor("g")
                if gradient.shape != protected[micro].shape:
                    raise ProtocolError(
                        f"gradient shape {tuple(gradient.shape)} != activation "
                        f"{tuple(protected[micro].shape)}"
                    )
                protected[micro].backward(gradient)
                grads.add(micro)
            elif msg.kind == Kind.LOSS and msg.sender == self.trainers[-1]:
                losses[micro] = (msg.tensor("logits"), float(msg.meta["loss"]))
            else:
                raise ProtocolError(
                    f"do did not expect {msg.kind} from {msg.sender} while training"
                )
        return [losses[i][0] for i in range(n)], [losses[i][1] for i in range(n)]

    # -- inference ----------------------------------------------------------------

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """True-class log-scores of ``x`` through the chain (only the owner can decode)."""
        self.head.eval()
        outputs = []
        with torch.no_grad():
            for chunk in x.split(INFER_BATCH):
                z = self.head(chunk)
                if self.noise is not None and self.noise_at_inference:
                    z = self.noise(z)
                self.transport.send(
                    Message(Kind.INFER, self.step, self.name, self.trainers[0], {"x": z}, {})
                )
                reply = self.transport.recv(self.name)
                if reply.kind != Kind.LOGITS or reply.sender != self.trainers[-1]:
                    raise ProtocolError(f"do expected logits, got {reply.kind} from {reply.sender}")
                outputs.append(self.to_true(reply.tensor("x")))
        self.head.train()
        return torch.cat(outputs)

    def accuracy(self, data: Split) -> float:
        return float((self.predict(data.x).argmax(1) == data.y).float().mean())

    def to_true(self, pseudo_logits: torch.Tensor) -> torch.Tensor:
        return self.labels.decode_logits(pseudo_logits) if self.labels else pseudo_logits

    # -- control --------------------------------------------------------------------

    def control(self, party: str, op: str, **meta: Any) -> Message:
        """Send a control op to ``party`` and wait for its reply."""
        self.transport.send(
            Message(Kind.CONTROL, self.step, self.name, party, {}, {"op": op, **meta})
        )
        reply = self.transport.recv(self.name)
        if reply.kind != Kind.REPLY or reply.meta.get("op") != op:
            raise ProtocolError(
                f"do expected a reply to {op!r}, got {reply.kind} from {reply.sender}"
            )
        return reply
