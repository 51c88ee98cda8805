"""Checkpoint files and the resume protocol, in-process (fast) with injected failures."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from cc_helpers import quick_config
from conftest import WM, ledger_steps
from safetensors.torch import load_file

from clicooper.parties.data_owner import DataOwner
from clicooper.runtime import checkpoint as ckpt
from clicooper.runtime import session as session_mod
from clicooper.runtime.driver import Driver
from clicooper.runtime.session import run
from clicooper.runtime.verification import verify_run


def _trained_adam() -> tuple[torch.nn.Module, torch.optim.Adam]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.8, 0.9))
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
    return model, opt


def test_optimizer_state_round_trips_without_pickle(tmp_path):
    model, opt = _trained_adam()
    tensors, doc = ckpt.optimizer_state(opt)
    ckpt.save(tmp_path, 7, {**tensors, **ckpt.module_tensors(model, "m")}, {"optim": doc})
    path = tmp_path / "step-7.safetensors"
    assert set(load_file(str(path))) >= {"optim.state.0.exp_avg", "m.weight"}  # plain safetensors
    loaded, meta = ckpt.load(tmp_path, 7)
    fresh = torch.nn.Linear(4, 3)
    opt2 = torch.optim.Adam(fresh.parameters(), lr=0.5)
    ckpt.load_module(fresh, loaded, "m")
    ckpt.load_optimizer(opt2, loaded, meta["optim"])
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"] == b["param_groups"]  # lr 0.01 and betas (0.8, 0.9) restored
    for i, state in a["state"].items():
        for key, value in state.items():
            assert torch.equal(value, b["state"][i][key])
    # one more step from both gives the same weights
    for m, o in ((model, opt), (fresh, opt2)):
        o.zero_grad()
        m(torch.ones(2, 4)).sum().backward()
        o.step()
    assert torch.equal(model.weight, fresh.weight)


def test_checkpoints_are_atomic_pruned_and_checked(tmp_path):
    for step in (1, 2, 3, 4, 5):
        ckpt.save(tmp_path, step, {"x": torch.full((2,), float(step))}, {"n": step})
    assert ckpt.steps(tmp_path) == [3, 4, 5]  # the last KEEP
    assert [p.name for p in tmp_path.iterdir() if "tmp" in p.name] == []
    assert ckpt.load(tmp_path, 4)[1]["n"] == 4
    (tmp_path / "step-5.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ckpt.CheckpointError, match="not a clicooper checkpoint"):
        ckpt.load(tmp_path, 5)
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint for step 9"):
        ckpt.load(tmp_path, 9)


def test_common_step_is_the_last_step_everyone_has():
    assert ckpt.common_step({"t1": [5, 10, 15], "t2": [5, 10], "do": [0, 5, 10]}) == 10
    with pytest.raises(ckpt.CheckpointError, match="t2: none"):
        ckpt.common_step({"t1": [5], "t2": []})


class _InProcessRecovery:
    """Parties live in this process: reconnecting is a no-op, rollback does the work."""

    def reconnect(self) -> None:
        pass


@pytest.fixture
def recovering(monkeypatch):
    """Sessions whose driver recovers from failures in-process."""
    monkeypatch.setattr(session_mod, "Driver", functools.partial(_driver_with_recovery, Driver))


def _driver_with_recovery(cls, *args, **kwargs):
    kwargs["recovery"] = _InProcessRecovery()
    return cls(*args, **kwargs)


def _fail_once(monkeypatch, cls, name, when):
    """Make ``cls.name`` raise ConnectionError once, *after* doing its work, when ``when``."""
    real = getattr(cls, name)
    fired = []

    def flaky(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        if not fired and when(self, *args, **kwargs):
            fired.append(True)
            raise ConnectionError("injected failure")
        return out

    monkeypatch.setattr(cls, name, flaky)
    return fired


SCHEDULED = {"optimizer": "sgd", "lr": 0.05, "schedule": "cosine", "lr_per_party": {"t2": 0.1}}


@pytest.mark.parametrize("optim", [{}, SCHEDULED], ids=["adam", "sgd-cosine"])
def test_failure_mid_epoch_rolls_back_and_replays_exactly(
    tmp_path, small_digits, monkeypatch, recovering, optim
):
    """Steps 16 and 17 were applied by every trainer, then lost: replayed once, same weights
    (and the lr schedule resumes at step 15: the same learning rates)."""
    cfg = quick_config(mode="vanilla", trainers=3, checkpoint_steps=5, **optim)
    clean = run(cfg, tmp_path / "clean", data=small_digits)
    fired = _fail_once(monkeypatch, DataOwner, "train_batch", lambda self, *a: self.step == 17)
    broken = run(cfg, tmp_path / "broken", data=small_digits)
    assert fired
    rec = broken.results["transport"]["recoveries"]
    assert [(r["failed_at_step"], r["resumed_from_step"]) for r in rec] == [(17, 15)]
    assert rec[0]["steps_applied"] == {"t1": 15, "t2": 15, "t3": 15}
    assert broken.results["transport"]["steps_applied"] == {"t1": 26, "t2": 26, "t3": 26}
    for a, b in zip(clean.model.parameters(), broken.model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert broken.results["accuracy"] == clean.results["accuracy"]
    for x, y in zip((clean.owner, *clean.trainers), (broken.owner, *broken.trainers), strict=True):
        assert y.scheduler.last_epoch == 26
        assert x.optimizer.state_dict()["param_groups"] == y.optimizer.state_dict()["param_groups"]
    untimed = [[{k: v for k, v in e.items() if k != "seconds"} for e in r.results["history"]]
               for r in (broken, clean)]  # fmt: skip
    assert untimed[0] == untimed[1]
    # the rolled-back steps are counted once: the FLOPs of the model, not of the retries
    assert broken.results["compute"]["flops"] == clean.results["compute"]["flops"]


def test_failure_inside_a_stage_close_finishes_it_without_duplicate_records(
    tmp_path, small_digits, monkeypatch, recovering
):
    """t1's stage-1 record is in the ledger when the close fails: it is not appended again."""
    cfg = quick_config(trainers=2, epochs=2, batch_size=16, checkpoint_steps=10, **WM)
    fired = _fail_once(
        monkeypatch,
        DataOwner,
        "control",
        lambda self, party, op, **meta: (party, op, meta.get("stage")) == ("t1", "stage_end", 1),
    )
    session = run(cfg, tmp_path / "run", data=small_digits)
    assert fired
    rec = session.results["transport"]["recoveries"]
    assert [(r["failed_at_step"], r["resumed_from_step"]) for r in rec] == [(25, 25)]
    assert session.results["watermark"]["verified"], session.results["watermark"]["first_failure"]
    assert verify_run(tmp_path / "run").ok
    steps = ledger_steps(tmp_path / "run")
    assert steps == {"do": [25, 50], "t1": [25, 25], "t2": [25, 25]}
    verdicts = session.results["watermark"]
    assert verdicts["attestations_failed"] == 0 and verdicts["stages"] == 2
    assert json.loads((tmp_path / "run" / "results.json").read_text())["transport"]["steps"] == 50
