"""MLP, CNN and owner-light presets as named blocks with named cut points.

The tail after the cut is deep enough for a chain of up to eight trainers:
``max(1, n_trainers - 1)`` hidden blocks and a classifier block. The CNN's default
cut ends in a small linear bottleneck: noise is scaled to the clip norm of the
whole cut vector, so a low-dimensional cut keeps the signal-to-noise ratio
(DESIGN §9).

The owner-light presets (``cnn-light``, ``resnet``) give the owner only a cheap stem and
the trainers a real body, so the owner's share of the training FLOPs is small even when
it trains its head every step (issue 10; ``compute.owner_share`` in results.json). The
first block after each of their cuts starts with :class:`Standardize`: the clipped (and
noisy) cut activation has a per-element scale near ``clip_norm / sqrt(d)``, far from what
the body's initialisation expects; rescaling it per sample to unit variance is what made
the cheap stem train well in the issue's measurement.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

Blocks = list[tuple[str, nn.Module]]
MAX_TRAINERS = 8


def mlp(
    image_shape: tuple[int, int, int],
    n_outputs: int,
    n_trainers: int,
    width: int = 256,
    bottleneck: int = 64,
) -> Blocks:
    """Cuts: ``fc1`` (width), ``bottleneck`` (default)."""
    c, h, w = image_shape
    return [
        ("fc1", nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, width), nn.ReLU())),
        ("bottleneck", nn.Sequential(nn.Linear(width, bottleneck))),
        *_tail(bottleneck, n_outputs, n_trainers, hidden=128),
    ]


def cnn(
    image_shape: tuple[int, int, int],
    n_outputs: int,
    n_trainers: int,
    channels: int = 16,
    bottleneck: int = 64,
) -> Blocks:
    """Cuts: ``conv1`` (after the first conv block), ``conv2``, ``bottleneck`` (default)."""
    c, h, w = image_shape
    return [
        ("conv1", nn.Sequential(nn.Conv2d(c, channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))),
        (
            "conv2",
            nn.Sequential(
                nn.Conv2d(channels, 2 * channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)
            ),
        ),
        (
            "bottleneck",
            nn.Sequential(nn.Flatten(), nn.Linear(2 * channels * (h // 4) * (w // 4), bottleneck)),
        ),
        *_tail(bottleneck, n_outputs, n_trainers, hidden=128),
    ]


class Standardize(nn.Module):
    """Each sample rescaled to zero mean and unit variance over all its features.

    ``(x - mean) / sqrt(var + eps)`` per sample: no parameters, no running statistics, no
    dependence on the rest of the batch, so micro-batches, inference and a noisy release
    all see the same map.
    """

    def __init__(self, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(1, x.ndim))
        mean = x.mean(dim=dims, keepdim=True)
        var = x.var(dim=dims, keepdim=True, unbiased=False)
        return (x - mean) * torch.rsqrt(var + self.eps)


def cnn_light(
    image_shape: tuple[int, int, int],
    n_outputs: int,
    n_trainers: int,
    stem: int = 16,
    squeeze: int = 4,
    channels: int = 32,
    bottleneck: int = 128,
) -> Blocks:
    """Cuts: ``stem`` (3x3 conv to 16 channels, max-pool), ``squeeze`` (1x1 conv to 4, default).

    The owner's head is one 3x3 conv at full resolution and one 1x1 conv at half: about
    0.25 MFLOP forward per 28x28 grey sample (0.5 training, its first conv needing no
    input gradient); the trainers' body (three 3x3 convs and a linear bottleneck) about
    6 MFLOP forward, 18 training: the owner's share is about 3% (7% for RGB 32x32, whose
    stem reads three channels). Works from 8x8 inputs up.
    """
    c, h, w = image_shape
    return [
        ("stem", nn.Sequential(nn.Conv2d(c, stem, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))),
        ("squeeze", nn.Sequential(Standardize(), nn.Conv2d(stem, squeeze, 1))),
        (
            "conv1",
            nn.Sequential(
                Standardize(),
                nn.Conv2d(squeeze, channels, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(channels, channels, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ),
        ),
        (
            "conv2",
            nn.Sequential(
                nn.Conv2d(channels, 2 * channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)
            ),
        ),
        (
            "bottleneck",
            nn.Sequential(nn.Flatten(), nn.Linear(2 * channels * (h // 8) * (w // 8), bottleneck)),
        ),
        *_tail(bottleneck, n_outputs, n_trainers, hidden=128),
    ]


class BasicBlock(nn.Module):
    """The ResNet basic block: two 3x3 convs with group norm, plus the (projected) input.

    Group norm instead of batch norm: no running statistics and no coupling between the
    samples of a batch, so micro-batches compute the same maths as one pass.
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(min(8, c_out), c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(min(8, c_out), c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = nn.functional.relu(self.norm1(self.conv1(x)))
        return nn.functional.relu(self.norm2(self.conv2(out)) + self.shortcut(x))


def resnet(
    image_shape: tuple[int, int, int],
    n_outputs: int,
    n_trainers: int,
    stem: int = 16,
    width: int = 32,
    blocks: int = 2,
    bottleneck: int = 128,
) -> Blocks:
    """Cuts: ``stem`` (default: the owner holds only a 3x3 conv and a max-pool), ``stage1``,
    ``stage2``.

    For RGB 32x32 (any size from 8x8): a ResNet-style body of ``blocks`` basic blocks at
    ``width`` channels (half resolution), then ``blocks`` at ``2 width`` (quarter
    resolution), global average pooling and a linear bottleneck.
    """
    c = image_shape[0]

    def stage(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
        return [
            BasicBlock(c_in, c_out, stride),
            *(BasicBlock(c_out, c_out) for _ in range(blocks - 1)),
        ]

    return [
        ("stem", nn.Sequential(nn.Conv2d(c, stem, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))),
        ("stage1", nn.Sequential(Standardize(), *stage(stem, width, 1))),
        ("stage2", nn.Sequential(Standardize(), *stage(width, 2 * width, 2))),
        (
            "bottleneck",
            nn.Sequential(
                Standardize(),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
                nn.Linear(2 * width, bottleneck),
            ),
        ),
        *_tail(bottleneck, n_outputs, n_trainers, hidden=128),
    ]


def _tail(d_in: int, n_outputs: int, n_trainers: int, hidden: int) -> Blocks:
    if not 1 <= n_trainers <= MAX_TRAINERS:
        raise ValueError(f"trainers must be 1 to {MAX_TRAINERS}, got {n_trainers}")
    blocks: Blocks = []
    for i in range(1, max(2, n_trainers)):
        blocks.append((f"hidden{i}", nn.Sequential(nn.ReLU(), nn.Linear(d_in, hidden))))
        d_in = hidden
    blocks.append(("classifier", nn.Sequential(nn.ReLU(), nn.Linear(d_in, n_outputs))))
    return blocks


PRESETS: dict[str, Callable[..., Blocks]] = {
    "mlp": mlp,
    "cnn": cnn,
    "cnn-light": cnn_light,
    "resnet": resnet,
}
DEFAULT_CUT = {"mlp": "bottleneck", "cnn": "bottleneck", "cnn-light": "squeeze", "resnet": "stem"}


def build_preset(
    name: str, image_shape: tuple[int, int, int], n_outputs: int, n_trainers: int, **kwargs: int
) -> Blocks:
    """The named blocks of preset ``name``."""
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}: use one of {', '.join(PRESETS)}")
    return PRESETS[name](image_shape, n_outputs, n_trainers, **kwargs)
