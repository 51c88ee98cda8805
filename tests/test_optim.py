"""Optimizer, per-party learning rate and lr schedule settings (clicooper.runtime.optim)."""

from __future__ import annotations

import math

import pytest
import torch
from cc_helpers import quick_config

from clicooper.common.messages import ProtocolError
from clicooper.config import ConfigError, RunConfig
from clicooper.runtime.deploy.host import PartyHost
from clicooper.runtime.deploy.settings import check_settings, party_settings
from clicooper.runtime.optim import OptimSettings, lr_factor, make_optimizer
from clicooper.runtime.session import run

CLASSES = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


@pytest.mark.parametrize(
    "mode,name,lr",
    [("vanilla", "adam", 3e-3), ("vanilla", "adamw", 3e-3), ("vanilla", "sgd", 0.2),
     ("centralized", "sgd", 0.2)],
)  # fmt: skip
def test_each_optimizer_trains(tmp_path, small_digits, mode, name, lr):
    cfg = quick_config(mode=mode, epochs=3, optimizer=name, lr=lr)
    session = run(cfg, tmp_path / "run", data=small_digits)
    losses = [entry["loss"] for entry in session.results["history"]]
    assert losses[-1] < 0.7 * losses[0], losses
    assert session.results["config"]["optimizer"] == name
    for party in (session.owner, *session.trainers) if session.owner else ():
        assert type(party.optimizer) is CLASSES[name]
        if name == "sgd":
            assert party.optimizer.param_groups[0]["momentum"] == 0.9


def test_lr_per_party_and_step_schedule_reach_each_party(tmp_path, small_digits):
    """13 steps an epoch, 26 in all; the step schedule decays x0.5 every 10 steps."""
    cfg = quick_config(
        mode="vanilla",
        trainers=3,
        lr=1e-3,
        lr_per_party={"do": 2e-3, "t2": 5e-3},
        schedule="step",
        decay_steps=10,
        decay_gamma=0.5,
    )
    session = run(cfg, tmp_path / "run", data=small_digits)
    base = {"do": 2e-3, "t1": 1e-3, "t2": 5e-3, "t3": 1e-3}
    for party in (session.owner, *session.trainers):
        group = party.optimizer.param_groups[0]
        assert group["initial_lr"] == base[party.name]
        assert party.scheduler.last_epoch == 26
        assert group["lr"] == pytest.approx(base[party.name] * 0.25)  # two decays, at 10 and 20


def test_schedules_follow_their_formulas():
    def lrs(**settings):
        param = torch.nn.Parameter(torch.zeros(1))
        opt, sched = make_optimizer(
            [param], OptimSettings(lr=0.1, total_steps=10, **settings), "t1"
        )
        seen = []
        for _ in range(10):
            seen.append(opt.param_groups[0]["lr"])
            param.grad = torch.ones(1)
            opt.step()
            sched.step()
        return seen

    assert lrs() == [0.1] * 10
    cosine = lrs(schedule="cosine")
    assert cosine == pytest.approx([0.05 * (1 + math.cos(math.pi * k / 10)) for k in range(10)])
    assert lrs(schedule="step") == pytest.approx([0.1] * 4 + [0.01] * 4 + [0.001] * 2)  # S = 4
    warm = lrs(schedule="cosine", warmup_steps=2)
    assert warm[:2] == pytest.approx([0.05, 0.1])
    assert warm[2:] == pytest.approx([0.05 * (1 + math.cos(math.pi * k / 8)) for k in range(8)])
    with pytest.raises(ValueError, match="choose constant, cosine, step"):
        lr_factor(OptimSettings(schedule="linear"))
    with pytest.raises(ValueError, match="choose adam, adamw, sgd"):
        make_optimizer([torch.nn.Parameter(torch.zeros(1))], OptimSettings(optimizer="lion"), "do")


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--optimizer", "rmsprop"], "optimizer: Input should be 'adam', 'adamw' or 'sgd'"),
        (["--schedule", "linear"], "schedule: Input should be 'constant', 'cosine' or 'step'"),
        (["--warmup-steps", "-1"], "warmup_steps"),
    ],
)
def test_bad_optimizer_settings_are_one_line(args, needle, tmp_path, cli_inprocess):
    code, err, _ = cli_inprocess("run", "--out", str(tmp_path / "x"), *args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and needle in lines[0], err
    assert not (tmp_path / "x").exists()


def test_per_party_settings_name_parties_of_the_run():
    with pytest.raises(ConfigError, match=r"unknown party 't3' \(choose from do, t1, t2\)"):
        RunConfig.load(trainers=2, lr_per_party={"t3": 0.1})
    with pytest.raises(ConfigError, match="must be positive"):
        RunConfig.load(lr_per_party={"do": 0.0})


def test_served_trainer_builds_its_optimizer_and_schedule_from_setup(tmp_path):
    cfg = RunConfig.load(
        dataset="digits", optimizer="sgd", schedule="cosine", lr_per_party={"t2": 0.02}
    )
    host = PartyHost("trainer", "t2", cfg, tmp_path)
    meta = {"image_shape": [1, 8, 8], "n_outputs": 40, "total_steps": 8}
    trainer = host._trainer(meta, resume=False)
    assert type(trainer.optimizer) is torch.optim.SGD
    assert trainer.optimizer.param_groups[0]["lr"] == 0.02
    assert trainer.scheduler.lr_lambdas[0](4) == pytest.approx(0.5)  # half-way down the cosine
    for bad in (0, -3, "8", 2.5, None):
        with pytest.raises(ProtocolError, match="total_steps"):
            host._trainer({**meta, "total_steps": bad}, resume=False)
    other = party_settings(cfg.model_copy(update={"optimizer": "adam"}), "trainer")
    with pytest.raises(ProtocolError, match="setting optimizer differs"):
        check_settings(party_settings(cfg, "trainer"), other, "t2")
