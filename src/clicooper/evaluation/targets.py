"""Issue 10's targets for a release-once run, checked in every column of an evaluation.

The targets were set for Fashion-MNIST; the evaluation checks them on whatever it ran,
so a column may fail one for its dataset's sake (digits' 8x8 images, its accuracy).
"""

from __future__ import annotations

from typing import Any

from clicooper.heads import HeadPrivacy, total_privacy

#: Issue 10's targets (point 6), as (key, what, limit): at most ``limit`` for epsilon,
#: owner share and data-free SSIM, at least it for accuracy; query-decoder SSIM is held to
#: its class-mean floor and extraction to within ``limit`` of chance.
TARGETS = (
    ("epsilon", "epsilon (delta 1e-5) at most 8, head included", 8.0),
    ("accuracy", "test accuracy at least 0.85", 0.85),
    ("owner_share", "owner share of training FLOPs at most 0.10", 0.10),
    ("query_decoder_ssim", "query-decoder SSIM no better than the class-mean floor", None),
    ("data_free_ssim", "data-free SSIM at most 0.03", 0.03),
    ("extraction", "non-adaptive extraction within 0.02 of chance", 0.02),
)
LIMITS = {key: limit for key, _, limit in TARGETS}


def targets(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each target's value and pass/fail in every column (:data:`TARGETS`).

    Query-decoder SSIM: the better of the adaptive and non-adaptive query decoders,
    against the class-mean floor (the SSIM of reconstructing each target as the mean
    auxiliary image of its true class). Epsilon: the run's total, the head's cost
    composed in (:func:`total_epsilon`); none (vanilla) fails, as does a missing owner share.
    """
    return {
        c: column_targets(results["runs"][c], results["attacks"][c]) for c in results["columns"]
    }


def column_targets(run: dict[str, Any], attacks: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """:func:`targets` of one column: its run summary and its attacks' results."""
    inv, ext = attacks["inversion"], attacks["extraction"]
    floor = inv["baselines"]["class_mean"]
    query = max(inv["query_decoder"]["ssim"], inv["query_decoder_nonadaptive"]["ssim"])
    eps = total_epsilon(run["privacy"])
    share = (run.get("compute") or {}).get("owner_share")
    accuracy, data_free = run["accuracy"]["test"], inv["data_free"]["ssim"]

    def at_most(value: float | None, key: str) -> dict[str, Any]:
        return {"value": value, "passed": value is not None and value <= LIMITS[key]}

    return {
        "epsilon": at_most(eps, "epsilon"),
        "accuracy": {"value": accuracy, "passed": accuracy >= LIMITS["accuracy"]},
        "owner_share": at_most(share, "owner_share"),
        "query_decoder_ssim": {"value": query, "floor": floor, "passed": query <= floor},
        "data_free_ssim": {
            **at_most(data_free, "data_free_ssim"),
            "dataset_mean": inv["baselines"]["dataset_mean"],  # context: a blind guess's SSIM
        },
        "extraction": {
            "value": ext["accuracy"],
            "chance": ext["chance"],
            "passed": abs(ext["accuracy"] - ext["chance"]) <= LIMITS["extraction"],
        },
    }


def total_epsilon(privacy: dict[str, Any]) -> float | None:
    """The run's epsilon with a release-once head's own cost composed in
    (:func:`clicooper.heads.total_privacy`); the release's alone otherwise."""
    head = (privacy.get("head") or {}).get("privacy") or {}
    if privacy.get("epsilon") is None or head.get("epsilon") is None:
        return privacy.get("epsilon")
    cost = HeadPrivacy(head["epsilon"], head.get("delta"), head.get("covers", ""))
    return total_privacy(cost, privacy["epsilon"], privacy["delta"])["total"]["epsilon"]
