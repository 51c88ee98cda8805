"""Ownership claim on a suspect segment.

The claimant reveals its watermark secret ``w``; it must hash to the
commitment in the ledger. From the ledger it takes its latest stage ``t``, the
link ``L_{t-1}`` that closed the stage before, and its index ``i``. With
``A = projection(w, t)`` and ``b = target_bits(w, L_{t-1}, i, t)`` it reads
``b_hat = [(A w_suspect) > 0]`` and counts the matching bits ``m``. Under the
null hypothesis (the suspect weights never saw ``(A, b)``) ``m ~ Binomial(B, 1/2)``,
so the claim holds when ``p = P[X >= m] <= p_threshold`` (default 1e-6).

The secret alone proves nothing: the bits depend on the chain link, and the
ledger's signed records prove when and by whom the stage was trained. They prove
it only for a ledger that verifies against the session's trust anchor (the
verifier key published when it ran): :func:`claim_inputs` takes that report and
refuses any other. Every input then comes from signed fields: ``L_{t-1}`` from the
records, ``t`` is the ledger's last stage, the commitment and B are bound into
``L_0``, and the marked tensor is the ``param`` the trainer signed. What freedom a
claimant keeps, and why ``p <= 1e-6`` leaves margin for it, is in the README.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from clicooper.watermark.embed import StageWatermark
from clicooper.watermark.keys import commitment as commit
from clicooper.watermark.ledger import Ledger, LedgerError
from clicooper.watermark.records import link, trainer_index
from clicooper.watermark.verify import VerifyReport


@dataclass(frozen=True)
class ClaimResult:
    """Outcome: ``matching`` of ``n_bits`` bits agree; ``p_value = P[Bin(B, 1/2) >= matching]``."""

    holds: bool
    matching: int
    n_bits: int
    ber: float | None
    p_value: float
    reason: str


@dataclass(frozen=True)
class ClaimInputs:
    """What a trainer's claim needs from the ledger: its latest stage and the link before it."""

    party_index: int
    stage: int
    prev_link: bytes
    commitment: bytes
    param_name: str


def _rejected(n_bits: int, reason: str) -> ClaimResult:
    return ClaimResult(holds=False, matching=0, n_bits=n_bits, ber=None, p_value=1.0, reason=reason)


def claim(
    suspect_state: dict[str, torch.Tensor],
    secret: bytes,
    commitment: bytes,
    prev_link: bytes,
    party_index: int,
    stage: int,
    param_name: str,
    n_bits: int = 256,
    p_threshold: float = 1e-6,
    expected_shape: Sequence[int] | None = None,
) -> ClaimResult:
    """Test whether ``suspect_state[param_name]`` carries the claimant's stage watermark."""
    if not hmac.compare_digest(commit(secret), bytes(commitment)):
        return _rejected(n_bits, "the secret does not match the commitment")
    weight = suspect_state.get(param_name)
    if not isinstance(weight, torch.Tensor):
        return _rejected(n_bits, f"the suspect has no tensor {param_name!r}")
    if expected_shape is not None and tuple(weight.shape) != tuple(expected_shape):
        return _rejected(
            n_bits,
            f"tensor {param_name!r} has shape {tuple(weight.shape)}, the watermarked one "
            f"{tuple(expected_shape)}: the layer was resized",
        )
    mark = StageWatermark.derive(
        secret, prev_link, party_index, stage, param_name, weight.numel(), n_bits
    )
    matching = int((mark.extract({param_name: weight}) == mark.bits.bool()).sum())
    ber = 1.0 - matching / n_bits
    from scipy.stats import binom  # here: scipy.stats costs every party process a second

    p_value = float(binom.sf(matching - 1, n_bits, 0.5))
    holds = p_value <= p_threshold
    verdict = "holds" if holds else "does not hold"
    reason = (
        f"{matching}/{n_bits} bits match, p = {p_value:.3g} "
        f"({'<=' if holds else '>'} {p_threshold:g}): the claim {verdict}"
    )
    return ClaimResult(holds, matching, n_bits, ber, p_value, reason)


def claim_inputs(ledger: Ledger, party: str, verified: VerifyReport) -> ClaimInputs:
    """The latest stage of trainer ``party`` in ``ledger`` and the link that closed the one before.

    ``verified``: the report of an anchored verification of this ledger (verify_ledger
    with ``anchor``); LedgerError unless it holds and is anchored.
    """
    if not (verified.ok and verified.anchored):
        why = verified.first_failure if not verified.ok else "it was not checked against an anchor"
        raise LedgerError(f"a claim needs a ledger that verifies, anchored: {why}")
    entry = ledger.party(party)
    if entry.commitment is None:
        raise LedgerError(f"{party} is not a trainer: only trainers hold watermarks")
    stage_end = {0: ledger.genesis}
    latest = None
    for record in ledger.records():
        stage_end[record.stage] = link(record)
        if record.party == party:
            latest = record
    if latest is None:
        raise LedgerError(f"{party} has no records in this ledger: there is nothing to claim")
    return ClaimInputs(
        party_index=trainer_index(party),
        stage=latest.stage,
        prev_link=stage_end[latest.stage - 1],
        commitment=entry.commitment,
        param_name=str(latest.body["param"]),
    )
