"""An unset ``privacy.release`` takes a value by the training set's size when the run is
assembled (config.RELEASE_BY_SIZE; issue 10, point 8), and the model and lr follow it:
explicit settings win, a setting that needs the head to train keeps every-epoch,
config.toml records what was resolved and a resume reuses it."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits

from clicooper import config
from clicooper.config import (
    ONCE_TARGET_EPSILON,
    ConfigError,
    RunConfig,
    default_release,
)
from clicooper.runtime.deploy.host import PartyHost
from clicooper.runtime.deploy.peers import config_toml
from clicooper.runtime.deploy.settings import party_settings
from clicooper.runtime.resume import LAUNCH_MARK, resumable_config
from clicooper.runtime.rundirs import RunDir
from clicooper.runtime.session import resolve_run

#: A threshold under the 400 training images of :func:`_npz`: the large-data branch.
LOW_THRESHOLD = (300, "every-epoch", "once")
LARGE = 60_000
FAST = ["--epochs", "1", "--head-source", "random", "--no-watermark", "--test-subset", "100"]


def _npz(tmp_path: Path) -> Path:
    """Digits as a user's .npz (400 training, 100 test images): a dataset with no
    small-data defaults, so an unset model stays unset until the release is known."""
    bunch = load_digits()
    images = (bunch.images * (255 / 16)).astype(np.uint8)
    path = tmp_path / "mine.npz"
    np.savez(
        path,
        x_train=images[:400],
        y_train=bunch.target[:400],
        x_test=images[400:500],
        y_test=bunch.target[400:500],
    )
    return path


def _picked(cfg: RunConfig) -> tuple[str | None, str, float]:
    return cfg.privacy.release, cfg.model, cfg.lr


def test_an_unset_release_follows_the_training_set_size(tmp_path):
    large, small_release, large_release = config.RELEASE_BY_SIZE
    assert (large, small_release, large_release) == (30_000, "every-epoch", "once")
    assert default_release(1_437) == default_release(large - 1) == "every-epoch"
    assert default_release(large) == default_release(LARGE) == "once"
    cfg = RunConfig.load(dataset="fashion-mnist")
    assert cfg.privacy.release is None  # unset until the data is known
    assert _picked(cfg.for_data(large - 1)) == ("every-epoch", "cnn", 3e-3)
    big = cfg.for_data(LARGE)
    assert _picked(big) == ("once", "cnn-light", 1e-3)
    assert big.privacy.target_epsilon == ONCE_TARGET_EPSILON and big.batch_size == 128
    # resolved, it resolves nothing again, whatever the size: nor does its config.toml
    recorded = tmp_path / "config.toml"
    recorded.write_text(config_toml(big))
    assert big.for_data(10) == big and RunConfig.load(recorded).for_data(10) == big


def test_explicit_settings_win(tmp_path):
    every = RunConfig.load(dataset="fashion-mnist", **{"privacy.release": "every-epoch"})
    assert _picked(every.for_data(LARGE)) == ("every-epoch", "cnn", 3e-3)
    assert _picked(RunConfig.load(dataset="fashion-mnist", model="cnn").for_data(LARGE)) == (
        "once",
        "cnn",
        1e-3,
    )
    assert _picked(RunConfig.load(dataset="fashion-mnist", lr=0.01).for_data(LARGE)) == (
        "once",
        "cnn-light",
        0.01,
    )
    path = tmp_path / "run.toml"
    path.write_text('dataset = "fashion-mnist"\nlr = 0.002\n\n[privacy]\nrelease = "every-epoch"\n')
    assert _picked(RunConfig.load(path).for_data(LARGE)) == ("every-epoch", "cnn", 0.002)
    assert _picked(RunConfig.load(path, model="mlp", **{"privacy.release": "once"})) == (
        "once",
        "mlp",
        0.002,
    )  # the flags over the file


def test_the_model_follows_a_given_release_once():
    """``--release once`` without a model takes the owner-light preset at once; a model of
    the user's, or digits' small-data mlp, stays."""
    once = {"privacy.release": "once"}
    assert _picked(RunConfig.load(dataset="fashion-mnist", **once)) == ("once", "cnn-light", 1e-3)
    assert RunConfig.load(dataset="fashion-mnist", model="cnn", **once).model == "cnn"
    assert RunConfig.load(dataset="digits", **once).model == "mlp"
    assert RunConfig.load(dataset="fashion-mnist", model="resnet").for_data(LARGE).model == "resnet"


def test_a_setting_that_needs_the_head_to_train_keeps_every_epoch():
    """No error where the user did not ask for release once: an unset release resolves to
    every-epoch, and says why; asked for, release once still refuses the setting."""
    noisy = {"trainers": 1, "privacy.gradient_noise_multiplier": 0.5}
    one = RunConfig.load(dataset="fashion-mnist", **noisy)
    release, why = one.release_choice(LARGE)
    assert release == "every-epoch" and "gradient noise with one trainer" in why
    assert _picked(one.for_data(LARGE)) == ("every-epoch", "cnn", 3e-3)
    for mode in ("vanilla", "centralized"):
        cfg = RunConfig.load(dataset="fashion-mnist", mode=mode)
        assert _picked(cfg.for_data(LARGE)) == ("every-epoch", "cnn", 3e-3)
    with pytest.raises(ConfigError, match="no gradient leaves the trainer"):
        RunConfig.load(dataset="fashion-mnist", **noisy, **{"privacy.release": "once"})
    # below the threshold the size default is every-epoch anyway: no excuse is given
    assert one.release_choice(1_000) == (
        "every-epoch",
        "the default for 1,000 training records, below 30,000",
    )


def test_served_parties_agree_on_an_unset_release(tmp_path, small_digits, monkeypatch):
    """Trainers served by hand read the release from their own config and know no data
    size: there, and at the owner of such a run, an unset release is every-epoch."""
    monkeypatch.setattr(config, "RELEASE_BY_SIZE", LOW_THRESHOLD)
    shared = RunConfig.load(dataset="fashion-mnist")
    owner, _ = resolve_run(shared, small_digits, served=True)
    assert owner.privacy.release == "every-epoch"
    served = PartyHost("trainer", "t1", shared, tmp_path)  # what `clicooper serve` runs
    assert served.cfg.privacy.release == "every-epoch"
    assert party_settings(served.cfg, "trainer") == party_settings(owner, "trainer")
    alone, _ = resolve_run(shared, small_digits)  # in-process, or a launch, which writes
    assert _picked(alone) == ("once", "cnn-light", 1e-3)  # the parties' config itself


def test_run_prints_records_and_resumes_the_resolved_release(tmp_path, cli_inprocess, monkeypatch):
    monkeypatch.setattr(config, "RELEASE_BY_SIZE", LOW_THRESHOLD)
    data, out = _npz(tmp_path), tmp_path / "once"
    code, err, _ = cli_inprocess("run", "--dataset", str(data), *FAST, "--out", str(out))
    assert code == 0, err
    assert (
        "release once (the default for 400 training records, at least 300), model cnn-light, "
        "1 epochs, batch size 32, lr 0.001" in err
    )
    recorded = tomllib.loads(RunDir(out).config.read_text())
    assert (recorded["privacy"]["release"], recorded["model"], recorded["lr"]) == (
        "once",
        "cnn-light",
        0.001,
    )
    results = json.loads(RunDir(out).results.read_text())
    assert results["privacy"]["release"] == "once" and results["model"]["preset"] == "cnn-light"
    assert results["privacy"]["releases_per_record"]["max"] == 1

    RunDir(out).results.unlink()  # an unfinished run, as if it had died at its end
    monkeypatch.setattr(config, "RELEASE_BY_SIZE", (30_000, "every-epoch", "once"))
    assert _picked(resumable_config(out)) == ("once", "cnn-light", 1e-3)  # not every-epoch now
    code, err, _ = cli_inprocess("run", "--resume", str(out))
    assert code == 0, err
    assert "release once, model cnn-light" in err and "lr 0.001" in err
    assert json.loads(RunDir(out).results.read_text())["privacy"]["release"] == "once"

    RunDir(out).results.unlink()  # the same directory as a launched run: the same settings
    launched = RunConfig.load(RunDir(out).config).model_copy(update={"transport": "grpc"})
    RunDir(out).config.write_text(config_toml(launched))
    (out / LAUNCH_MARK).parent.mkdir(parents=True, exist_ok=True)
    (out / LAUNCH_MARK).write_text("")
    assert _picked(resumable_config(out, launched=True)) == ("once", "cnn-light", 1e-3)


def test_run_with_a_head_training_setting_says_it_keeps_every_epoch(
    tmp_path, cli_inprocess, monkeypatch
):
    monkeypatch.setattr(config, "RELEASE_BY_SIZE", LOW_THRESHOLD)
    out = tmp_path / "every"
    flags = ["--trainers", "1", "--gradient-noise", "0.5", "--model", "mlp"]
    code, err, _ = cli_inprocess(
        "run", "--dataset", str(_npz(tmp_path)), *FAST, *flags, "--out", str(out)
    )
    assert code == 0, err
    assert "release every-epoch (not the size default once: gradient noise with one trainer" in err
    assert tomllib.loads(RunDir(out).config.read_text())["privacy"]["release"] == "every-epoch"
    assert json.loads(RunDir(out).results.read_text())["privacy"]["release"] == "every-epoch"
