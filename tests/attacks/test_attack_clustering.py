"""Clustering label inference: leaks found on separable features, none on noise; naming."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import make_blobs

from clicooper.attacks.clustering import (
    blind_naming_accuracy,
    clustering_attack,
    group_pseudo_classes,
    naming_accuracy_clear,
    naming_accuracy_pseudo,
    structural_naming_accuracy,
)
from clicooper.attacks.metrics import matched_accuracy

C = 10


@pytest.fixture(scope="module")
def blobs() -> tuple[np.ndarray, np.ndarray]:
    x, y = make_blobs(n_samples=1000, n_features=16, centers=C, random_state=0)
    return x, y


@pytest.fixture(scope="module")
def noise() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.normal(size=(1000, 16)), rng.integers(0, C, 1000)


def test_separable_features_leak_labels_in_every_trial(blobs):
    r = clustering_attack(*blobs, n_classes=C, subset_size=300, seed=0)
    print("blobs", r.matched_accuracy, r.ari, r.success_rate, r.null_matched_accuracy)
    assert r.trials == 20 and len(r.trial_matched_accuracy) == 20
    assert r.matched_accuracy > 0.9 and r.ari > 0.8
    assert r.success_rate == 1.0
    assert all(p == pytest.approx(1 / 201) for p in r.p_values)  # no random clustering ties it


def test_noise_features_do_not_leak(noise):
    r = clustering_attack(*noise, n_classes=C, subset_size=300, seed=0)
    print("noise", r.matched_accuracy, r.ari, r.success_rate, r.null_matched_accuracy, r.p_values)
    # A level-0.01 test has a ~1% false-positive rate per trial: allow at most 1 of 20.
    assert r.success_rate <= 0.05
    assert all(1 / 201 <= p <= 1 for p in r.p_values)
    assert np.mean(r.p_values) > 0.25  # null p-values are roughly uniform
    assert abs(r.matched_accuracy - r.null_matched_accuracy) < 0.02
    assert abs(r.ari) < 0.02
    assert 1 / C < r.null_matched_accuracy < 0.25  # optimised assignment sits above 1/C


def test_sources_are_cycled_across_trials(blobs, noise):
    r = clustering_attack([blobs[0], noise[0]], [blobs[1], noise[1]], C, subset_size=200, seed=1)
    assert all(p < 0.01 for p in r.p_values[0::2])
    assert min(r.p_values[1::2]) > 1 / 201
    assert 0.5 <= r.success_rate <= 0.55
    shared = clustering_attack([blobs[0], blobs[0]], blobs[1], C, subset_size=200, seed=1)
    assert shared.success_rate == 1.0  # one label array serves every source


def test_reproducible_for_a_seed_and_different_across_seeds(noise):
    a = clustering_attack(*noise, n_classes=C, subset_size=200, seed=5, permutations=50)
    b = clustering_attack(*noise, n_classes=C, subset_size=200, seed=5, permutations=50)
    c = clustering_attack(*noise, n_classes=C, subset_size=200, seed=6, permutations=50)
    assert a.to_dict() == b.to_dict()
    assert a.trial_matched_accuracy != c.trial_matched_accuracy


def test_bad_arguments_are_rejected(blobs):
    with pytest.raises(ValueError, match="at least 20"):
        clustering_attack(*blobs, n_classes=C, trials=5)
    with pytest.raises(ValueError, match="pair them"):
        clustering_attack([blobs[0]] * 3, [blobs[1]] * 2, n_classes=C)
    with pytest.raises(ValueError, match="NaN"):
        clustering_attack(blobs[0] * np.nan, blobs[1], n_classes=C)


def test_pseudo_label_grouping_recovers_groups_but_not_names():
    rng = np.random.default_rng(1)
    k = 2
    # Weight rows of a classifier over M = C * K pseudo-classes: pseudo-classes of one true
    # class share a direction. pseudo id = perm[c * K + sub], perm the owner's secret.
    centres = rng.normal(size=(C, 32))
    namings = []
    for seed in range(20):
        perm = np.random.default_rng(100 + seed).permutation(C * k)
        cls_of_pseudo = np.empty(C * k, int)
        cls_of_pseudo[perm] = np.arange(C * k) // k
        rows = centres[cls_of_pseudo] + 0.05 * rng.normal(size=(C * k, 32))
        grouping = group_pseudo_classes(rows, C, seed=seed)
        assert matched_accuracy(grouping, cls_of_pseudo) == 1.0  # groups found exactly
        y = rng.integers(0, C, 500)
        pred_pseudo = perm[y * k + rng.integers(0, k, 500)]  # Tn's pseudo-labels, all correct
        namings.append(naming_accuracy_pseudo(pred_pseudo, y, grouping))
    print("pseudo naming", np.mean(namings))
    assert np.mean(namings) == pytest.approx(1 / C, abs=0.05)


def test_naming_pseudo_rejects_ids_beyond_the_grouping():
    with pytest.raises(ValueError, match="outside"):
        naming_accuracy_pseudo(np.array([0, 5]), np.array([0, 1]), np.array([0, 1]))


def test_vanilla_tn_names_received_labels_exactly():
    y = np.random.default_rng(2).integers(0, C, 100)
    assert naming_accuracy_clear(y, y) == 1.0
    assert naming_accuracy_clear((y + 1) % C, y) == 0.0


def test_blind_naming_averages_random_namings_to_chance() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, C, 2000)
    groups = (y + 3) % C  # perfect groups under ids the attacker cannot interpret
    single = [blind_naming_accuracy(groups, y, C, namings=1, seed=s) for s in range(30)]
    assert max(single) - min(single) > 0.1  # one fixed naming is a lottery draw
    assert abs(blind_naming_accuracy(groups, y, C, namings=400) - 1 / C) < 0.02
    with pytest.raises(ValueError, match="groups must be ids"):
        blind_naming_accuracy(np.full(len(y), C), y, C)


def test_structural_naming_finds_an_unpermuted_layout_only() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, C, 2000)
    k = 4
    laid_out = y * k + rng.integers(0, k, len(y))
    assert structural_naming_accuracy(laid_out, y, C, C * k) == 1.0
    permuted = rng.permutation(C * k)[laid_out]
    assert structural_naming_accuracy(permuted, y, C, C * k) < 0.2
