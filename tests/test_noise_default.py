"""An unset ``privacy.noise_multiplier`` takes a value by the training set's size when the
run is assembled (config.NOISE_BY_SIZE): config.toml records it, a resume reuses it, an
explicit value wins, and served parties are not asked to know it."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from cc_helpers import quick_config

from clicooper import config
from clicooper.config import (
    ONCE_TARGET_EPSILON,
    PrivacyConfig,
    RunConfig,
    default_noise_multiplier,
)
from clicooper.parties.data_owner import DataOwner
from clicooper.runtime.deploy.settings import party_settings
from clicooper.runtime.session import run

#: A threshold under the 400 training samples of ``small_digits``: the large-data branch.
LOW_THRESHOLD = (300, 0.1, 0.2)


class Killed(BaseException):
    """Stands for the process dying: nothing in the run catches it."""


def _recorded(out: Path) -> float:
    return tomllib.loads((out / "config.toml").read_text())["privacy"]["noise_multiplier"]


def test_default_noise_depends_on_the_training_set_size():
    large, small_noise, large_noise = config.NOISE_BY_SIZE
    assert (small_noise, large_noise) == (0.1, 0.2)
    assert default_noise_multiplier(1_437) == default_noise_multiplier(large - 1) == 0.1
    assert default_noise_multiplier(large) == default_noise_multiplier(60_000) == 0.2
    assert RunConfig().privacy.noise_multiplier is None  # unset until the data is known
    assert RunConfig().privacy.for_data(60_000).noise_multiplier == 0.2


def test_unset_noise_is_resolved_recorded_and_applied(tmp_path, small_digits, monkeypatch):
    small = run(quick_config(epochs=1), tmp_path / "small", data=small_digits)
    assert _recorded(tmp_path / "small") == 0.1
    assert small.owner.noise.noise_multiplier == small.results["privacy"]["noise_multiplier"]
    assert small.owner.noise.noise_multiplier == 0.1
    monkeypatch.setattr(config, "NOISE_BY_SIZE", LOW_THRESHOLD)  # 400 samples count as large
    large = run(quick_config(epochs=1), tmp_path / "large", data=small_digits)
    assert _recorded(tmp_path / "large") == 0.2
    assert large.owner.noise.noise_multiplier == large.results["privacy"]["noise_multiplier"]
    assert large.owner.noise.noise_multiplier == 0.2
    assert large.results["privacy"]["epsilon"] < small.results["privacy"]["epsilon"]


def test_an_explicit_noise_wins(tmp_path, small_digits, monkeypatch):
    monkeypatch.setattr(config, "NOISE_BY_SIZE", LOW_THRESHOLD)
    for noise in (0.05, 0.0):  # 0 (no noise) is a value, not "unset"
        out = tmp_path / f"n{noise}"
        cfg = quick_config(epochs=1, **{"privacy.noise_multiplier": noise})
        session = run(cfg, out, data=small_digits)
        assert _recorded(out) == noise and session.owner.noise.noise_multiplier == noise


def test_resume_reuses_the_recorded_noise(tmp_path, small_digits, monkeypatch):
    monkeypatch.setattr(config, "NOISE_BY_SIZE", LOW_THRESHOLD)
    real = DataOwner.train_batch

    def dying(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        if self.step == 20:  # in epoch 2 (13 steps an epoch), after epoch 1's checkpoint
            monkeypatch.setattr(DataOwner, "train_batch", real)
            raise Killed
        return out

    monkeypatch.setattr(DataOwner, "train_batch", dying)
    out = tmp_path / "run"
    with pytest.raises(Killed):
        run(quick_config(epochs=2), out, data=small_digits)
    assert _recorded(out) == 0.2 and not (out / "results.json").exists()
    # A fresh resolution would now give 0.1: the resume must keep the run's 0.2.
    monkeypatch.setattr(config, "NOISE_BY_SIZE", (30_000, 0.1, 0.2))
    session = run(quick_config(epochs=2), out, data=small_digits, resume=True)
    assert session.results["transport"]["recoveries"]  # it did resume
    assert session.owner.noise.noise_multiplier == 0.2
    assert session.results["privacy"]["noise_multiplier"] == 0.2 and _recorded(out) == 0.2


def test_served_parties_share_no_noise_setting():
    """A trainer started with the owner's config file (noise unset) agrees with the owner's
    resolved config: the noise is the owner's alone, so it is not compared."""
    unset = quick_config()
    resolved = unset.model_copy(update={"privacy": unset.privacy.for_data(60_000)})
    for role in ("trainer", "verifier"):
        assert party_settings(unset, role) == party_settings(resolved, role)
    other_clip = quick_config(**{"privacy.clip_norm": 2.0})
    assert party_settings(other_clip, "trainer") != party_settings(unset, "trainer")


def test_release_once_without_a_noise_setting_aims_at_the_default_epsilon():
    once = PrivacyConfig(release="once")
    assert once.for_data(1000).target_epsilon == ONCE_TARGET_EPSILON == 2.0
    # Any noise setting of the user's keeps its meaning.
    assert PrivacyConfig(release="once", noise_multiplier=0.5).for_data(1000).target_epsilon is None
    assert PrivacyConfig(release="once", target_epsilon=3.0).for_data(1000).target_epsilon == 3.0
    assert PrivacyConfig().for_data(1000).target_epsilon is None


def test_a_release_once_run_with_no_noise_flag_spends_the_default_epsilon(tmp_path, small_digits):
    cfg = quick_config(epochs=1, **{"privacy.release": "once", "head.source": "random"})
    session = run(cfg, tmp_path / "once", data=small_digits)
    privacy = session.results["privacy"]
    assert privacy["release"] == "once"
    assert 0.95 * ONCE_TARGET_EPSILON < privacy["epsilon"] <= ONCE_TARGET_EPSILON
    recorded = tomllib.loads((tmp_path / "once" / "config.toml").read_text())["privacy"]
    assert recorded["target_epsilon"] == ONCE_TARGET_EPSILON
