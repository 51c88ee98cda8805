"""`launch` resolves an unset release (config.RELEASE_BY_SIZE) before it writes the
parties' config file: every trainer process builds the release-once model the owner
resolved (cnn-light) and t1 caches the one release per record."""

from __future__ import annotations

import tomllib

from clicooper import config
from clicooper.config import RunConfig
from clicooper.data import Dataset
from clicooper.runtime.deploy.launcher import launch
from clicooper.runtime.rundirs import RunDir


def test_launch_resolves_the_default_release_for_every_process(tmp_path, digits, monkeypatch):
    monkeypatch.setattr(config, "RELEASE_BY_SIZE", (300, "every-epoch", "once"))  # 400: large
    small = digits.limit(400, 100, seed=0)
    data = Dataset("my-digits", small.train, small.test, 10)  # no small-data model default
    settings = {"head.source": "random", "watermark.enabled": False}
    cfg = RunConfig.load(None, dataset="my-digits", epochs=1, batch_size=32, **settings)
    assert cfg.privacy.release is None
    session = launch(cfg, tmp_path / "run", data=data, send_timeout=10)
    shared = tomllib.loads((RunDir(tmp_path / "run").deploy / "config.toml").read_text())
    assert (shared["privacy"]["release"], shared["model"], shared["lr"]) == (
        "once",
        "cnn-light",
        0.001,
    )
    r = session.results
    assert r["transport"]["name"] == "grpc" and r["privacy"]["release"] == "once"
    assert r["model"]["preset"] == "cnn-light" and r["privacy"]["releases_per_record"]["max"] == 1
    assert (tmp_path / "run" / "parties" / "t1" / "releases").is_dir()
