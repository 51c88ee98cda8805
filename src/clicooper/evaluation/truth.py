"""Evaluator-only knowledge: which training sample each recorded row was, and its label.

The data owner logs the sample ids of every step; a step's micro-batches are the
``tensor_split`` of its batch in order. Joining a party's ``(step, micro)`` rows to
that log gives each row's sample id, hence its image and true label. Attacks
never call this; only scoring does.
"""

from __future__ import annotations

import numpy as np
import torch

from clicooper.evaluation.views import PartyView


def row_sample_ids(
    view: PartyView, log_steps: list[int], log_ids: list[torch.Tensor], micro_batches: int
) -> torch.Tensor:
    """Sample id of every recorded row of ``view`` (same order as its records)."""
    by_step = dict(zip(log_steps, log_ids, strict=True))
    steps, micros = view.records["step"], view.records["micro"]
    out = torch.empty(len(steps), dtype=torch.long)
    start = 0
    while start < len(steps):
        step, micro = int(steps[start]), int(micros[start])
        ids = by_step[step].tensor_split(micro_batches)[micro]
        stop = start + len(ids)
        if stop > len(steps) or not bool(
            ((steps[start:stop] == step) & (micros[start:stop] == micro)).all()
        ):
            raise ValueError(f"{view.name}'s records do not match the owner's log at step {step}")
        out[start:stop] = ids
        start = stop
    return out


def row_labels(ids: torch.Tensor, train_labels: torch.Tensor) -> np.ndarray:
    """True labels of the rows."""
    return train_labels[ids].numpy()
