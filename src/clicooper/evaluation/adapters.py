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
    clustering_attack,
    extract_surrogate,
    query_decoder,
    scratch_baseline,
    unsplit,
)
from clicooper.attacks.clustering import (
    _kmeans,
    blind_naming_accuracy,
    group_pseudo_classes,
    naming_accuracy_clear,
    structural_naming_accuracy,
)
from clicooper.attacks.extraction import last_linear, query_shadow_head
from clicooper.attacks.inversion import aligned_autoencoder, decode, whitebox
from clicooper.evaluation.settings import EvalSettings
from clicooper.evaluation.views import AuxData, PartyView
from clicooper.privacy.activation import ActivationNoise

Factory = Callable[[], nn.Module]
Aligned = tuple[nn.Module, nn.Module]
SOURCES = {"activations": "activation", "gradients": "gradient"}


def _normalised(x: torch.Tensor) -> np.ndarray:
    flat = x.flatten(1).double().numpy()
    return flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-12)


def naming_accuracy(
    view: PartyView,
    labels: np.ndarray,
    n_classes: int,
    clear_labels: bool,
    seed: int,
    namings: int = 100,
) -> dict[str, float]:
    """How well the party names its last-epoch rows' true classes without labelled data.

    Vanilla Tn reads the true labels it received (``naming_accuracy``, 1.0). CliCooper Tn
    groups its pseudo-classes by k-means on its classifier's rows; other trainers cluster
    their activations by k-means. Neither holds anything that names a group, so
    ``naming_accuracy`` is the mean over ``namings`` random namings
    (:func:`blind_naming_accuracy`). CliCooper Tn also tries the block layout
    p -> floor(p C / M) (``naming_structural``), which would name everything right if
    the secret permutation were missing.
    """
    last = view.records["epoch"] == view.epochs[-1]
    y = labels[last.numpy()]
    if view.is_last and "pseudo_labels" in view.records:
        received = view.records["pseudo_labels"][last]
        if clear_labels:
            return {"naming_accuracy": naming_accuracy_clear(received, y)}
        rows = last_linear(view.segment).weight.detach()
        groups = group_pseudo_classes(rows, n_classes, seed)[received.numpy()]
        return {
            "naming_accuracy": blind_naming_accuracy(groups, y, n_classes, namings, seed),
            "naming_structural": structural_naming_accuracy(received, y, n_classes, len(rows)),
        }
    clusters = _kmeans(_normalised(view.records["activation"][last]), n_classes, 10, seed)
    return {"naming_accuracy": blind_naming_accuracy(clusters, y, n_classes, namings, seed)}


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
    out.update(naming_accuracy(view, labels, n_classes, clear_labels, s.seed))
    out["chance"] = 1.0 / n_classes
    return out


def inversion_targets(first: PartyView, n: int) -> torch.Tensor:
    """Row indices of the activations to invert: the first n rows of T1's last recorded epoch."""
    rows = torch.nonzero(first.records["epoch"] == first.epochs[-1]).flatten()
    if len(rows) < n:
        raise ValueError(f"t1 recorded {len(rows)} rows in its last epoch; raise record to {n}")
    return rows[:n]


def observed(first: PartyView) -> torch.Tensor:
    """The activations T1 received in its last recorded epoch (what the attacks fit)."""
    return first.rows("activation", first.epochs[-1])


def align(seen: torch.Tensor, aux: AuxData, head_factory: Factory, s: EvalSettings) -> Aligned:
    """Encoder and decoder aligned to activations T1 holds (``seen``) with the auxiliary images.

    One training serves two attacks: the decoder is the auxiliary-data inverter, the
    encoder the extraction's shadow head (both only need aux images and observations).
    ``seen``: T1's last-epoch inputs (:func:`observed`), or a release-once T1's cache.
    """
    return aligned_autoencoder(head_factory, aux.images, seen, s.aux_epochs, s.seed)


