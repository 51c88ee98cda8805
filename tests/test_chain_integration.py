"""The watermark chain on real training runs: honest, malicious trainers, tampering."""

import shutil
import sqlite3

import pytest
import torch
from cc_helpers import quick_config

from clicooper.parties import watermarking
from clicooper.runtime.session import run
from clicooper.runtime.verification import verify_run
from clicooper.watermark import load_segment, save_segment
from clicooper.watermark.embed import WatermarkWarning

WM = {"watermark.strength": 0.01, "privacy.noise_multiplier": 0.1, "labels.mode": "keyed"}


def _run(tmp_path, name, data, **extra):
    cfg = quick_config(**{"trainers": 3, "epochs": 3, "batch_size": 16, **WM, **extra})
    return run(cfg, tmp_path / name, data=data)


@pytest.fixture(scope="module")
def honest(tmp_path_factory, digits):
    root = tmp_path_factory.mktemp("honest")
    session = _run(root, "run", digits.limit(400, 200, seed=0))
    return root / "run", session


@pytest.fixture
def copy(honest, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(honest[0], target)
    return target


def test_honest_run_verifies_with_one_stage_per_epoch(honest, cli_inprocess):
    run_dir, session = honest
    wm = session.results["watermark"]
    assert wm["verified"] and wm["stages"] == 3 and wm["attestations_failed"] == 0
    assert all(ber <= 0.05 for ber in wm["final_ber"].values())
    sealed = wm["sealed_bits"]  # one count per trainer and stage
    assert sorted(sealed) == ["t1", "t2", "t3"] and all(len(n) == 3 for n in sealed.values())
    code, err, out = cli_inprocess("verify", str(run_dir))
    assert code == 0, err
    assert "chain holds: 21 records" in err + out  # 3 stages x (do + 3 x (trainer + attest))
    assert "UNANCHORED" in err.strip().splitlines()[-1]
    anchor = (run_dir / "verifier" / "anchor.txt").read_text()
    assert wm["anchor"] in anchor and wm["anchored"] and wm["bers_checked"]
    code, err, _ = cli_inprocess("verify", str(run_dir), "--anchor", wm["anchor"])
    assert code == 0, err
    assert err.strip().splitlines()[-1].endswith(f"anchored to verifier key {wm['anchor']}")


def test_stage_steps_setting_makes_more_stages(tmp_path, small_digits):
    with pytest.warns(WatermarkWarning, match="stages of 20 steps are shorter than the 25"):
        session = _run(
            tmp_path,
            "r",
            small_digits,
            epochs=2,
            **{"watermark.stage_steps": 20, "watermark.schedule": "always"},
        )
    assert session.results["watermark"]["first_failure"] is None
    # 50 steps in stages of 20: the 10-step remainder joins the last stage (20 + 30)
    assert session.results["watermark"]["stages"] == 2
    assert session.results["watermark"]["verified"]


def test_trainer_that_skips_a_stage_is_caught(tmp_path, small_digits, monkeypatch):
    real_end = watermarking.TrainerChain.commit
    kept = {}

    def lazy_end(self, msg):
        stage = int(msg.meta["stage"])
        if self.trainer.name == "t2":
            if stage == 1:
                kept.update({k: v.clone() for k, v in self.trainer.segment.state_dict().items()})
            if stage == 2:  # did no work in stage 2: hands in its stage-1 weights
                self.trainer.segment.load_state_dict(kept)
        return real_end(self, msg)

    monkeypatch.setattr(watermarking.TrainerChain, "commit", lazy_end)
    session = _run(tmp_path, "r", small_digits)
    assert not session.results["watermark"]["verified"]
    report = verify_run(tmp_path / "r")
    assert "stage 2, t2" in report.first_failure and "BER" in report.first_failure


def test_trainer_that_swaps_in_other_weights_is_caught(tmp_path, small_digits, monkeypatch):
    real_end = watermarking.TrainerChain.commit

    def swap_end(self, msg):
        if self.trainer.name == "t1" and int(msg.meta["stage"]) == 3:
            for p in self.trainer.segment.parameters():  # weights trained elsewhere
                torch.nn.init.normal_(p.data, std=0.05)
        return real_end(self, msg)

    monkeypatch.setattr(watermarking.TrainerChain, "commit", swap_end)
    _run(tmp_path, "r", small_digits)
    report = verify_run(tmp_path / "r")
    assert not report.ok and "stage 3, t1" in report.first_failure
    swapped = [line for line in report.lines if line.party == "t1" and line.stage == 3][0]
    assert 0.3 < swapped.ber < 0.7


def test_tampered_audit_copy_is_caught(copy):
    path = copy / "audit" / "2" / "t3.safetensors"
    state = load_segment(path)
    name = next(iter(state))
    state[name] = state[name] + 1e-3
    save_segment(path, state)
    report = verify_run(copy)
    assert not report.ok and "stage 2, t3" in report.first_failure


def test_substituted_final_segment_is_caught(copy):
    shutil.copy(copy / "audit" / "1" / "t1.safetensors", copy / "segments" / "t1.safetensors")
    report = verify_run(copy)
    assert not report.ok and "t1" in report.first_failure


def test_changed_record_in_the_ledger_is_caught(copy):
    conn = sqlite3.connect(copy / "ledger.sqlite")
    conn.execute("DROP TRIGGER IF EXISTS records_no_update")
    for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type='trigger'").fetchall():
        conn.execute(f"DROP TRIGGER {name}")
    blob = conn.execute("SELECT canonical FROM records WHERE seq = 4").fetchone()[0]
    conn.execute(
        "UPDATE records SET canonical = ? WHERE seq = 4",
        (blob.replace(b'"stage":1', b'"stage":2'),),
    )
    conn.commit()
    conn.close()
    report = verify_run(copy)
    assert not report.ok and "record 4" in report.first_failure


def test_truncated_ledger_is_caught(copy):
    conn = sqlite3.connect(copy / "ledger.sqlite")
    for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type='trigger'").fetchall():
        conn.execute(f"DROP TRIGGER {name}")
    conn.execute("DELETE FROM records WHERE seq > 9")
    conn.commit()
    conn.close()
    assert not verify_run(copy).ok


@pytest.mark.parametrize("junk", [b"", b"\x00" * 100, b"SQLite format 3\x00" + b"\x01" * 200])
def test_not_a_ledger_is_one_line(copy, junk, cli_inprocess):
    (copy / "ledger.sqlite").write_bytes(junk)
    code, err, _ = cli_inprocess("verify", str(copy))
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: chain does not hold")


def test_claims_by_the_owner_hold_and_others_fail(honest, tmp_path, cli_inprocess):
    run_dir, _ = honest
    seg = str(run_dir / "segments" / "t2.safetensors")
    anchor = ("--anchor", str(run_dir / "verifier" / "anchor.txt"))
    code, err, _ = cli_inprocess("claim", str(run_dir), "--party", "t2", "--segment", seg, *anchor)
    assert code == 0 and "the claim holds" in err
    # t1's secret on t2's segment (wrong owner): no claim
    other = tmp_path / "t1-secret"
    other.write_bytes((run_dir / "parties" / "t1" / "watermark.secret").read_bytes())
    code, err, _ = cli_inprocess(
        "claim", str(run_dir), "--party", "t2", "--segment", seg, "--secret", str(other), *anchor
    )
    assert code == 1 and "does not match the commitment" in err
    # an outsider with its own secret has no commitment in the ledger
    outsider = tmp_path / "outsider"
    outsider.write_bytes(torch.randint(0, 256, (32,), dtype=torch.uint8).numpy().tobytes())
    code, _, _ = cli_inprocess(
        "claim", str(run_dir), "--party", "t2", "--segment", seg, "--secret", str(outsider), *anchor
    )
    assert code == 1
    # the right secret against an unrelated segment of the same shape
    fresh = {k: torch.randn_like(v) * 0.1 for k, v in load_segment(seg).items()}
    save_segment(tmp_path / "fresh.safetensors", fresh)
    code, err, _ = cli_inprocess(
        "claim",
        str(run_dir),
        "--party",
        "t2",
        "--segment",
        str(tmp_path / "fresh.safetensors"),
        *anchor,
    )
    assert code == 1 and "does not hold" in err


def test_claim_and_verify_bad_input(tmp_path, honest, cli_inprocess):
    code, err, _ = cli_inprocess("verify", str(tmp_path / "nothing"))
    assert code == 2 and "no ledger.sqlite" in err
    code, err, _ = cli_inprocess(
        "claim",
        str(honest[0]),
        "--party",
        "t9",
        "--segment",
        str(honest[0] / "segments" / "t1.safetensors"),
        "--anchor",
        str(honest[0] / "verifier" / "anchor.txt"),
    )
    assert code == 2 and "secret" in err


def test_the_ledger_records_its_bits_for_verify_and_claim(tmp_path, small_digits, cli_inprocess):
    session = _run(tmp_path, "r", small_digits, epochs=2, **{"watermark.bits": 64})
    assert session.results["watermark"]["verified"]
    run_dir = tmp_path / "r"
    code, err, out = cli_inprocess("verify", str(run_dir))  # no --bits: the ledger's 64
    assert code == 0, err
    code, err, _ = cli_inprocess("verify", str(run_dir), "--bits", "256")
    assert code == 1 and "bits_hash is not the hash" in err
    segment = str(run_dir / "segments" / "t2.safetensors")
    anchor = str(run_dir / "verifier" / "anchor.txt")
    code, err, out = cli_inprocess(
        "claim", str(run_dir), "--party", "t2", "--segment", segment, "--anchor", anchor
    )
    assert code == 0 and "matching bits 64/64" in err + out
    code, err, _ = cli_inprocess(  # B is signed: a claimant cannot choose another
        "claim",
        str(run_dir),
        "--party",
        "t2",
        "--segment",
        segment,
        "--anchor",
        anchor,
        "--bits",
        "32",
    )
    assert code == 2 and "not the ledger's signed B = 64" in err


def test_small_marked_tensor_warns_once_per_trainer(tmp_path, small_digits):
    with pytest.warns(WatermarkWarning) as caught:
        # the notes come at set-up, whatever the schedule: a few steps, and no seal (which
        # spends 30 CPU s fitting 1024 bits into these tensors at the stage's end)
        tiny = small_digits.limit(64, 32, seed=0)
        unsealed = {"watermark.schedule": "always", "watermark.seal": False}
        _run(tmp_path, "r", tiny, epochs=1, **{"watermark.bits": 1024, **unsealed})
    notes = [str(w.message) for w in caught if "marks a tensor" in str(w.message)]
    # t1 marks 8,192 weights, t2 16,384 (16 a bit: enough), t3 2,560 (K = 2)
    assert [n.split()[0] for n in notes] == ["t1", "t3"]
    assert all("1024 bits" in n for n in notes)


def test_watermark_term_is_computed_once_a_step_whatever_the_micro_batches(
    tmp_path, small_digits, monkeypatch
):
    from clicooper.watermark.embed import StageWatermark

    calls = []
    real = StageWatermark.regulariser

    def counted(self, module):
        calls.append(self.param_name)
        return real(self, module)

    monkeypatch.setattr(StageWatermark, "regulariser", counted)
    session = _run(
        tmp_path, "r", small_digits, epochs=1, micro_batches=4, **{"watermark.schedule": "always"}
    )
    steps = session.results["transport"]["steps"]
    assert steps > 0 and len(calls) == 3 * steps  # 3 trainers, one term a step each
    assert session.results["watermark"]["verified"]


def test_seal_schedule_leaves_the_regulariser_off_and_every_stage_verifies(
    tmp_path, small_digits, monkeypatch
):
    """The default schedule: no regulariser term during training, the seal places every
    stage's bits, and the ledger verifies offline with BER 0 at each stage."""
    from clicooper.watermark.embed import StageWatermark

    calls = []
    real = StageWatermark.regulariser
    monkeypatch.setattr(
        StageWatermark, "regulariser", lambda self, module: calls.append(1) or real(self, module)
    )
    session = _run(tmp_path, "r", small_digits, epochs=2, **{"watermark.schedule": "seal"})
    wm = session.results["watermark"]
    assert calls == []
    assert wm["stages"] == 2 and wm["verified"] and wm["attestations_failed"] == 0
    assert all(ber == 0.0 for ber in wm["final_ber"].values())
    assert all(n > 0 for sealed in wm["sealed_bits"].values() for n in sealed)  # seal did it
    assert verify_run(tmp_path / "r").ok


def test_seal_measures_its_change_on_each_stage_training_inputs(
    tmp_path, small_digits, monkeypatch
):
    """The default seal metric: at each stage's end every trainer seals with the moments of
    the inputs its marked layer trained on in that stage (one per training image: the
    per-epoch evaluation passes do not count), and the run still verifies."""
    from clicooper.watermark.embed import StageWatermark

    counts: list[tuple[int, int]] = []
    real = StageWatermark.seal

    def spy(self, module, max_rounds=8, inputs=None, ridge=0.01):
        counts.append((inputs.count, inputs.total.shape[0]))
        return real(self, module, max_rounds, inputs, ridge)

    monkeypatch.setattr(StageWatermark, "seal", spy)
    session = _run(tmp_path, "r", small_digits, epochs=2)
    wm = session.results["watermark"]
    assert wm["verified"] and all(ber == 0.0 for ber in wm["final_ber"].values())
    assert len(counts) == 2 * 3  # 2 stages x 3 trainers
    assert all(n == len(small_digits.train) and width > 0 for n, width in counts)
