"""What every head source returns, and the pieces they share.

A *frozen head* is the data owner's part of the model, fixed before any private record
is released: no gradient reaches it and the owner never runs a backward pass through
it. Each record ``x`` is then released once as ``clip_C(h(x)) + N(0, (m C)^2 I)``
(clicooper.privacy.activation), so the release's privacy is that of one Gaussian
mechanism with sensitivity 2C, *given the head*. Whatever the head learnt from private
data is a second mechanism that composes with it: :class:`HeadPrivacy` says what it cost.

Every source ends its head with :class:`UnitNorm`: ``h(x) / ||h(x)||``, so every
release carries the full clip budget (clipping at C = 1 is then a no-op and no record's
signal is wasted on a small norm). Where public data is at hand, :class:`Center`
subtracts its mean first: the common mean direction carries no class information but
would otherwise take most of the unit norm.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from clicooper.common.modes import inference
from clicooper.runtime.compute import ComputeMeter

if TYPE_CHECKING:
    from clicooper.config import RunConfig
    from clicooper.data import Dataset, Split

Runner = Literal["owner", "trainers", "none"]


@dataclass(frozen=True)
class HeadPrivacy:
    """The privacy cost of the head's weights.

    ``epsilon`` is None when the head saw no private record (public data, no data):
    the release's epsilon is then the whole story. ``covers`` says in words what
    the bound protects; ``details`` holds the accounting inputs (noise, steps, ...).
    """

    epsilon: float | None
    delta: float | None
    covers: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PretrainFlops:
    """FLOPs spent building the head (counted by FlopCounterMode) and who spent them."""

    flops: int
    runner: Runner
    note: str = ""


@dataclass(frozen=True)
class FrozenHead:
    """A head ready for release-once: frozen, in eval mode, with its costs stated.

    ``data`` is the dataset the owner trains on: for a declared public split the
    training split without its public part, otherwise the dataset given. ``out_shape``
    is the shape of one output (the same as the preset head's, so the preset's tail
    fits). ``forward_flops`` is the FLOPs of one record's forward pass.
    """

    source: str
    module: nn.Module
    data: Dataset
    out_shape: tuple[int, ...]
    privacy: HeadPrivacy
    pretrain: PretrainFlops
    forward_flops: int
    public: dict[str, Any] | None = None
    #: the public data itself (its record is ``public``): the chain's warm start
    public_split: Split | None = field(default=None, repr=False)

    def results(self) -> dict[str, Any]:
        """A JSON-ready summary for results.json (``head`` section)."""
        return {
            "source": self.source,
            "out_shape": list(self.out_shape),
            "privacy": {
                "epsilon": self.privacy.epsilon,
                "delta": self.privacy.delta,
                "covers": self.privacy.covers,
                **self.privacy.details,
            },
            "pretrain_flops": self.pretrain.flops,
            "pretrain_runner": self.pretrain.runner,
            "pretrain_note": self.pretrain.note,
            "forward_flops_per_record": self.forward_flops,
            "public": self.public,
        }


class HeadSource(Protocol):
    """One way to obtain a frozen head (see :data:`clicooper.heads.HEAD_SOURCES`)."""

    name: str

    def build(self, cfg: RunConfig, data: Dataset, split_head: nn.Module) -> FrozenHead:
        """The frozen head for ``cfg``; ``split_head`` is the preset's (untrained) head."""
        ...


class UnitNorm(nn.Module):
    """``z / ||z||_2`` per sample (a zero vector stays zero)."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        norms = z.flatten(1).norm(dim=1).clamp_min(1e-12)
        return z / norms.view(-1, *([1] * (z.ndim - 1)))


class Center(nn.Module):
    """Subtract a fixed mean (computed on public data only)."""

    def __init__(self, mean: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.detach().clone())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z - self.mean


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode, no parameter requires grad."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def out_shape(module: nn.Module, image_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of one output of ``module`` on an image of ``image_shape``."""
    with inference(module):
        return tuple(module(torch.zeros(2, *image_shape)).shape[1:])


def forward_flops(module: nn.Module, image_shape: tuple[int, ...]) -> int:
    """FLOPs of one record's forward pass (FlopCounterMode, batch of 8 divided by 8)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(torch.zeros(8, *image_shape))
    return counter.get_total_flops() // 8


@torch.no_grad()
def embed(module: nn.Module, x: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    """``module(x)`` in batches, flattened to (N, D)."""
    module.eval()
    return torch.cat([module(x[i : i + batch]).flatten(1) for i in range(0, len(x), batch)])


def finish(module: nn.Module, center: torch.Tensor | None = None) -> nn.Module:
    """``module`` followed by an optional public-mean :class:`Center` and :class:`UnitNorm`,
    frozen."""
    parts = [module] + ([Center(center)] if center is not None else []) + [UnitNorm()]
    return freeze(nn.Sequential(*parts))


def classifier_for(head: nn.Module, image_shape: tuple[int, ...], n_classes: int) -> nn.Module:
    """The throwaway classifier trained with the head: ReLU then a linear layer."""
    width = 1
    for s in out_shape(head, image_shape):
        width *= s
    return nn.Sequential(nn.Flatten(), nn.ReLU(), nn.Linear(width, n_classes))


def pretrain(
    head: nn.Module,
    split: Split,
    n_classes: int,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
) -> int:
    """Supervised training of ``head`` plus a throwaway classifier on (non-private) ``split``
    with Adam and cross-entropy; returns the FLOPs spent (forward and backward)."""
    torch.manual_seed(seed)
    model = nn.Sequential(head, classifier_for(head, tuple(split.x.shape[1:]), n_classes))
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    meter = ComputeMeter()  # one counted step per batch size, times the steps run
    for _ in range(epochs):
        order = torch.randperm(len(split), generator=gen)
        for i in range(0, len(split), batch_size):
            idx = order[i : i + batch_size]
            with meter.count(("pretrain", len(idx))):
                loss = nn.functional.cross_entropy(model(split.x[idx]), split.y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
    return meter.flops["train"]
