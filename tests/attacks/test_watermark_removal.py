"""Removal attacks on a stolen watermarked chain, on a tiny real digits clicooper run."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from clicooper.attacks.watermark_removal import Lab, copy_state, robustness
from clicooper.config import RunConfig
from clicooper.data import Split, load_dataset
from clicooper.runtime.session import Session, run
from clicooper.watermark import new_watermark_secret
from clicooper.watermark.embed import WatermarkWarning

# 400 images in batches of 16: 25-step stages (no short-stage warning); the MLP's
# marked tensors hold 8,192 and 5,120 weights, enough for 256 bits (no capacity warning).
# 6 epochs: the stolen chain scored 0.42-0.66 over six runs (fresh owner secrets); at 3
# it spread 0.29-0.61 and failed a CI run at 0.27 against the 0.3 below.
EPOCHS = 6
CONFIG = {
    "dataset": "digits",
    "model": "mlp",
    "epochs": EPOCHS,
    "batch_size": 16,
    "train_subset": 400,
    "test_subset": 200,
    "privacy.noise_multiplier": 0.1,
    "watermark.bits": 256,
    "labels.expansion": 4,  # t2 marks its 128 x 40 classifier: 20 weights a bit, no warning
}
BUDGET = {
    "fine_tune_fractions": (0.2,),
    "prune_fractions": (0.2, 0.6),
    "overwrite_factors": (1,),
    "losses": ("pseudo",),
}
PARTIES = ("t1", "t2")


@pytest.fixture(scope="module")
def marked(tmp_path_factory: pytest.TempPathFactory) -> tuple[Session, Path, RunConfig, Split]:
    """A finished watermarked run, and auxiliary images held out of the owner's training."""
    owner_data, aux = load_dataset("digits", seed=0).split_auxiliary(0.2, seed=0)
    cfg = RunConfig.load(None, **CONFIG)
    out = tmp_path_factory.mktemp("wm") / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("error", WatermarkWarning)  # the settings fit the MLP
        session = run(cfg, out, data=owner_data)
    assert session.results["watermark"]["verified"]
    return session, out, cfg, aux


@pytest.fixture(scope="module")
def lab(marked) -> Lab:
    session, out, cfg, _ = marked
    return Lab(session, out, cfg, seed=0)


@pytest.fixture(scope="module")
def rows(lab: Lab) -> list[dict]:
    before = copy_state(lab.stolen)
    rows = robustness(lab, **BUDGET)
    after = copy_state(lab.stolen)
    assert all(torch.equal(before[k], after[k]) for k in before)  # attacks work on copies
    return rows


def test_lab_loads_the_run_and_splits_the_test_images(lab: Lab, marked) -> None:
    session = marked[0]
    assert lab.parties == list(PARTIES) and sorted(lab.claimants) == list(PARTIES)
    assert lab.train_steps == EPOCHS * 25 and lab.stage_steps == 25
    test = session.dataset.test
    assert len(lab.fresh) == len(lab.held) == len(test) // 2
    # the two halves are disjoint and together the whole test split
    together = torch.cat([lab.fresh, lab.held.x]).flatten(1)
    assert len(torch.unique(together, dim=0)) == len(torch.unique(test.x.flatten(1), dim=0))
    # the stolen chain is the run's model: same outputs
    x = test.x[:16]
    with torch.no_grad():
        assert torch.allclose(lab.stolen.eval()(x), session.model.eval()(x), atol=1e-5)
    assert lab.accuracy(lab.stolen) > 0.3  # 10 classes: chance is 0.1


def test_rows_name_each_attack_with_a_claim_per_party(rows: list[dict], lab: Lab) -> None:
    assert [r["attack"] for r in rows] == [
        "none (stolen as is)",
        "fine-tune 20% (pseudo labels)",
        "prune 20% of each weight",
        "prune 60% of each weight",
        "overwrite (1x strength, pseudo labels)",
    ]
    assert [r["steps"] for r in rows] == [0, round(0.2 * lab.train_steps), 0, 0, lab.stage_steps]
    for r in rows:
        assert 0.0 <= r["accuracy"] <= 1.0
        for p in PARTIES:
            assert set(r[p]) == {"ber", "p_value", "holds"}
            assert 0.0 <= r[p]["ber"] <= 1.0 and 0.0 <= r[p]["p_value"] <= 1.0
    assert set(rows[-1]["thief_ber"]) == set(PARTIES)  # how well the thief's own marks took
    assert all(b <= 0.1 for b in rows[-1]["thief_ber"].values())


def test_claims_hold_on_the_stolen_chain_and_after_pruning(rows: list[dict]) -> None:
    stolen, prune20 = rows[0], rows[2]
    for p in PARTIES:
        assert stolen[p]["ber"] == 0.0 and stolen[p]["p_value"] < 1e-60 and stolen[p]["holds"]
        assert prune20[p]["holds"] and prune20[p]["p_value"] < 1e-6


def test_a_budget_runs_only_the_attacks_asked_for(lab: Lab) -> None:
    rows = robustness(lab, (0.1,), (), (), ("pseudo",))
    assert [r["attack"] for r in rows] == ["none (stolen as is)", "fine-tune 10% (pseudo labels)"]
    assert rows[1]["steps"] == round(0.1 * lab.train_steps)


def test_a_fresh_secret_claims_nothing(lab: Lab) -> None:
    real = lab.segments(lab.stolen)
    for p in PARTIES:
        outsider = new_watermark_secret()
        rejected = lab.claim(p, real[p], outsider)  # not the ledger's commitment
        assert not rejected.holds and "commitment" in rejected.reason
        own = lab.claim(p, real[p], outsider, own_commitment=True)  # the binomial test alone
        assert not own.holds and own.p_value > lab.cfg.watermark.claim_p_value
        assert own.ber is not None and 0.3 < own.ber < 0.7


def test_thief_with_auxiliary_images(marked) -> None:
    session, out, cfg, aux = marked
    images_only = Lab(session, out, cfg, seed=0, thief=aux.x)
    assert torch.equal(images_only.fresh, aux.x) and images_only.fresh_labels is None
    assert torch.equal(images_only.held.x, session.dataset.test.x)  # the whole test split
    with pytest.raises(ValueError, match="'true' needs thief images with labels"):
        robustness(images_only, (0.1,), (), (), ("pseudo", "true"))
    rows = robustness(images_only, (), (0.2,), (), ())
    assert [r["attack"] for r in rows] == ["none (stolen as is)", "prune 20% of each weight"]
    assert all(r[p]["holds"] for r in rows for p in PARTIES)

    labelled = Lab(session, out, cfg, seed=0, thief=aux)
    rows = robustness(labelled, (0.1,), (), (), ("true",))
    assert rows[1]["attack"] == "fine-tune 10% (true labels)"
    with pytest.raises(ValueError, match="thief images"):
        Lab(session, out, cfg, seed=0, thief=aux.x[0])
