"""Clustering label inference (after Liu & Lyu 2022) and the naming-accuracy helpers.

What the attacker knows: the vectors it received or computed at its cut (activations
or gradients), the number of classes C, and, for Tn under CliCooper, pseudo-labels.
It has no labelled data. k-means with k = C on L2-normalised vectors recovers label
*groups* when the vectors carry label information; whether it can *name* the groups
is a separate question, answered by the ``naming_accuracy_*`` helpers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.cluster import KMeans
from threadpoolctl import threadpool_limits

from clicooper.attacks._common import ArrayLike, as_float_tensor, as_labels
from clicooper.attacks.metrics import ari, best_assignment_total, contingency, matched_accuracy
from clicooper.attacks.results import ClusteringResult

MIN_TRIALS = 20


def _sources(
    features: ArrayLike | Sequence[ArrayLike], true_labels: ArrayLike | Sequence[ArrayLike]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Pair each feature source (n_s, ...) with its labels; one label array may serve all."""
    feats = list(features) if isinstance(features, list | tuple) else [features]
    labels = list(true_labels) if isinstance(true_labels, list | tuple) else [true_labels]
    if len(labels) == 1:
        labels = labels * len(feats)
    if len(labels) != len(feats):
        raise ValueError(f"{len(feats)} feature sources but {len(labels)} label arrays; pair them")
    out = []
    for i, (f, y) in enumerate(zip(feats, labels, strict=True)):
        x = as_float_tensor(f, f"features[{i}]").reshape(len(f), -1).double().numpy()
        out.append((x, as_labels(y, x.shape[0], f"true_labels[{i}]")))
    return out


def _kmeans(x: np.ndarray, k: int, n_init: int, seed: int) -> np.ndarray:
    """k-means cluster ids of the rows of x.

    Single-threaded: these problems are small, and OpenMP threads busy-waiting on
    shared cores made KMeans ~40x slower on a loaded 2-core host.
    """
    with threadpool_limits(limits=1, user_api="openmp"):
        return KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit_predict(x)


def permutation_p_value(
    clusters: np.ndarray, true_labels: np.ndarray, permutations: int, rng: np.random.Generator
) -> tuple[float, float]:
    """Permutation test of H0 "clusters carry no label information"; returns (p, null mean).

    The null distribution is the matched accuracy of random clusterings with the same
    cluster sizes (the assignment vector permuted). p = (1 + #{null >= observed}) / (1 + R).
    """
    observed = best_assignment_total(contingency(clusters, true_labels))
    null = np.array(
        [
            best_assignment_total(contingency(rng.permutation(clusters), true_labels))
            for _ in range(permutations)
        ]
    )
    p = (1 + np.sum(null >= observed)) / (1 + permutations)
    return float(p), float(null.mean() / len(true_labels))


def clustering_attack(
    features: ArrayLike | Sequence[ArrayLike],
    true_labels: ArrayLike | Sequence[ArrayLike],
    n_classes: int,
    trials: int = MIN_TRIALS,
    subset_size: int = 500,
    seed: int = 0,
    normalise: bool = True,
    n_init: int = 10,
    permutations: int = 200,
    alpha: float = 0.01,
) -> ClusteringResult:
    """k-means (k = C) label inference over ``trials`` random subsets; one ``ClusteringResult``.

    ``features`` are what the attacker holds at its cut: received activations or the
    gradients it computes there (both are clustered the same way).

    ``features`` is one array (n, ...) or a list of them (one per epoch or source); trial t
    uses source t mod len(sources) and a fresh random subset of ``subset_size`` rows.
    Rows are L2-normalised (x / |x|) when ``normalise``. Each trial scores the clustering
    by matched accuracy and ARI against the true labels (which only the evaluator holds)
    and succeeds when the permutation-test p-value (``permutations`` random clusterings)
    is below ``alpha``. Reproducible for a given ``seed``.
    """
    if trials < MIN_TRIALS:
        raise ValueError(f"trials={trials}; the evaluation needs at least {MIN_TRIALS} trials")
    if n_classes < 2:
        raise ValueError(f"n_classes={n_classes}; clustering needs at least 2 classes")
    sources = _sources(features, true_labels)
    rng = np.random.default_rng(seed)
    accs, aris, ps, nulls = [], [], [], []
    for t in range(trials):
        x, y = sources[t % len(sources)]
        size = min(subset_size, x.shape[0])
        if size < n_classes:
            raise ValueError(f"source {t % len(sources)} has {size} rows; need >= {n_classes}")
        idx = rng.choice(x.shape[0], size=size, replace=False)
        xs, ys = x[idx], y[idx]
        if normalise:
            xs = xs / np.maximum(np.linalg.norm(xs, axis=1, keepdims=True), 1e-12)
        clusters = _kmeans(xs, n_classes, n_init, int(rng.integers(2**31)))
        p, null = permutation_p_value(clusters, ys, permutations, rng)
        accs.append(matched_accuracy(clusters, ys))
        aris.append(ari(clusters, ys))
        ps.append(p)
        nulls.append(null)
    return ClusteringResult(
        matched_accuracy=float(np.mean(accs)),
        ari=float(np.mean(aris)),
        success_rate=float(np.mean(np.array(ps) < alpha)),
        null_matched_accuracy=float(np.mean(nulls)),
        alpha=alpha,
        permutations=permutations,
        subset_size=subset_size,
        trial_matched_accuracy=accs,
        trial_ari=aris,
        p_values=ps,
    )


