"""Vanilla on release once's frozen head (issue 11, point 1): ``--mode vanilla --release
once`` is release once's baseline. The same head (source, public split, pretraining, seed)
and the same chain warm start; each record's clean activation head(x) is sent to t1 once
and cached, true labels go to the last trainer, no noise, no watermark, no epsilon.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from cc_helpers import quick_config
from safetensors.torch import load_file

from clicooper.config import ONCE_TARGET_EPSILON
from clicooper.models.assembly import preset_factory
from clicooper.privacy.release import frozen_head
from clicooper.privacy.report import FROZEN_BASELINE
from clicooper.runtime import session as session_mod
from clicooper.runtime.rundirs import RunDir

#: The public head on digits, pretrained and warm-started briefly (a few seconds a run).
FROZEN = {
    "privacy.release": "once",
    "head.source": "public",
    "head.pretrain_epochs": 5,
    "chain.warm_epochs": 5,
    "train_subset": None,
    "test_subset": None,
    "watermark.enabled": False,
}


def _frozen_cfg(mode: str):
    return quick_config(mode=mode, trainers=2, epochs=2, **FROZEN)


@pytest.fixture(scope="module")
def frozen_runs(tmp_path_factory, digits):
    """A vanilla and a clicooper release-once run, same seed and head (each run once); with
    each, a copy of its frozen head as built, before any training step, and its data split
    (the training records left after the public split, the public split)."""
    root = tmp_path_factory.mktemp("frozen")
    runs = {}
    for mode in ("vanilla", "clicooper"):
        built: list = []

        def keep(cfg, data, split, built=built):
            head = frozen_head(cfg, data, split)
            built.append((copy.deepcopy(head.module.state_dict()), head.data, head.public))
            return head

        with pytest.MonkeyPatch.context() as monkeypatch:
            monkeypatch.setattr(session_mod, "frozen_head", keep)
            sess = session_mod.run(_frozen_cfg(mode), root / mode, data=digits)
        runs[mode] = (sess, root / mode, *built[0])
    return runs


def _cache(out, public: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """t1's cached rows and their record ids, from the chunk files it wrote."""
    directory = RunDir(out).party("t1") / "releases"
    directory = directory / "public" if public else directory
    chunks = [load_file(str(p)) for p in sorted(directory.glob("chunk-*.safetensors"))]
    assert chunks, f"no release chunks under {directory}"
    return torch.cat([c["ids"] for c in chunks]), torch.cat([c["x"] for c in chunks])


def test_vanilla_on_the_frozen_head_trains_and_reports_no_epsilon(frozen_runs, digits):
    sess = frozen_runs["vanilla"][0]
    r = sess.results
    assert r["mode"] == "vanilla"
    assert r["privacy"]["epsilon"] is None and r["privacy"]["covers"] is None
    assert r["privacy"]["baseline"] == FROZEN_BASELINE
    assert r["privacy"]["release"] == "once" and r["privacy"]["noise_multiplier"] == 0.0
    assert r["privacy"]["releases_per_record"] == {"min": 1, "max": 1, "records": 1198}
    assert r["labels"]["pseudo_classes"] == 10  # true labels, no obfuscation
    assert r["watermark"] == {"enabled": False}
    history = r["history"]
    assert [h.get("phase") for h in history] == ["public"] * 5 + [None] * 2
    lines = RunDir(frozen_runs["vanilla"][1]).history.read_text().splitlines()
    assert len(lines) == 7 and all(json.loads(line)["epsilon"] is None for line in lines)
    assert r["accuracy"]["test"] > 0.3  # it trained: chance is 0.1
    assert history[-1]["loss"] < history[0]["loss"]
    start = preset_factory(_frozen_cfg("vanilla"), digits)(10).segments
    for begun, segment in zip(start, sess.trainers, strict=True):
        moved = [
            not torch.equal(a, b)
            for a, b in zip(
                begun.state_dict().values(), segment.segment.state_dict().values(), strict=True
            )
        ]
        assert any(moved), f"{segment.name} did not train"
    assert not (RunDir(frozen_runs["vanilla"][1]).owner / "owner.secret").exists()
    clicooper = frozen_runs["clicooper"][0].results["privacy"]
    assert clicooper["epsilon"] == pytest.approx(ONCE_TARGET_EPSILON, abs=0.01)
    assert "baseline" not in clicooper


def test_its_head_is_the_frozen_head_bitwise_and_the_same_as_release_once(frozen_runs):
    before = frozen_runs["vanilla"][2]
    for mode in ("vanilla", "clicooper"):
        built = frozen_runs[mode][2]
        after = load_file(str(RunDir(frozen_runs[mode][1]).owner / "head.safetensors"))
        assert after.keys() == before.keys() == built.keys()
        for name, value in before.items():
            assert torch.equal(built[name], value), f"{mode}: another head {name} was built"
            assert torch.equal(after[name], value), f"{mode}: head {name} changed"


def test_t1_caches_the_clean_activations_head_of_x(frozen_runs):
    sess, out, _, kept, public = frozen_runs["vanilla"]
    head = sess.owner.head  # the frozen head (bitwise as built: the test above)
    with torch.no_grad():
        for split, is_public in ((kept.train, False), (public, True)):
            ids, x = _cache(out, public=is_public)
            assert torch.equal(ids.sort().values, torch.arange(len(split)))
            assert torch.equal(x, head(split.x[ids]))
        ids, noisy = _cache(frozen_runs["clicooper"][1])  # release once's are noised
        assert not torch.allclose(noisy, head(kept.train.x[ids]), atol=1e-3)


def test_cli_runs_the_vanilla_baseline_on_the_frozen_head(tmp_path, cli_inprocess):
    flags = ["--dataset", "digits", "--mode", "vanilla", "--release", "once", "--epochs", "1"]
    flags += ["--train-subset", "300", "--test-subset", "100", "--warm-epochs", "1"]
    code, err, out = cli_inprocess("run", *flags, "--out", str(tmp_path / "run"))
    assert code == 0, err
    printed = out + err
    assert "none: vanilla baseline on the frozen head" in printed
    assert "epsilon (delta)" in printed and "trust anchor" not in printed
