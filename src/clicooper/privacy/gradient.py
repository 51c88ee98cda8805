"""Gradient protection: per-sample clipping plus Gaussian noise on the backward channel.

The last trainer Tn computes the loss on pseudo-labels, so the gradient it sends back
to T(n-1), ``g_i = d l_i / d a_i`` for sample i, carries that sample's pseudo-label:
clustered by k-means it reveals label *groups* to every earlier trainer (Liu & Lyu
2022), and activation noise does not touch it. With this protection Tn replaces each
per-sample gradient (of the per-sample loss, so the clip norm does not depend on the
batch size) by ``clip(g_i, G) + N(0, (sigma G)^2 I)`` before sending it back; the
batch-mean gradient that the earlier parties step with is the mean of these.

Replacing one sample (its activation or its label) changes its clipped gradient by at
most 2G, so each release is a Gaussian mechanism with noise multiplier ``sigma / 2``
that :mod:`clicooper.privacy.accounting` composes over the epochs. The bound covers the
gradients released to T(n-1), per record, given the model; Tn itself holds the
pseudo-labels in clear, and the secret permutation, not this noise, hides their names.
The noise costs accuracy: every party before Tn steps with noisy gradients.

The generator is seeded from the OS CSPRNG: Tn's noise is its own secret, never
derived from the experiment seed.
"""

from __future__ import annotations

import torch

from clicooper.config import RunConfig
from clicooper.privacy.activation import ActivationNoise


class GradientNoise:
    """Clip each sample's loss gradient to L2 norm ``clip_norm`` and add Gaussian noise."""

    def __init__(self, clip_norm: float, noise_multiplier: float, seed: int | None = None) -> None:
        """``seed``: a secret generator seed; None (the protocol) draws one from the OS CSPRNG."""
        self._mechanism = ActivationNoise(clip_norm, noise_multiplier, "gaussian", seed)

    def __call__(self, grad: torch.Tensor, loss_scale: float) -> torch.Tensor:
        """Protect ``grad``, the gradient of ``sum_i l_i / loss_scale`` w.r.t. the input.

        ``loss_scale`` turns it into per-sample loss gradients (for a batch-mean loss it
        is the batch size); the result is scaled back, so the update's scale is kept.
        """
        if loss_scale <= 0:
            raise ValueError(f"loss_scale must be positive, got {loss_scale}")
        return self._mechanism(grad * loss_scale) / loss_scale


def enabled(cfg: RunConfig) -> bool:
    """Whether the run protects its backward channel: clicooper, noise > 0, two or more
    trainers (a lone trainer sends its gradients to the data owner, who holds the labels)."""
    p = cfg.privacy
    return cfg.mode == "clicooper" and p.gradient_noise_multiplier > 0 and cfg.trainers >= 2


def for_trainer(cfg: RunConfig, index: int) -> GradientNoise | None:
    """Trainer ``index``'s protection: the last trainer's, when :func:`enabled`; else None."""
    if not enabled(cfg) or index != cfg.trainers:
        return None
    return GradientNoise(cfg.privacy.gradient_clip_norm, cfg.privacy.gradient_noise_multiplier)
