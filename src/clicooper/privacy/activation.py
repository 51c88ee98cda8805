"""Activation protection: per-sample clipping plus calibrated noise on the cut layer.

For each sample, ``z`` is clipped to norm C (L2 for Gaussian, L1 for Laplace):
``clip(z) = z * min(1, C / ||z||)``. Then noise is added to every coordinate:
Gaussian with standard deviation ``noise_multiplier * C``, or Laplace with
scale ``b = noise_multiplier * C``. Replacing one sample changes its clipped
activation by at most 2C (the sensitivity used by the accountant).

The noise generator is never seeded from the experiment seed: an attacker who
knows the seed must not be able to subtract the noise. A run seeds it with
``HKDF(owner secret, "activation-noise")`` (the owner secret comes from the OS
CSPRNG), so noise is as secret as the label permutation, and a run repeated with
the same owner secret (``owner_secret`` setting) draws the same noise. Without
a seed the generator is seeded from the OS CSPRNG.
"""

from __future__ import annotations

import os
from typing import Literal

import torch

Mechanism = Literal["gaussian", "laplace"]


class ActivationNoise:
    """Clip and noise cut-layer activations; gradients flow through the clip."""

    def __init__(
        self,
        clip_norm: float,
        noise_multiplier: float,
        mechanism: Mechanism = "gaussian",
        seed: int | None = None,
    ) -> None:
        """``seed``: a secret 63-bit generator seed; None draws one from the OS CSPRNG."""
        if clip_norm <= 0:
            raise ValueError(f"clip_norm must be positive, got {clip_norm}")
        if noise_multiplier < 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
        self.clip_norm = clip_norm
        self.noise_multiplier = noise_multiplier
        self.mechanism = mechanism
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "big") >> 1
        self._gen = torch.Generator().manual_seed(seed)

    def clip(self, z: torch.Tensor) -> torch.Tensor:
        """Scale each sample to norm at most C (L2 or L1 by mechanism)."""
        flat = z.flatten(1)
        order = 1 if self.mechanism == "laplace" else 2
        norms = flat.norm(p=order, dim=1).clamp_min(1e-12)
        factor = (self.clip_norm / norms).clamp(max=1.0)
        return z * factor.view(-1, *([1] * (z.ndim - 1)))

    def noise(self, shape: torch.Size, generator: torch.Generator | None = None) -> torch.Tensor:
        """Fresh noise of the mechanism's scale, ``noise_multiplier * C``, drawn from
        ``generator`` (default: this mechanism's own secret stream)."""
        gen = self._gen if generator is None else generator
        scale = self.noise_multiplier * self.clip_norm
        if scale == 0:
            return torch.zeros(shape)
        if self.mechanism == "gaussian":
            return torch.randn(shape, generator=gen) * scale
        # Laplace as the difference of two exponentials (torch has no seeded Laplace sampler).
        e1 = torch.empty(shape).exponential_(generator=gen)
        e2 = torch.empty(shape).exponential_(generator=gen)
        return (e1 - e2) * scale

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        clipped = self.clip(z)
        return clipped + self.noise(clipped.shape).to(clipped)  # drawn on the CPU
