"""The adapters on real tiny runs: keys, naming accuracy, shadow-head reuse."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from clicooper.attacks import extract_surrogate
from clicooper.attacks.extraction import train_shadow_head
from clicooper.config import RunConfig
from clicooper.data import Dataset
from clicooper.evaluation import adapters
from clicooper.evaluation.settings import QUICK
from clicooper.evaluation.truth import row_labels, row_sample_ids
from clicooper.evaluation.views import make_aux, view_of
from clicooper.models.assembly import preset_factory
from clicooper.runtime.session import Session, run

SETTINGS = replace(QUICK, cluster_subset=100, permutations=50)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, digits: Dataset) -> dict[str, Session]:
    torch.set_num_threads(1)
    data = digits.limit(400, 100, seed=0)
    tmp = tmp_path_factory.mktemp("runs")
    out = {}
    for mode in ("vanilla", "clicooper"):
        cfg = RunConfig.load(None, mode=mode, model="mlp", epochs=3, batch_size=32, record=128)
        cfg.watermark.enabled = False
        out[mode] = run(cfg, tmp / mode, data=data)
    return out


def _labels(session: Session, view) -> np.ndarray:
    log = session.owner.log
    ids = row_sample_ids(view, log.steps, log.sample_ids, 1)
    return row_labels(ids, session.dataset.train.y)


@pytest.mark.parametrize("mode", ["vanilla", "clicooper"])
def test_clustering_reports_both_sources_and_the_stronger(runs, mode: str) -> None:
    session = runs[mode]
    view = view_of(session.trainers[0])
    out = adapters.clustering(view, _labels(session, view), 10, mode == "vanilla", SETTINGS)
    assert out["source"] in ("activations", "gradients")
    best = out[out["source"]]
    assert out["success_rate"] == best["success_rate"]
    assert out["matched_accuracy"] == best["matched_accuracy"]
    other = out["gradients" if out["source"] == "activations" else "activations"]
    assert (best["success_rate"], best["matched_accuracy"]) >= (
        other["success_rate"],
        other["matched_accuracy"],
    )
    assert best["trials"] == 20


def test_naming_vanilla_last_trainer_reads_labels_in_clear(runs) -> None:
    session = runs["vanilla"]
    view = view_of(session.trainers[-1])
    named = adapters.naming_accuracy(view, _labels(session, view), 10, True, 0)
    assert named == {"naming_accuracy": 1.0}


def test_naming_clicooper_last_trainer_is_at_chance_and_the_layout_is_hidden(runs) -> None:
    """Grouped pseudo-classes cannot be named without the secret permutation; the block
    layout p -> p // K, which names everything when the permutation is missing, fails."""
    session = runs["clicooper"]
    view = view_of(session.trainers[-1])
    named = adapters.naming_accuracy(view, _labels(session, view), 10, False, 0)
    assert abs(named["naming_accuracy"] - 0.1) < 0.03
    assert named["naming_structural"] < 0.3


def test_naming_of_unlabelled_clusters_is_blind(runs) -> None:
    """Vanilla T1's clusters follow the classes (matched accuracy high), yet it names them
    no better than chance: nothing it holds says which cluster is which class."""
    session = runs["vanilla"]
    view = view_of(session.trainers[0])
    named = adapters.naming_accuracy(view, _labels(session, view), 10, False, 0)
    assert set(named) == {"naming_accuracy"}
    assert abs(named["naming_accuracy"] - 0.1) < 0.03


def test_shadow_head_reuse_equals_retraining(runs) -> None:
    session = runs["vanilla"]
    views = [view_of(t) for t in session.trainers]
    factory = preset_factory(RunConfig.load(None, model="mlp"), session.dataset)
    head_factory = lambda: factory(10).head  # noqa: E731
    aux = session.dataset.test.x[:60]
    observed = views[0].rows("activation", views[0].epochs[-1])
    args = (adapters.stolen(views), head_factory, aux, observed)
    test = (session.dataset.test.x[60:], session.dataset.test.y[60:].numpy(), 10)
    fresh = extract_surrogate(*args, *test, pseudo_to_class=np.arange(10), epochs=2, seed=3)
    shadow = train_shadow_head(head_factory, aux, observed, 2, 3)
    reused = extract_surrogate(
        *args, *test, pseudo_to_class=np.arange(10), epochs=2, seed=3, shadow_head=shadow
    )
    assert fresh == reused


def test_aux_labelled_gives_m_per_class(digits: Dataset) -> None:
    aux = make_aux(digits.train.subset(torch.arange(400)), 10)
    x, y = aux.labelled(5)
    assert len(x) == 50 and np.bincount(y, minlength=10).tolist() == [5] * 10
    assert aux.max_m() >= 5
