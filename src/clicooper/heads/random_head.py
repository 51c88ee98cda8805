"""Head source ``random``: the preset's head at a seeded random initialisation, untrained.

Privacy cost: none (no record shapes it). The weights follow PyTorch's default
initialisation under ``torch.manual_seed(seed)``, so the same seed gives the same head.
It is the zero-cost baseline every other source must beat.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from clicooper.data import Dataset
from clicooper.heads.base import (
    FrozenHead,
    HeadPrivacy,
    PretrainFlops,
    finish,
    forward_flops,
    out_shape,
)

if TYPE_CHECKING:
    from clicooper.config import RunConfig


def reinit(module: nn.Module, seed: int) -> nn.Module:
    """Every submodule with ``reset_parameters`` re-initialised under ``seed``."""
    torch.manual_seed(seed)
    for m in module.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return module


class RandomSource:
    """A fixed random head: no training, no privacy cost."""

    name = "random"

    def build(self, cfg: RunConfig, data: Dataset, split_head: nn.Module) -> FrozenHead:
        module = finish(reinit(split_head, cfg.seed))
        return FrozenHead(
            source=self.name,
            module=module,
            data=data,
            out_shape=out_shape(module, data.image_shape),
            privacy=HeadPrivacy(None, None, "no record reaches the head (random weights)"),
            pretrain=PretrainFlops(0, "none", "no training"),
            forward_flops=forward_flops(module, data.image_shape),
            public=None,
        )
