"""Head source ``scattering``: a fixed 2-D wavelet scattering transform, no data at all.

The scattering transform of order 2 (Mallat 2012; kymatio's torch frontend) with
``J = head.scattering_j`` scales and L = 8 angles maps a C x H x W image to
``C (1 + J L + L^2 J (J - 1) / 2)`` channels at H / 2^J x W / 2^J: local averages of
``|x * psi_1|`` and ``||x * psi_1| * psi_2|`` for Morlet wavelets psi. As in Tramèr & Boneh
(2021, ScatterNet + group norm: 89.7% on Fashion-MNIST at epsilon 3 under DP-SGD) the
channels are group-normalised per sample (GroupNorm without affine weights: a fixed
function of the record alone). A release must be low-dimensional to keep its
signal-to-noise ratio (the noise norm grows as sqrt(D) against a signal of norm C), so
the normalised coefficients are mapped by a fixed Gaussian random projection (seeded by
``seed``; LightSplit-style) to the width of the preset's cut, then unit-normalised.

Privacy cost: none. No record, public or private, shapes the head.

kymatio 0.3.0's top-level ``import kymatio.torch`` pulls in ``scipy.special.sph_harm``,
which recent scipy removed; its 2-D torch frontend imports cleanly and is used directly.
FlopCounterMode counts no FFT, and kymatio computes the transform by FFTs: the head's
counted forward FLOPs are those of its projection only (the pretrain note says so). An
FFT of n points costs about 5 n log2 n real FLOPs; for 28x28 images, J = 2, that adds a
few 10^5 per record, still below the preset CNN head's 2.2 million.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from clicooper.data import DataError, Dataset
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

ANGLES = 8


def scattering_channels(j: int, angles: int = ANGLES) -> int:
    """Coefficients per input channel of an order-2 transform: 1 + J L + L^2 J (J - 1) / 2."""
    return 1 + j * angles + angles * angles * j * (j - 1) // 2


class Scattering(nn.Module):
    """(N, C, H, W) -> (N, C K, H / 2^J, W / 2^J) scattering coefficients, group-normalised."""

    def __init__(self, image_shape: tuple[int, int, int], j: int) -> None:
        super().__init__()
        from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

        c, h, w = image_shape
        if min(h, w) < 2**j:
            raise DataError(
                f"head.scattering_j {j} needs images of at least {2**j} pixels a side, "
                f"got {h}x{w}: lower head.scattering_j"
            )
        self.transform = ScatteringTorch2D(J=j, shape=(h, w), L=ANGLES)
        k = scattering_channels(j)
        self.channels = c * k
        groups = math.gcd(self.channels, 27) if self.channels % 27 == 0 else 1
        self.norm = nn.GroupNorm(groups, self.channels, affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.transform(x.contiguous())  # (N, C, K, h, w)
        return self.norm(s.flatten(1, 2))


class Projection(nn.Module):
    """A fixed Gaussian random map R^D -> R^width (entries N(0, 1/width)), reshaped."""

    def __init__(self, d_in: int, shape: tuple[int, ...], seed: int) -> None:
        super().__init__()
        width = math.prod(shape)
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("matrix", torch.randn(d_in, width, generator=gen) / math.sqrt(width))
        self.shape = shape

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return (z.flatten(1) @ self.matrix).view(-1, *self.shape)


class ScatteringSource:
    """ScatterNet + group norm + a seeded random projection to the cut width."""

    name = "scattering"

    def build(self, cfg: RunConfig, data: Dataset, split_head: nn.Module) -> FrozenHead:
        shape = data.image_shape
        scatter = Scattering(shape, cfg.head.scattering_j)
        d = math.prod(out_shape(scatter, shape))
        target = out_shape(split_head, shape)
        projection = Projection(d, target, cfg.seed)
        module = finish(nn.Sequential(scatter, projection))
        return FrozenHead(
            source=self.name,
            module=module,
            data=data,
            out_shape=out_shape(module, shape),
            privacy=HeadPrivacy(None, None, "no record reaches the head (a fixed transform)"),
            pretrain=PretrainFlops(0, "none", "no training; FFTs of the transform not counted"),
            # FlopCounterMode counts no FFT (and is slow on kymatio's): count the projection
            forward_flops=forward_flops(projection, (d,)),
            public=None,
        )