def inversion(
    z: torch.Tensor,
    aux: AuxData,
    head_factory: Factory,
    image_shape: tuple[int, ...],
    noisy_pairs: torch.Tensor,
    clean_pairs: torch.Tensor,
    aligned: Aligned,
    s: EvalSettings,
    exact_head: bool = False,
) -> dict[str, torch.Tensor]:
    """Reconstructions of the activations ``z`` T1 holds, at every attacker strength.

    ``noisy_pairs``/``clean_pairs`` are what T1 gets for the attacker's chosen images
    ``aux.images`` with the noise on / off (query access); ``aligned`` is :func:`align`'s
    (encoder, decoder). ``exact_head``: ``head_factory`` gives the very head that produced
    ``z`` (release once with a head the trainers hold), so the data-free attacker inverts
    it white-box (:func:`clicooper.attacks.inversion.whitebox`) instead of fitting a shadow.
    """
    return {
        "data_free": data_free(head_factory, z, image_shape, s, exact_head),
        "aux_no_query": decode(aligned[1], z),
        "query_decoder": query_decoder(
            aux.images, noisy_pairs, z, epochs=s.decoder_epochs, seed=s.seed
        ),
        "query_decoder_nonadaptive": query_decoder(
            aux.images, clean_pairs, z, epochs=s.decoder_epochs, seed=s.seed
        ),
    }


def data_free(
    head_factory: Factory,
    z: torch.Tensor,
    image_shape: tuple[int, ...],
    s: EvalSettings,
    exact_head: bool = False,
) -> torch.Tensor:
    """UnSplit at the evaluation's budget; white-box inversion when the head is known."""
    if exact_head:
        steps = s.unsplit_rounds * s.unsplit_steps  # UnSplit's image steps, no shadow steps
        return whitebox(head_factory(), z, image_shape, steps, seed=s.seed)
    return unsplit(
        head_factory, z, image_shape, rounds=s.unsplit_rounds, steps=s.unsplit_steps, seed=s.seed
    )


def simulated_noise(clean: torch.Tensor, privacy: dict[str, Any], seed: int) -> torch.Tensor:
    """The attacker's own noisy pairs: clean activations clipped and noised like a release.

    A release-once T1 is served clean inference only, but the noise settings are public
    (``privacy``: a run's results.json section), so it can draw the release's noise itself
    with its own generator and train the adaptive query decoder on pairs that look like
    the releases it holds.
    """
    noise = ActivationNoise(
        privacy["clip_norm"], privacy["noise_multiplier"], privacy["mechanism"], seed=seed
    )
    return noise(clean)


def stolen(views: list[PartyView]) -> nn.Module:
    """The colluding trainers' segments composed in chain order."""
    return nn.Sequential(*[v.segment for v in views])


def extraction(
    views: list[PartyView],
    aux: AuxData,
    shadow: nn.Module,
    head_factory: Factory,
    query_pairs: torch.Tensor,
    model_factory: Factory | None,
    n_classes: int,
    clear_labels: bool,
    test_x: torch.Tensor,
    test_y: np.ndarray,
    s: EvalSettings,
    exact_head: bool = False,
) -> dict[str, Any]:
    """Non-adaptive and adaptive extraction by all trainers colluding, scored on the test set.

    ``shadow`` is the aligned encoder (:func:`align`); without ``model_factory`` the
    adaptive variant and its from-scratch baseline are skipped. ``query_access`` is the
    same surrogate with a shadow head regressed on ``query_pairs`` (what T1 received
    when the owner served inference on ``aux.images``), the query attacker's extraction.
    ``exact_head``: ``head_factory`` gives the run's very head (release once, a head the
    trainers hold): it is the shadow of both, nothing to fit.
    """
    naming = np.arange(n_classes) if clear_labels else None
    seen = observed(views[0])

    def surrogate(head: nn.Module) -> dict[str, float]:
        return extract_surrogate(
            stolen(views),
            None,
            aux.images,
            seen,
            test_x,
            test_y,
            n_classes,
            pseudo_to_class=naming,
            seed=s.seed,
            shadow_head=head,
        )

    if exact_head:
        shadow = head_factory()
    result = surrogate(shadow)
    queried = (
        head_factory()
        if exact_head
        else query_shadow_head(
            head_factory, aux.images, query_pairs, epochs=s.decoder_epochs, seed=s.seed
        )
    )
    result["query_access"] = {
        k: v for k, v in surrogate(queried).items() if k in ("accuracy", "matched_accuracy")
    }
    adaptive = []
    m_values = [m for m in s.adaptive_m if m <= aux.max_m()] if model_factory else []
    for m in m_values:
        xl, yl = aux.labelled(m)
        attack = adaptive_extraction(
            stolen(views),
            None,
            aux.images,
            seen,
            xl,
            yl,
            test_x,
            test_y,
            n_classes,
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
