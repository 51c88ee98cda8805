"""Dynamic chained watermarking (DESIGN section 5).

Modules: :mod:`keys` (Ed25519 party keys, watermark secrets), :mod:`anchor` (the
session's trust anchor: the verifier key, held apart from the ledger), :mod:`embed`
(Uchida-style white-box watermark), :mod:`chain` (genesis link, per-stage
target bits, canonical segment hashes), :mod:`records` (signed records),
:mod:`ledger` (append-only SQLite ledger), :mod:`verify` (offline verification),
:mod:`claim` (ownership claims).
"""

from clicooper.watermark.anchor import Anchor, fingerprint
from clicooper.watermark.chain import (
    bits_hash,
    genesis_link,
    load_segment,
    save_segment,
    segment_bytes,
    segment_hash,
    stage_for_step,
    target_bits,
)
from clicooper.watermark.claim import ClaimInputs, ClaimResult, claim, claim_inputs
from clicooper.watermark.embed import InputMoments, StageWatermark, projection, select_weight
from clicooper.watermark.keys import PartyKey, commitment, new_watermark_secret, verify_signature
from clicooper.watermark.ledger import Ledger, LedgerError, PartyEntry
from clicooper.watermark.records import Record, canonical, from_canonical, link, sign
from clicooper.watermark.verify import RecordCheck, VerifyReport, verify_ledger

__all__ = [
    "Anchor",
    "ClaimInputs",
    "ClaimResult",
    "InputMoments",
    "Ledger",
    "LedgerError",
    "PartyEntry",
    "PartyKey",
    "Record",
    "RecordCheck",
    "StageWatermark",
    "VerifyReport",
    "bits_hash",
    "canonical",
    "claim",
    "claim_inputs",
    "commitment",
    "fingerprint",
    "from_canonical",
    "genesis_link",
    "link",
    "load_segment",
    "new_watermark_secret",
    "projection",
    "save_segment",
    "segment_bytes",
    "segment_hash",
    "select_weight",
    "sign",
    "stage_for_step",
    "target_bits",
    "verify_ledger",
    "verify_signature",
]
