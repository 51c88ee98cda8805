"""The learning rate of release once (issue 10): a default of its own, which an explicit lr
overrides and which a run records in its config.toml, so that a resume keeps it."""

from __future__ import annotations

import pytest

from clicooper import config as config_mod
from clicooper.config import DEFAULT_LR, PrivacyConfig, RunConfig
from clicooper.runtime.deploy.peers import config_toml
from clicooper.runtime.resume import LAUNCH_MARK, resumable_config
from clicooper.runtime.rundirs import RunDir

ONCE = ["--dataset", "digits", "--release", "once", "--head-source", "random", "--epochs", "1",
        "--train-subset", "120", "--test-subset", "60", "--no-watermark"]  # fmt: skip


def test_an_unset_lr_takes_its_release_modes_default(tmp_path):
    assert RunConfig.load().lr == DEFAULT_LR["every-epoch"] == 3e-3
    assert RunConfig.load(**{"privacy.release": "once"}).lr == DEFAULT_LR["once"] == 1e-3
    assert RunConfig(privacy=PrivacyConfig(release="once")).lr == 1e-3
    path = tmp_path / "once.toml"
    path.write_text('[privacy]\nrelease = "once"\n')
    assert RunConfig.load(path).lr == 1e-3


def test_an_explicit_lr_always_wins(tmp_path):
    assert RunConfig.load(lr=3e-3, **{"privacy.release": "once"}).lr == 3e-3
    path = tmp_path / "once.toml"
    path.write_text('lr = 0.002\n\n[privacy]\nrelease = "once"\n')
    assert RunConfig.load(path).lr == 0.002
    assert RunConfig.load(path, lr=5e-4).lr == 5e-4  # the flag over the file
    with pytest.raises(config_mod.ConfigError, match="lr"):
        RunConfig.load(lr=-1.0, **{"privacy.release": "once"})


def test_the_cli_prints_the_lr_and_config_toml_records_it(tmp_path, cli_inprocess):
    for flags, lr in (([], "0.001"), (["--lr", "0.002"], "0.002")):
        out = tmp_path / f"run-{lr}"
        code, err, _ = cli_inprocess("run", *ONCE, *flags, "--out", str(out))
        assert code == 0, err
        assert f"batch size 32, lr {lr}" in err
        assert f"\nlr = {lr}\n" in RunDir(out).config.read_text()


def test_run_resume_and_launch_resume_reuse_the_recorded_lr(tmp_path, cli_inprocess, monkeypatch):
    """A run made at the release-once default keeps that lr when the default has changed
    since: ``run --resume`` prints and uses config.toml's value, and ``launch --resume``
    reads its settings through the same :func:`resumable_config`."""
    out = tmp_path / "run"
    assert cli_inprocess("run", *ONCE, "--out", str(out))[0] == 0
    RunDir(out).results.unlink()  # an unfinished run, as if it had died at its end
    monkeypatch.setitem(DEFAULT_LR, "once", 7e-4)  # a later release with another default
    assert RunConfig.load(**{"privacy.release": "once"}).lr == 7e-4
    assert resumable_config(out).lr == 1e-3
    code, err, _ = cli_inprocess("run", "--resume", str(out))
    assert code == 0, err
    assert "lr 0.001" in err and "lr 0.0007" not in err
    assert RunConfig.load(RunDir(out).config).lr == 1e-3

    RunDir(out).results.unlink()  # the same directory as a launched run
    launched = RunConfig.load(RunDir(out).config).model_copy(update={"transport": "grpc"})
    RunDir(out).config.write_text(config_toml(launched))
    (out / LAUNCH_MARK).parent.mkdir(parents=True, exist_ok=True)
    (out / LAUNCH_MARK).write_text("")
    assert resumable_config(out, launched=True).lr == 1e-3
