"""Ownership claims: hold on the chain's weights, pruned or fine-tuned; fail otherwise."""

from __future__ import annotations

import os

import pytest
import torch
from scipy.stats import binom
from torch import nn

from clicooper.watermark.anchor import Anchor
from clicooper.watermark.claim import ClaimResult, claim, claim_inputs
from clicooper.watermark.embed import StageWatermark
from clicooper.watermark.keys import commitment
from clicooper.watermark.ledger import Ledger, LedgerError
from clicooper.watermark.records import link
from clicooper.watermark.verify import VerifyReport, verify_ledger


def anchored_report(chain, ledger: Ledger) -> VerifyReport:
    """The full verification, anchored to the chain's real verifier key."""
    return verify_ledger(
        ledger,
        chain.audit_dir,
        chain.final_dir,
        chain.secrets,
        anchor=Anchor(chain.keys["verifier"].public_bytes()),
    )


def claim_t1(
    chain, state: dict[str, torch.Tensor], secret: bytes | None = None, **kw
) -> ClaimResult:
    with Ledger.open(chain.ledger_path, readonly=True) as ledger:
        inputs = claim_inputs(ledger, "t1", anchored_report(chain, ledger))
    return claim(
        state,
        secret or chain.secrets["t1"],
        inputs.commitment,
        inputs.prev_link,
        inputs.party_index,
        inputs.stage,
        inputs.param_name,
        **kw,
    )


def final_t1(chain) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in chain.stage_states[(3, "t1")].items()}


def test_claim_inputs_come_from_the_latest_stage(built_chain) -> None:
    with Ledger.open(built_chain.ledger_path, readonly=True) as ledger:
        report = anchored_report(built_chain, ledger)
        assert report.ok and report.anchored and report.bers_checked
        inputs = claim_inputs(ledger, "t2", report)
        records = ledger.records()
        assert (inputs.party_index, inputs.stage, inputs.param_name) == (2, 3, "weight")
        assert inputs.prev_link == link(records[9])  # last record of stage 2
        assert inputs.commitment == commitment(built_chain.secrets["t2"])
        with pytest.raises(LedgerError, match="not a trainer"):
            claim_inputs(ledger, "do", report)
        with pytest.raises(LedgerError, match="not registered"):
            claim_inputs(ledger, "t9", report)


def test_claim_inputs_refuse_an_unanchored_or_failed_verification(built_chain) -> None:
    with Ledger.open(built_chain.ledger_path, readonly=True) as ledger:
        unanchored = verify_ledger(ledger, built_chain.audit_dir, None, built_chain.secrets)
        assert unanchored.ok and not unanchored.anchored
        with pytest.raises(LedgerError, match="not checked against an anchor"):
            claim_inputs(ledger, "t1", unanchored)
        wrong = verify_ledger(ledger, anchor=Anchor(os.urandom(32)))
        assert not wrong.ok and "trust anchor mismatch" in wrong.first_failure
        with pytest.raises(LedgerError, match="trust anchor mismatch"):
            claim_inputs(ledger, "t1", wrong)


def test_claim_holds_on_the_watermarked_weights(built_chain) -> None:
    result = claim_t1(built_chain, final_t1(built_chain))
    assert result.holds and result.matching == 256 and result.ber == 0.0
    assert result.p_value == pytest.approx(2.0**-256)
    assert "holds" in result.reason


def test_claim_survives_half_magnitude_pruning(built_chain) -> None:
    state = final_t1(built_chain)
    w = state["weight"]
    w[w.abs() <= w.abs().median()] = 0.0
    assert float((w == 0).float().mean()) >= 0.5
    result = claim_t1(built_chain, state)
    assert result.holds, result.reason
    assert result.p_value == pytest.approx(float(binom.sf(result.matching - 1, 256, 0.5)))


def test_claim_survives_fine_tuning_and_overwriting(built_chain) -> None:
    """A thief fine-tunes the stolen layer on its own task while embedding its own mark."""
    segment = nn.Linear(32, 32)
    segment.load_state_dict(final_t1(built_chain))
    thief = StageWatermark.derive(os.urandom(32), os.urandom(32), 1, 1, "weight", 1024, 256, 0.01)
    gen = torch.Generator().manual_seed(7)
    x, y = torch.randn(64, 32, generator=gen), torch.randn(64, 32, generator=gen)
    opt = torch.optim.Adam(segment.parameters(), lr=1e-3)
    for _ in range(300):  # until the thief's own mark has fully taken hold
        opt.zero_grad()
        (nn.functional.mse_loss(segment(x), y) + thief.regulariser(segment)).backward()
        opt.step()
        if thief.ber(segment) == 0.0:
            break
    assert thief.ber(segment) == 0.0
    result = claim_t1(built_chain, {k: v.detach() for k, v in segment.state_dict().items()})
    assert result.holds, result.reason  # ... and the original owner's claim still holds


def test_claim_fails_for_independent_segments(built_chain) -> None:
    torch.manual_seed(99)
    for _ in range(20):
        result = claim_t1(built_chain, nn.Linear(32, 32).state_dict())
        assert not result.holds and result.p_value > 1e-6
        assert "does not hold" in result.reason


def test_claim_fails_with_a_wrong_secret(built_chain) -> None:
    result = claim_t1(built_chain, final_t1(built_chain), secret=os.urandom(32))
    assert not result.holds and result.reason == "the secret does not match the commitment"
    # another party's real secret does not open t1's commitment either
    other = claim_t1(built_chain, final_t1(built_chain), secret=built_chain.secrets["t2"])
    assert not other.holds


def test_claim_fails_on_a_resized_or_missing_layer(built_chain) -> None:
    state = final_t1(built_chain)
    resized = {"weight": state["weight"][:16], "bias": state["bias"][:16]}
    result = claim_t1(built_chain, resized, expected_shape=(32, 32))
    assert not result.holds and "resized" in result.reason
    assert not claim_t1(built_chain, resized).holds  # without the shape: a 512-dim projection
    missing = claim_t1(built_chain, {"bias": state["bias"]})
    assert not missing.holds and "no tensor 'weight'" in missing.reason
