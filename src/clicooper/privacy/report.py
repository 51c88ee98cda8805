"""Privacy reporting: the ``privacy`` section of a run's results and the noise it needs.

The activation channel's epsilon over its releases (one per record per epoch, or one
in all with release once), and the backward channel's (:mod:`clicooper.privacy.gradient`),
each with the scope of what it bounds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from clicooper.config import RunConfig
from clicooper.privacy import accounting, gradient
from clicooper.privacy.activation import ActivationNoise
from clicooper.privacy.release import FrozenHead, once_scope

if TYPE_CHECKING:
    from clicooper.parties.releases import OwnerRelease

ACCOUNTING_SCOPE = (
    "per-record bound on the noisy cut-layer activations released to the first trainer, "
    "given the head; not a dataset-level guarantee for the head's weights"
)

GRADIENT_SCOPE = (
    "per-record bound on the gradients the last trainer sends back to the one before it, "
    "given the model; the last trainer itself holds the pseudo-labels in clear"
)


#: What a vanilla run on a frozen head is (results.json ``privacy.baseline``).
FROZEN_BASELINE = (
    "vanilla split learning on release once's frozen head: not private. Each training "
    "record's clean activation head(x) (no clipping, no noise) was sent to the first trainer "
    "once and cached; the last trainer got the true labels; no watermark. The baseline "
    "release once is compared against (same head, public split, warm start and seed)"
)


def releases_once(cfg: RunConfig) -> bool:
    """Whether the head is frozen and each record's activation is sent to t1 once, before
    training: clicooper's noisy release, or (mode vanilla) its clean baseline."""
    return cfg.mode in ("clicooper", "vanilla") and cfg.privacy.release == "once"


def noise_multiplier(cfg: RunConfig) -> float:
    """The configured multiplier, or the one that meets ``target_epsilon`` over the run
    (one release per epoch, or one in all with release once)."""
    p = cfg.privacy
    if p.target_epsilon is None:
        return p.noise_multiplier
    releases = accounting.planned_releases(p.release, cfg.epochs, p.noise_at_inference)
    return accounting.noise_for_epsilon(p.target_epsilon, releases, p.delta, p.mechanism)


def privacy_report(
    cfg: RunConfig,
    noise: ActivationNoise | None,
    releases: int,
    gradient_releases: int,
    release: OwnerRelease | None = None,
    head: FrozenHead | None = None,
) -> dict[str, Any]:
    """The activation noise's settings and epsilon, with the backward channel's under
    ``gradient``; ``gradient_releases``: training epochs (no gradient at inference).
    ``release`` and ``head``: a release-once run's release and frozen head."""
    p = cfg.privacy
    grad = gradient_report(cfg, gradient_releases)
    once = {"release": "once" if release is not None else "every-epoch"}
    if release is not None:
        once.update(release.summary(), covers=once_scope(p.noise_at_inference))
        once["head"] = head.privacy if head is not None else None
    if noise is None:
        clear: dict[str, Any] = {
            "release": p.release if cfg.mode == "clicooper" else None,
            "epsilon": None,
            "delta": p.delta,
            "noise_multiplier": 0.0,
            "clip_norm": None,
            "mechanism": None,
            "releases": 0,
            "covers": None,
            "gradient": grad,
        }
        if release is not None:  # vanilla on the frozen head: clean sends, not releases
            clear.update(once, covers=None, baseline=FROZEN_BASELINE)
        return clear
    return {
        "epsilon": accounting.epsilon(noise.noise_multiplier, releases, p.delta, p.mechanism),
        "delta": p.delta,
        "noise_multiplier": noise.noise_multiplier,
        "clip_norm": p.clip_norm,
        "mechanism": p.mechanism,
        "releases": releases,
        "accountant": "dp-accounting RDP",
        "covers": ACCOUNTING_SCOPE,
        "gradient": grad,
        **once,
    }


def gradient_report(cfg: RunConfig, releases: int) -> dict[str, Any]:
    """The backward channel's protection (clicooper.privacy.gradient): its settings and epsilon."""
    p = cfg.privacy
    if not gradient.enabled(cfg):
        return {"noise_multiplier": 0.0, "clip_norm": None, "epsilon": None, "covers": None}
    return {
        "noise_multiplier": p.gradient_noise_multiplier,
        "clip_norm": p.gradient_clip_norm,
        "epsilon": accounting.epsilon(p.gradient_noise_multiplier, releases, p.delta),
        "delta": p.delta,
        "releases": releases,
        "applied_by": f"t{cfg.trainers}",
        "covers": GRADIENT_SCOPE,
    }
