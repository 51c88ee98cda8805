"""Attacks on split learning and the metrics that score them (DESIGN.md section 7).

One concept per module, each a pure function over arrays, tensors and module
factories (never over a run directory):

- :mod:`.clustering`: k-means label inference with a permutation test, naming accuracy;
- :mod:`.inversion`: activation inversion, data-free / auxiliary data / query access;
- :mod:`.extraction`: surrogate models built by colluding trainers, adaptive variant;
- :mod:`.removal`: weight operations used by watermark-removal attacks;
- :mod:`.metrics`: matched accuracy, ARI, SSIM, PSNR and mean-image baselines.

The exception is :mod:`.watermark_removal` (not imported here): removal attacks on
a finished run's stolen chain (fine-tuning, pruning, overwriting), scored by the
trainers' ownership claims; it loads the run directory and its ledger.

``ATTACKS`` maps a stable name to the callable, for picking attacks by name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from clicooper.attacks.clustering import clustering_attack
from clicooper.attacks.extraction import adaptive_extraction, extract_surrogate, scratch_baseline
from clicooper.attacks.inversion import aux_no_query, query_decoder, unsplit
from clicooper.attacks.removal import fine_tune, magnitude_prune
from clicooper.attacks.results import ClusteringResult

ATTACKS: dict[str, Callable[..., Any]] = {
    "clustering": clustering_attack,
    "unsplit": unsplit,
    "aux_no_query": aux_no_query,
    "query_decoder": query_decoder,
    "extraction": extract_surrogate,
    "adaptive_extraction": adaptive_extraction,
    "scratch_baseline": scratch_baseline,
    "prune": magnitude_prune,
    "fine_tune": fine_tune,
}


def get_attack(name: str) -> Callable[..., Any]:
    """The attack registered under ``name``; a clear error listing the known names."""
    try:
        return ATTACKS[name]
    except KeyError:
        raise KeyError(f"unknown attack {name!r}; choose one of {sorted(ATTACKS)}") from None


__all__ = ["ATTACKS", "ClusteringResult", "get_attack"]
