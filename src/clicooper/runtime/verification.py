"""Offline verification of a run directory: its ledger, audit copies, segments and BERs."""

from __future__ import annotations

import json
from pathlib import Path

from clicooper.config import WatermarkConfig
from clicooper.parties.verifier import SECRETS_FILE
from clicooper.runtime.rundirs import RunDir
from clicooper.watermark import Ledger, VerifyReport, verify_ledger
from clicooper.watermark.anchor import ANCHOR_FILE, Anchor

_MAX_SECRETS_BYTES = 1 << 20  # a secrets file of a thousand trainers is under 100 KiB


def run_anchor(run_dir: Path) -> Anchor | None:
    """The verifier's anchor file of a run it just finished here (None when it ran elsewhere).

    Only for the summary of the run that wrote it: a run directory that anyone else
    controls proves nothing about its own anchor; verify and claim take it from outside.
    """
    path = RunDir(run_dir).verifier / ANCHOR_FILE
    if not path.is_file():
        return None
    try:
        return Anchor.from_file(path)
    except (OSError, ValueError):
        return None


def load_secrets(path: Path) -> dict[str, bytes] | None:
    """The verifier's watermark secrets (``{"t1": hex, ...}``), or None when there is no file.

    ValueError (one line) for a file that is not one: too large, not a flat JSON object of
    hex strings.
    """
    if not path.is_file():
        return None
    problem = f"{path} is not a verifier secrets file"
    try:
        with open(path, "rb") as handle:
            raw = handle.read(_MAX_SECRETS_BYTES + 1)
        if len(raw) > _MAX_SECRETS_BYTES:
            raise ValueError(f"{problem} (over {_MAX_SECRETS_BYTES} bytes)")
        parsed = json.loads(raw.decode("utf-8"))
        return {str(k): bytes.fromhex(v) for k, v in parsed.items()}
    except (ValueError, AttributeError, TypeError, RecursionError, OSError):
        raise ValueError(problem) from None


def verify_run(
    run_dir: Path,
    wm: WatermarkConfig | None = None,
    secrets_file: Path | None = None,
    n_bits: int | None = None,
    anchor: Anchor | None = None,
    ledger: Ledger | None = None,
) -> VerifyReport:
    """Verify a run directory: ledger, audit copies, final segments, trainers' BER.

    ``n_bits`` overrides the watermark length the ledger records; ``wm`` gives the
    BER threshold; ``anchor`` the verifier key published when the session ran
    (without it the report is not ``anchored``); ``ledger``: an open ledger of this
    run (else ``run_dir/ledger.sqlite`` is opened). Never raises on a tampered run
    directory: every problem is a failure of the report.
    """
    wm = wm or WatermarkConfig()
    layout = RunDir(run_dir)
    try:
        secrets = load_secrets(secrets_file or layout.verifier / SECRETS_FILE)
    except ValueError as exc:
        return VerifyReport(ok=False, lines=[], first_failure=str(exc), failures=[str(exc)])
    return verify_ledger(
        layout.ledger if ledger is None else ledger,
        layout.audit,
        layout.segments,
        secrets,
        n_bits,
        wm.ber_threshold,
        anchor=anchor,
    )
