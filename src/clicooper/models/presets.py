"""MLP and CNN presets as named blocks with named cut points.

The tail after the cut is deep enough for a chain of up to eight trainers:
``max(1, n_trainers - 1)`` hidden blocks and a classifier block. The CNN's default
cut ends in a small linear bottleneck: noise is scaled to the clip norm of the
whole cut vector, so a low-dimensional cut keeps the signal-to-noise ratio
(DESIGN §9).
"""

from __future__ import annotations

from collections.abc import Callable

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


def _tail(d_in: int, n_outputs: int, n_trainers: int, hidden: int) -> Blocks:
    if not 1 <= n_trainers <= MAX_TRAINERS:
        raise ValueError(f"trainers must be 1 to {MAX_TRAINERS}, got {n_trainers}")
    blocks: Blocks = []
    for i in range(1, max(2, n_trainers)):
        blocks.append((f"hidden{i}", nn.Sequential(nn.ReLU(), nn.Linear(d_in, hidden))))
        d_in = hidden
    blocks.append(("classifier", nn.Sequential(nn.ReLU(), nn.Linear(d_in, n_outputs))))
    return blocks


PRESETS: dict[str, Callable[..., Blocks]] = {"mlp": mlp, "cnn": cnn}
DEFAULT_CUT = {"mlp": "bottleneck", "cnn": "bottleneck"}


def build_preset(
    name: str, image_shape: tuple[int, int, int], n_outputs: int, n_trainers: int, **kwargs: int
) -> Blocks:
    """The named blocks of preset ``name``."""
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}: use one of {', '.join(PRESETS)}")
    return PRESETS[name](image_shape, n_outputs, n_trainers, **kwargs)
