"""Typed messages exchanged between parties.

Every message is a :class:`Message`: a kind, the training step it belongs to,
its sender and receiver, named tensors and JSON-serialisable metadata. Tensors
travel as safetensors bytes (see :mod:`clicooper.common.serde`); nothing that
crosses a party boundary is ever unpickled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import torch


class Kind(StrEnum):
    """Message kinds. The value is what travels on the wire."""

    FORWARD = "forward"  # activations along the chain: DO -> T1 -> ... -> Tn
    LABELS = "labels"  # pseudo-labels for a step: DO -> Tn only
    BACKWARD = "backward"  # gradient w.r.t. the receiver's output: Tn -> ... -> T1 -> DO
    INFER = "infer"  # forward without training, Tn answers with LOGITS
    LOGITS = "logits"  # pseudo-logits: Tn -> DO
    LOSS = "loss"  # loss statistics: Tn -> DO
    RELEASE = "release"  # release-once: a chunk of noisy activations, DO -> T1, sent once
    CONTROL = "control"  # lifecycle: mode changes, stage end, export, shutdown
    REPLY = "reply"  # acknowledgement / answer to a CONTROL message
    REGISTER = "register"  # party registration with the verifier
    RECORD = "record"  # a ledger record (watermark chain)
    AUDIT = "audit"  # a segment sent to the verifier for audit
    ERROR = "error"  # a peer rejected a message


@dataclass
class Message:
    """One message between two parties."""

    kind: Kind
    step: int
    sender: str
    receiver: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor ``name``; a clear error when a peer left it out."""
        try:
            return self.tensors[name]
        except KeyError:
            raise ProtocolError(
                f"{self.kind} message from {self.sender} has no tensor {name!r}"
            ) from None


class ProtocolError(ValueError):
    """A message that breaks the protocol: wrong kind, shape, order or content."""
