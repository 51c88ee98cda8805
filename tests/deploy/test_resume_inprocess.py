"""`clicooper run --resume DIR`: an in-process run whose process died continues from its
last checkpoint (clicooper.runtime.resume)."""

from __future__ import annotations

import json
import subprocess
import time

import pytest
import torch
from cc_helpers import quick_config
from conftest import WM, cli, env, ledger_steps
from safetensors.torch import load_file

from clicooper.parties.data_owner import DataOwner
from clicooper.parties.watermarking import OwnerChain
from clicooper.runtime.session import run
from clicooper.runtime.verification import verify_run


class Killed(BaseException):
    """Stands for the process dying: nothing in the run catches it."""


def _die_once(monkeypatch, cls, name, when):
    """``cls.name`` raises Killed once, after doing its work, when ``when`` holds."""
    real = getattr(cls, name)

    def dying(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        if when(self, *args, **kwargs):
            monkeypatch.setattr(cls, name, real)
            raise Killed
        return out

    monkeypatch.setattr(cls, name, dying)


def _untimed(history):
    return [{k: v for k, v in e.items() if k != "seconds"} for e in history]


def test_kill_9_then_resume_equals_an_uninterrupted_run(tmp_path, cli_inprocess):
    """The CLI killed with SIGKILL after its first epoch; --resume finishes it with the
    same weights, history, epsilon and step counts as one uninterrupted run with the
    same owner secret (clicooper mode; no watermark, whose trainer secrets are fresh)."""
    out = tmp_path / "run"
    args = ["--dataset", "digits", "--mode", "clicooper", "--no-watermark", "--epochs", "4",
            "--train-subset", "400", "--test-subset", "200"]  # fmt: skip
    proc = subprocess.Popen(cli("run", *args, "--out", str(out)), env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    history = out / "history.jsonl"
    deadline = time.monotonic() + 120
    while not (history.is_file() and history.read_text().count("\n") >= 1):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended too early"
        time.sleep(0.02)
    proc.kill()  # SIGKILL: no handler runs
    proc.wait()
    assert not (out / "results.json").exists(), "the run finished before it was killed"
    code, err, _ = cli_inprocess("run", "--resume", str(out))
    assert code == 0, err
    resumed = json.loads((out / "results.json").read_text())
    cfg = quick_config(mode="clicooper", epochs=4, train_subset=400, test_subset=200,
                       batch_size=None, owner_secret=out / "owner" / "owner.secret",
                       **{"watermark.enabled": False})  # fmt: skip
    clean = run(cfg, tmp_path / "clean")
    (recovery,) = resumed["transport"]["recoveries"]
    assert recovery["resumed_from_step"] % 13 == 0 and recovery["resumed_from_step"] >= 13
    assert resumed["transport"]["steps"] == clean.results["transport"]["steps"] == 4 * 13
    assert resumed["transport"]["steps_applied"] == {"t1": 52, "t2": 52}  # none twice
    assert resumed["accuracy"] == clean.results["accuracy"]
    assert _untimed(resumed["history"]) == _untimed(clean.results["history"])
    assert resumed["privacy"]["releases"] == 4
    assert resumed["privacy"]["epsilon"] == clean.results["privacy"]["epsilon"]
    lines = [json.loads(line) for line in history.read_text().splitlines()]
    assert [e["epoch"] for e in lines] == list(range(1, 5))  # no epoch listed twice
    state = clean.model.state_dict()
    on_disk = {f"0.{k}": v for k, v in load_file(out / "owner" / "head.safetensors").items()}
    for i in (1, 2):
        seg = load_file(out / "segments" / f"t{i}.safetensors")
        on_disk.update({f"{i}.{k}": v for k, v in seg.items()})
    assert on_disk.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(value, on_disk[key]), key


@pytest.mark.parametrize(
    "where",
    ["mid-epoch", "stage-close"],
)
def test_resume_with_the_watermark_chain_verifies_and_counts_once(
    tmp_path, small_digits, monkeypatch, where
):
    """Died after step 20 (mid epoch 2), or inside stage 1's close once t1's record was in
    the ledger: the resumed run closes every stage once, and the ledger verifies."""
    cfg = quick_config(trainers=2, epochs=3, batch_size=32, **WM)  # 13 steps an epoch
    if where == "mid-epoch":
        _die_once(monkeypatch, DataOwner, "train_batch", lambda self, *a: self.step == 20)
        resumed_from = 13  # the checkpoint before epoch 1's close
    else:
        _die_once(monkeypatch, OwnerChain, "_end", lambda self, name: name == "t1")
        resumed_from = 13
    out = tmp_path / "run"
    with pytest.raises(Killed):
        run(cfg, out, data=small_digits)
    assert not (out / "results.json").exists()
    session = run(cfg, out, data=small_digits, resume=True)
    (recovery,) = session.results["transport"]["recoveries"]
    assert recovery["resumed_from_step"] == resumed_from
    assert session.results["transport"]["steps_applied"] == {"t1": 39, "t2": 39}
    assert ledger_steps(out) == {"do": [13, 26, 39], "t1": [13, 13, 13], "t2": [13, 13, 13]}
    wm = session.results["watermark"]
    assert wm["verified"], wm["first_failure"]
    assert wm["stages"] == 3 and wm["attestations_failed"] == 0
    assert verify_run(out).ok
    assert session.results["privacy"]["releases"] == 3
    assert [e["epoch"] for e in session.results["history"]] == [1, 2, 3]


def test_resume_refuses_what_it_cannot_continue(tmp_path, small_digits, cli_inprocess):
    finished = tmp_path / "finished"
    run(quick_config(mode="vanilla", epochs=1), finished, data=small_digits)
    (tmp_path / "empty").mkdir()
    central = tmp_path / "central"
    run(quick_config(mode="centralized", epochs=1), central, data=small_digits)
    (central / "results.json").unlink()  # as if it had died
    cases = [
        (finished, "holds a finished run (results.json): nothing to resume"),
        (tmp_path / "empty", "is not a run directory that can be resumed"),
        (tmp_path / "missing", "is not a run directory: nothing to resume"),
        (central, "only split runs can be resumed (this one is centralized)"),
    ]
    for target, needle in cases:
        code, err, _ = cli_inprocess("run", "--resume", str(target))
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and needle in lines[0], err
    code, err, _ = cli_inprocess("run", "--resume", str(finished), "--epochs", "3")
    assert code == 2 and "leave out --epochs" in err
    with pytest.raises(ValueError, match="finished run"):
        run(quick_config(), finished, data=small_digits, resume=True)
