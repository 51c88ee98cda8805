"""Torch helpers shared by the attacks: seeding, input checks, batching, training, MMD."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

ArrayLike = np.ndarray | Tensor
# Fewest optimiser steps for attacks fitted on query pairs: 179 digits pairs x 40 epochs
# (120 steps) left a regressed shadow head at the mean activation.
MIN_QUERY_STEPS = 600


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block with torch's global RNG seeded by ``seed``; the caller's RNG state is restored.

    Module factories draw their initial weights from the global RNG, so seeding it is
    what makes an attack reproducible for a given seed without side effects.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def as_float_tensor(x: ArrayLike, name: str, min_rank: int = 2) -> Tensor:
    """``x`` as a detached float32 tensor with at least ``min_rank`` dims and finite values."""
    t = x if isinstance(x, Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    t = t.detach().float()
    if t.dim() < min_rank:
        raise ValueError(f"{name} has shape {tuple(t.shape)}; pass a batch (n, ...) of samples")
    if t.shape[0] == 0:
        raise ValueError(f"{name} is empty; pass at least one sample")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or Inf; clean the input first")
    return t


def as_images(x: ArrayLike, name: str) -> Tensor:
    """Images (n, H, W) or (n, C, H, W) in [0, 1] as a float32 tensor."""
    t = as_float_tensor(x, name, min_rank=3)
    if t.dim() > 4:
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected (n, H, W) or (n, C, H, W)")
    if t.min() < -1e-6 or t.max() > 1 + 1e-6:
        raise ValueError(f"{name} has values outside [0, 1]; scale images to [0, 1] first")
    return t


def as_labels(y: ArrayLike, n: int, name: str) -> np.ndarray:
    """Integer labels (n,) as a numpy array."""
    a = np.asarray(y.detach().cpu() if isinstance(y, Tensor) else y)
    if a.shape != (n,):
        raise ValueError(f"{name} has shape {a.shape}; expected ({n},), one label per sample")
    if not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} has dtype {a.dtype}; pass integer class ids")
    return a.astype(np.int64)


def batches(
    n: int, batch_size: int, epochs: int, generator: torch.Generator, min_steps: int = 0
) -> Iterator[Tensor]:
    """Index batches: ``epochs`` shuffled passes over ``range(n)``, more if needed to give
    at least ``min_steps`` batches (a few hundred images make few steps per epoch)."""
    per_epoch = math.ceil(n / batch_size)
    for _ in range(max(epochs, math.ceil(min_steps / per_epoch))):
        perm = torch.randperm(n, generator=generator)
        yield from perm.split(batch_size)


def train(
    params: Iterable[nn.Parameter],
    loss_fn: Callable[[Any], Tensor],
    items: Iterable[Any],
    lr: float,
    optimizer: Callable[..., torch.optim.Optimizer] = torch.optim.Adam,
) -> float:
    """One optimiser step on ``loss_fn(item)`` per item (an index batch, a data batch...).

    Returns the last loss (NaN when there was no item).
    """
    opt = optimizer(list(params), lr=lr)
    loss = torch.tensor(float("nan"))
    for item in items:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(item)
        loss.backward()
        opt.step()
    return float(loss.detach())


def query_pairs(images: ArrayLike, activations: ArrayLike) -> tuple[Tensor, Tensor]:
    """A query attacker's pairs (chosen images, the activations returned for them), checked."""
    x = as_images(images, "pairs_images")
    a = as_float_tensor(activations, "pairs_activations")
    if a.shape[0] != x.shape[0]:
        raise ValueError(f"{x.shape[0]} pair images but {a.shape[0]} pair activations")
    return x, a


def fit_mse(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    epochs: int,
    seed: int,
    lr: float = 1e-3,
    batch_size: int = 64,
) -> nn.Module:
    """Regress ``model(inputs)`` on ``targets`` (mean squared error, Adam, seeded batches,
    at least ``MIN_QUERY_STEPS`` steps); returns the model in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    train(
        model.train().parameters(),
        lambda idx: F.mse_loss(model(inputs[idx]), targets[idx]),
        batches(inputs.shape[0], batch_size, epochs, gen, min_steps=MIN_QUERY_STEPS),
        lr,
    )
    return model.eval()


def standardiser(reference: Tensor, floor: float = 0.01) -> Callable[[Tensor], Tensor]:
    """Map z -> (z - mean) / sd with per-element statistics of ``reference`` (n, ...).

    Statistics are over the batch axis, so z keeps its shape. Each sd is floored at
    ``floor`` times the root-mean-square sd, so a dead (constant) unit is not blown
    up by a near-zero sd; it then hardly counts, as it carries no information.
    """
    mean = reference.mean(0)
    if reference.shape[0] < 2:
        return lambda z: z - mean
    sd = reference.std(0)
    sd = sd.clamp_min(floor * float(sd.pow(2).mean().sqrt()) + 1e-12)
    return lambda z: (z - mean) / sd


def mmd2(a: Tensor, b: Tensor) -> Tensor:
    """Squared maximum mean discrepancy between samples a (n, d) and b (m, d).

    Biased V-statistic with a sum of Gaussian kernels k(u, v) = exp(-|u - v|^2 / (2 s^2)),
    s^2 in d * {1/4, 1, 4} (inputs are expected standardised, so |u - v|^2 ~ 2d):
    MMD^2 = mean k(a, a') + mean k(b, b') - 2 mean k(a, b). It is zero iff the two
    distributions agree (characteristic kernel), so minimising it matches distributions
    without needing paired samples.
    """
    d = a.shape[1]
    x = torch.cat([a, b])
    sq = torch.cdist(x, x).pow(2)
    k = sum(torch.exp(-sq / (2 * d * s)) for s in (0.25, 1.0, 4.0))
    n = a.shape[0]
    return k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean()


def make_decoder(act_shape: tuple[int, ...], image_shape: tuple[int, ...]) -> nn.Module:
    """Inverse network activation -> image with outputs in [0, 1] (sigmoid).

    Spatial activations (C', h, w) get a convolutional decoder (3x3 conv, then stride-2
    transposed convs until the map reaches the image size, bilinear resize to the exact
    size, 3x3 conv to the image channels); anything else is flattened into an MLP.
    """
    chans = image_shape[0] if len(image_shape) == 3 else 1
    h, w = image_shape[-2:]
    if len(act_shape) == 3:
        c, ah, aw = act_shape
        layers: list[nn.Module] = [nn.Conv2d(c, 64, 3, padding=1), nn.ReLU()]
        width = 64
        for _ in range(max(0, math.ceil(math.log2(max(h / ah, w / aw))))):
            layers += [nn.ConvTranspose2d(width, 32, 4, stride=2, padding=1), nn.ReLU()]
            width = 32
        layers += [nn.Upsample(size=(h, w), mode="bilinear"), nn.Conv2d(width, chans, 3, padding=1)]
        return nn.Sequential(*layers, nn.Sigmoid(), nn.Flatten(), nn.Unflatten(1, image_shape))
    d = math.prod(act_shape)
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(d, 256),
        nn.ReLU(),
        nn.Linear(256, 256),
        nn.ReLU(),
        nn.Linear(256, math.prod(image_shape)),
        nn.Sigmoid(),
        nn.Unflatten(1, image_shape),
    )