def blind_naming_accuracy(
    groups: ArrayLike, true_labels: ArrayLike, n_classes: int, namings: int = 100, seed: int = 0
) -> float:
    """Naming accuracy of an attacker who holds C groups but nothing that names them.

    Every bijection group -> class is then equally justified, so the attacker's accuracy
    is the mean over bijections; we average ``namings`` uniformly random ones (seeded).
    Its expectation is exactly 1/C whatever the groups; a fixed rule such as "group j
    -> class j" is one draw of it, whose spread (e.g. 0.06 or 0.15 at chance 0.1) says
    nothing about the defence. What the groups *do* reveal is measured by the matched
    accuracy and ARI.
    """
    y = as_labels(true_labels, len(true_labels), "true_labels")
    g = as_labels(groups, len(y), "groups")
    if g.min() < 0 or g.max() >= n_classes:
        raise ValueError(f"groups must be ids in [0, {n_classes}); got {g.min()}..{g.max()}")
    rng = np.random.default_rng(seed)
    return float(np.mean([np.mean(rng.permutation(n_classes)[g] == y) for _ in range(namings)]))


def structural_naming_accuracy(
    pred_pseudo: ArrayLike, true_labels: ArrayLike, n_classes: int, n_pseudo: int
) -> float:
    """Tn's naming if the pseudo-classes were laid out in blocks: p -> floor(p * C / M).

    Without a secret permutation (pseudo-classes c*K .. c*K+K-1 for class c) this names
    every sample right; with it, the rule is one blind naming. A test of the permutation.
    """
    y = as_labels(true_labels, len(true_labels), "true_labels")
    p = as_labels(pred_pseudo, len(y), "pred_pseudo")
    return float(np.mean(p * n_classes // n_pseudo == y))


def group_pseudo_classes(class_vectors: ArrayLike, n_classes: int, seed: int = 0) -> np.ndarray:
    """Group M pseudo-classes into C groups from one vector per pseudo-class; returns (M,) ids.

    The vectors are e.g. the rows of Tn's last-layer weight matrix (pseudo-classes of one
    true class tend to have similar rows) or co-activation profiles. k-means with k = C on
    the L2-normalised rows; the group ids are arbitrary, exactly as the attacker's are.
    """
    v = as_float_tensor(class_vectors, "class_vectors").reshape(len(class_vectors), -1)
    if v.shape[0] < n_classes:
        raise ValueError(f"{v.shape[0]} pseudo-classes cannot form {n_classes} groups")
    x = v.double().numpy()
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return _kmeans(x, n_classes, 10, seed)


def naming_accuracy_pseudo(
    pred_pseudo: ArrayLike, true_labels: ArrayLike, grouping: ArrayLike
) -> float:
    """Naming accuracy of Tn holding pseudo-labels but not the secret mapping.

    Tn knows M and the pseudo-class ids, may group pseudo-classes (``grouping[p]`` = group
    of pseudo-class p, e.g. from :func:`group_pseudo_classes`) and, having no labels,
    names group g -> class g. Accuracy = mean(grouping[pred_pseudo] == y). Because the
    secret permutation makes the group ids independent of the class names, its
    expectation is 1/C however good the grouping is.
    """
    y = as_labels(true_labels, len(true_labels), "true_labels")
    g = as_labels(grouping, len(grouping), "grouping")
    p = as_labels(pred_pseudo, len(y), "pred_pseudo")
    if p.min() < 0 or p.max() >= len(g):
        raise ValueError(f"pred_pseudo has ids outside [0, {len(g)}); grouping is too short")
    return float(np.mean(g[p] == y))


def naming_accuracy_clear(received_labels: ArrayLike, true_labels: ArrayLike) -> float:
    """Naming accuracy of vanilla Tn, which receives the true labels in clear.

    It names each training sample by the label it received: mean(received == y), which
    is 1.0 by construction in undefended split learning.
    """
    y = as_labels(true_labels, len(true_labels), "true_labels")
    return float(np.mean(as_labels(received_labels, len(y), "received_labels") == y))
