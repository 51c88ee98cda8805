"""The whole run's privacy: the head's cost composed with that of the one release.

Releases are accounted under replace-one adjacency (clicooper.privacy.accounting). A head
with no private cost leaves the release's (eps_r, delta_r) as the total. A head trained
with DP-SGD is (eps_h, delta_h)-DP under add/remove-one; by group privacy for groups of
two it is (2 eps_h, (1 + e^eps_h) delta_h)-DP under replace-one, and basic composition
(epsilons and deltas add) with the release gives

    eps = 2 eps_h + eps_r,    delta = (1 + e^eps_h) delta_h + delta_r.
"""

from __future__ import annotations

import math
from typing import Any

from clicooper.heads.base import HeadPrivacy


def total_privacy(
    head: HeadPrivacy, release_epsilon: float | None, release_delta: float
) -> dict[str, Any]:
    """Head, release and total (epsilon, delta), with the composition rule named."""
    out: dict[str, Any] = {
        "head": {"epsilon": head.epsilon, "delta": head.delta, "covers": head.covers},
        "release": {"epsilon": release_epsilon, "delta": release_delta},
    }
    if head.epsilon is None:
        out["total"] = {"epsilon": release_epsilon, "delta": release_delta, "rule": "release only"}
        return out
    h_delta = head.delta or 0.0
    eps = None if release_epsilon is None else 2 * head.epsilon + release_epsilon
    out["head"]["replace_one"] = {
        "epsilon": 2 * head.epsilon,
        "delta": (1 + math.exp(head.epsilon)) * h_delta,
    }
    out["total"] = {
        "epsilon": eps,
        "delta": (1 + math.exp(head.epsilon)) * h_delta + release_delta,
        "rule": "group privacy (replace-one = remove + add) then basic composition",
    }
    return out
