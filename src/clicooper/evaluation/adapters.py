"""Attack adapters: run the attack library on exactly what the attacking parties hold.

Every adapter takes :class:`~clicooper.evaluation.views.PartyView` records, the
attackers' :class:`~clicooper.evaluation.views.AuxData` and architecture factories
(fresh weights, no owner parameters). True labels and original images appear only
as scoring arguments, which the attack functions use after the attack has run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from clicooper.attacks import (
    adaptive_extraction,
    aux_no_query,
    clustering_attack,
    extract_surrogate,
    query_decoder,
    scratch_baseline,
    unsplit,
)
from clicooper.attacks.clustering import (
    _kmeans,
    group_pseudo_classes,
    naming_accuracy_clear,
    naming_accuracy_pseudo,
    naming_accuracy_unlabelled,
)
from clicooper.attacks.extraction import last_linear, train_shadow_head
from clicooper.evaluation.settings import EvalSettings
from clicooper.evaluation.views import AuxData, PartyView

Factory = Callable[[], nn.Module]
SOURCES = {"activations": "activation", "gradients": "gradient"}


def _normalised(x: torch.Tensor) -> np.ndarray:
    flat = x.flatten(1).double().numpy()
    return flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-12)


def naming_accuracy(
    view: PartyView, labels: np.ndarray, n_classes: int, clear_labels: bool, seed: int
) -> float:
    """Share of the party's last-epoch rows it names right without labelled data.

    Tn names rows by the labels it received: the true labels in clear (vanilla), or
    pseudo-labels grouped by k-means on its classifier's rows and named group g -> class
    g (CliCooper). Other trainers name k-means cluster j -> class j of their activations.
    """
    last = view.records["epoch"] == view.epochs[-1]
    y = labels[last.numpy()]
    if view.is_last and "pseudo_labels" in view.records:
        received = view.records["pseudo_labels"][last]
        if clear_labels:
            return naming_accuracy_clear(received, y)
        grouping = group_pseudo_classes(last_linear(view.segment).weight.detach(), n_classes, seed)
        return naming_accuracy_pseudo(received, y, grouping)
    clusters = _kmeans(_normalised(view.records["activation"][last]), n_classes, 10, seed)
    return naming_accuracy_unlabelled(clusters, y)


def clustering(
    view: PartyView, labels: np.ndarray, n_classes: int, clear_labels: bool, s: EvalSettings
) -> dict[str, Any]:
    """Clustering label inference on the party's activations and, separately, its gradients.

    One source per recorded epoch; ``labels`` (evaluator-only) score the clusters. The
    top-level keys repeat the stronger source (higher success rate, then matched accuracy).
    """
    out: dict[str, Any] = {}
    for source, key in SOURCES.items():
        feats = [view.rows(key, e) for e in view.epochs]
        ys = [labels[(view.records["epoch"] == e).numpy()] for e in view.epochs]
        result = clustering_attack(
            feats,
            ys,
            n_classes,
            trials=s.cluster_trials,
            subset_size=s.cluster_subset,
            seed=s.seed,
            permutations=s.permutations,
        ).to_dict()
        out[source] = result
    best = max(SOURCES, key=lambda k: (out[k]["success_rate"], out[k]["matched_accuracy"]))
    out.update({k: out[best][k] for k in ("matched_accuracy", "ari", "success_rate")})
    out["null_matched_accuracy"] = out[best]["null_matched_accuracy"]
    out["source"] = best
    out["naming_accuracy"] = naming_accuracy(view, labels, n_classes, clear_labels, s.seed)
    out["chance"] = 1.0 / n_classes
    return out


def inversion_targets(first: PartyView, n: int) -> torch.Tensor:
    """Row indices of the activations to invert: the first n rows of T1's last recorded epoch."""
    rows = torch.nonzero(first.records["epoch"] == first.epochs[-1]).flatten()
    if len(rows) < n:
        raise ValueError(f"t1 recorded {len(rows)} rows in its last epoch; raise record to {n}")
    return rows[:n]


def inversion(
    first: PartyView,
    rows: torch.Tensor,
    aux: AuxData,
    head_factory: Factory,
    image_shape: tuple[int, ...],
    noisy_pairs: torch.Tensor,
    clean_pairs: torch.Tensor,
    s: EvalSettings,
) -> dict[str, torch.Tensor]:
    """Reconstructions of T1's observed activations ``rows`` at every attacker strength.

    ``noisy_pairs``/``clean_pairs`` are what T1 received when the owner served inference
    on the attacker's chosen images ``aux.images`` with its noise on / off (query access).
    """
    z = first.records["activation"][rows]
    return {
        "data_free": unsplit(
            head_factory,
            z,
            image_shape,
            rounds=s.unsplit_rounds,
            steps=s.unsplit_steps,
            seed=s.seed,
        ),
        "aux_no_query": aux_no_query(head_factory, aux.images, z, epochs=s.aux_epochs, seed=s.seed),
        "query_decoder": query_decoder(
            aux.images, noisy_pairs, z, epochs=s.decoder_epochs, seed=s.seed
        ),
        "query_decoder_nonadaptive": query_decoder(
            aux.images, clean_pairs, z, epochs=s.decoder_epochs, seed=s.seed
        ),
    }


def stolen(views: list[PartyView]) -> nn.Module:
    """The colluding trainers' segments composed in chain order."""
    return nn.Sequential(*[v.segment for v in views])


def extraction(
    views: list[PartyView],
    aux: AuxData,
    head_factory: Factory,
    model_factory: Factory,
    n_classes: int,
    clear_labels: bool,
    test_x: torch.Tensor,
    test_y: np.ndarray,
    s: EvalSettings,
) -> dict[str, Any]:
    """Non-adaptive and adaptive extraction by all trainers colluding, scored on the test set."""
    observed = views[0].rows("activation", views[0].epochs[-1])
    naming = np.arange(n_classes) if clear_labels else None
    # One shadow head serves every variant: it depends only on aux images and observations.
    shadow = train_shadow_head(head_factory, aux.images, observed, s.extraction_epochs, s.seed)
    result = extract_surrogate(
        stolen(views),
        head_factory,
        aux.images,
        observed,
        test_x,
        test_y,
        n_classes,
        pseudo_to_class=naming,
        epochs=s.extraction_epochs,
        seed=s.seed,
        shadow_head=shadow,
    )
    adaptive = []
    for m in [m for m in s.adaptive_m if m <= aux.max_m()]:
        xl, yl = aux.labelled(m)
        attack = adaptive_extraction(
            stolen(views),
            head_factory,
            aux.images,
            observed,
            xl,
            yl,
            test_x,
            test_y,
            n_classes,
            epochs=s.extraction_epochs,
            finetune_epochs=s.finetune_epochs,
            seed=s.seed,
            shadow_head=shadow,
        )
        scratch = scratch_baseline(
            model_factory, xl, yl, test_x, test_y, n_classes, epochs=s.scratch_epochs, seed=s.seed
        )
        adaptive.append(
            {
                "m": m,
                "accuracy": attack["accuracy"],
                "accuracy_before_finetune": attack["accuracy_before_finetune"],
                "scratch_accuracy": scratch["accuracy"],
            }
        )
    return {**result, "adaptive": adaptive}
