"""Inference on a module that is training: eval mode for the call, its mode back after.

Inference in training mode would be wrong twice over for layers such as BatchNorm:
the outputs would use the batch's statistics, and the forward pass would update the
running statistics, so the test set would change the weights a trainer has committed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def inference(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode under ``torch.no_grad()``; its former mode is restored."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield module
    finally:
        module.train(was_training)
