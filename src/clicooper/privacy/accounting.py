"""Privacy accounting for the released cut-layer activations (DESIGN §6).

Each release of a sample's noisy activation is one mechanism run with
sensitivity 2C (replace-one: two clipped activations differ by at most 2C).
Gaussian noise of std ``m * C`` is a Gaussian mechanism with noise multiplier
``sigma = m * C / 2C = m / 2``; Laplace noise of scale ``m * C`` against L1
sensitivity 2C is a Laplace mechanism with ``b / Delta = m / 2``. A sample is
released once per epoch with ``release = "every-epoch"``, once for the whole run
with ``release = "once"`` (and once more per noisy inference), so the total is
the ``releases``-fold self-composition, accounted for by Google's
dp-accounting RDP accountant (no hand-written RDP maths); see
:func:`planned_releases`.

What the bound covers: per record, the activations released to the first
trainer, *given the head*. It is not a dataset-level guarantee for the head's
weights, which are trained on the data without noise.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from clicooper.privacy.activation import Mechanism

if TYPE_CHECKING:
    import dp_accounting

# dp_accounting is imported where it is used: its package imports scipy.stats and
# scipy.signal (about a second), which trainer, verifier and node processes never need.

SENSITIVITY_FACTOR = 2.0  # replace-one sensitivity in units of the clip norm


def planned_releases(release: str, epochs: int, noise_at_inference: bool) -> int:
    """Noisy releases of each training record over a run of ``epochs`` epochs.

    ``every-epoch``: one per epoch; ``once``: one, before training (t1 reuses it).
    ``noise_at_inference`` adds one: a training record queried at inference is released
    once more (the convention the results and ``target_epsilon`` share).
    """
    if release not in ("every-epoch", "once"):
        raise ValueError(f"unknown release {release!r}: every-epoch or once")
    return (epochs if release == "every-epoch" else 1) + int(noise_at_inference)


def _event(noise_multiplier: float, mechanism: Mechanism) -> dp_accounting.DpEvent:
    import dp_accounting

    ratio = noise_multiplier / SENSITIVITY_FACTOR
    if mechanism == "laplace":
        return dp_accounting.LaplaceDpEvent(ratio)
    return dp_accounting.GaussianDpEvent(ratio)


def epsilon(
    noise_multiplier: float, releases: int, delta: float, mechanism: Mechanism = "gaussian"
) -> float | None:
    """Epsilon at ``delta`` after ``releases`` noisy releases of each sample.

    ``None`` when there is no noise (no finite guarantee).
    """
    if noise_multiplier <= 0 or releases <= 0:
        return None
    import dp_accounting
    from dp_accounting import rdp

    accountant = rdp.RdpAccountant()
    accountant.compose(
        dp_accounting.SelfComposedDpEvent(_event(noise_multiplier, mechanism), releases)
    )
    value = accountant.get_epsilon(delta)
    return value if math.isfinite(value) else None


def noise_for_epsilon(
    target_epsilon: float, releases: int, delta: float, mechanism: Mechanism = "gaussian"
) -> float:
    """The smallest noise multiplier whose epsilon is at most ``target_epsilon``.

    Bisection on the accountant's monotone epsilon(noise) curve, to 1e-4.
    """
    if target_epsilon <= 0:
        raise ValueError(f"target_epsilon must be positive, got {target_epsilon}")
    lo, hi = 1e-4, 1.0
    while (epsilon(hi, releases, delta, mechanism) or math.inf) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e6:
            raise ValueError(f"no noise reaches epsilon {target_epsilon} at delta {delta}")
    while hi - lo > 1e-4:
        mid = (lo + hi) / 2
        if (epsilon(mid, releases, delta, mechanism) or math.inf) > target_epsilon:
            lo = mid
        else:
            hi = mid
    return hi
