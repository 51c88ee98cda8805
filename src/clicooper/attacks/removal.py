"""Generic weight operations for watermark-removal attacks: magnitude pruning, fine-tuning."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from clicooper.attacks._common import train


def _prunable(name: str, t: Tensor, names: set[str] | None) -> bool:
    """Default: every floating tensor of rank >= 2 (linear and conv weights, not biases)."""
    if names is not None:
        return name in names
    return t.is_floating_point() and t.dim() >= 2


def magnitude_prune(
    state_dict: dict[str, Tensor], fraction: float, param_names: Iterable[str] | None = None
) -> dict[str, Tensor]:
    """A pruned copy: in each selected tensor, zero the round(fraction * numel) smallest |w|.

    ``param_names`` selects tensors (default: floating tensors of rank >= 2); the rest
    are copied unchanged. The input is never modified.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction={fraction}; pass a share of weights in [0, 1]")
    names = None if param_names is None else set(param_names)
    unknown = sorted(names - state_dict.keys()) if names is not None else []
    if unknown:
        raise ValueError(f"param_names {unknown} are not in the state dict")
    out = {}
    for name, t in state_dict.items():
        t = t.detach().clone()
        k = round(fraction * t.numel())
        if _prunable(name, t, names) and k > 0:
            idx = torch.topk(t.abs().flatten(), k, largest=False).indices
            t.view(-1)[idx] = 0
        out[name] = t
    return out


def _repeat(data: Iterable[Any]) -> Iterator[Any]:
    """Pass over ``data`` again and again (a one-shot iterator ends once exhausted)."""
    while True:
        empty = True
        for item in data:
            empty = False
            yield item
        if empty:
            return


def fine_tune(
    module: nn.Module,
    data_iter: Iterable[Any],
    steps: int,
    lr: float,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    optimizer: Callable[..., torch.optim.Optimizer] = torch.optim.Adam,
) -> nn.Module:
    """Fine-tune ``module`` in place for ``steps`` steps of loss_fn(module, batch); returns it.

    ``data_iter`` is re-iterated (e.g. a DataLoader, one epoch after another) until
    ``steps`` batches were used; a one-shot iterator stops early when exhausted.
    """
    if steps < 0:
        raise ValueError(f"steps={steps}; pass a non-negative number of steps")
    module.train()
    batches = (b for _, b in zip(range(steps), _repeat(data_iter), strict=False))
    train(module.parameters(), lambda b: loss_fn(module, b), batches, lr, optimizer)
    return module
