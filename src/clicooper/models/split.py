"""Cutting a model into the data owner's head and the trainers' segments."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn


@dataclass
class SplitModel:
    """The head (data owner) and one segment per trainer, in chain order."""

    head: nn.Module
    segments: list[nn.Module]

    def full(self) -> nn.Sequential:
        """The whole model as one module (sharing parameters with the parts)."""
        return nn.Sequential(self.head, *self.segments)


def split_blocks(blocks: Sequence[tuple[str, nn.Module]], cut: str, n_trainers: int) -> SplitModel:
    """Cut after the block named ``cut``; share the rest among ``n_trainers``.

    The tail blocks are dealt out in order as evenly as possible, earlier
    trainers taking the remainder, so the last trainer always holds the
    classifier.
    """
    names = [name for name, _ in blocks]
    if cut not in names:
        raise ValueError(f"unknown cut {cut!r}: choose one of {', '.join(names[:-1])}")
    at = names.index(cut) + 1
    head = nn.Sequential(*[m for _, m in blocks[:at]])
    tail = [m for _, m in blocks[at:]]
    return SplitModel(head, [nn.Sequential(*part) for part in _deal(tail, n_trainers)])


def split_sequential(model: nn.Sequential, cuts: Sequence[int]) -> SplitModel:
    """Split a user ``nn.Sequential`` at module indices.

    ``cuts[0]`` is where the head ends (modules ``[0, cuts[0])``); each later
    index starts the next trainer's segment. ``[3]`` gives a head of three
    modules and one trainer; ``[3, 5]`` a head and two trainers.
    """
    modules = list(model.children())
    bounds = [0, *cuts, len(modules)]
    if any(b <= a for a, b in zip(bounds, bounds[1:], strict=False)):
        raise ValueError(
            f"cut indices {list(cuts)} must increase strictly within 1..{len(modules) - 1}"
        )
    parts = [nn.Sequential(*modules[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)]
    return SplitModel(parts[0], parts[1:])


def _deal(items: list[nn.Module], n: int) -> list[list[nn.Module]]:
    if not 1 <= n <= len(items):
        raise ValueError(f"{n} trainers cannot share {len(items)} blocks: use 1 to {len(items)}")
    size, extra = divmod(len(items), n)
    out, start = [], 0
    for i in range(n):
        stop = start + size + (1 if i < extra else 0)
        out.append(items[start:stop])
        start = stop
    return out
