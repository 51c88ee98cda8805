"""``clicooper``: run, verify, claim and deploy client-cooperative split learning.

Every command takes a TOML config (``--config``) and flags (flags win), shows
progress on long work, and on bad input exits with status 2 and one line that
names the problem.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from typer.exceptions import TyperException

from clicooper.cli import train as _train  # noqa: F401  (registers `run` first)
from clicooper.cli.app import Opt, app, build_config, fail
from clicooper.cli.progress import console
from clicooper.runtime.rundirs import RunDir

if TYPE_CHECKING:
    from clicooper.watermark import VerifyReport
    from clicooper.watermark.anchor import Anchor


def _one_line_warning(
    message: Warning | str, category: type[Warning], *_: object, **__: object
) -> None:
    console.print(f"[yellow]warning:[/yellow] {message}", highlight=False, soft_wrap=True)


def _exit_interrupted() -> None:
    """Exit 130 at once after an interrupt whose cleanup has run.

    Not through ``sys.exit``: interrupted launches (Ctrl-C twice, 0.2 s apart) still
    died by SIGINT (status -2, no traceback) after their clean-up in about one run in
    ten, in the interpreter's finalization; with this exit, 0 in 28. Every node is
    stopped and every file written by now, so finalization has nothing left to do.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)


def main() -> None:
    """Entry point: usage errors become one line with exit status 2; warnings one line each."""
    warnings.showwarning = _one_line_warning
    try:
        code = app(standalone_mode=False)
    except typer.Exit as exc:
        if exc.exit_code == 130:
            _exit_interrupted()
        sys.exit(exc.exit_code)
    except typer.Abort:
        console.print("aborted")
        _exit_interrupted()
    except TyperException as exc:  # usage errors: bad flag, bad value, missing argument
        message = " ".join(exc.format_message().split())
        console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
        sys.exit(2 if exc.exit_code in (1, 2) else exc.exit_code)
    if code == 130:  # typer returns the code of an Exit raised by a command
        _exit_interrupted()
    sys.exit(code if isinstance(code, int) else 0)


ANCHOR_HELP = (
    "the verifier key's fingerprint published when the session ran (64 hex digits), "
    "the raw key, or an anchor file kept apart from the run directory"
)


def parse_anchor(value: str) -> Anchor:
    """``--anchor`` as an :class:`Anchor`; exit 2 with one line when it is not one."""
    from clicooper.watermark.anchor import Anchor

    try:
        return Anchor.parse(value)
    except (ValueError, OSError) as exc:
        fail(str(exc).splitlines()[0])
        raise  # unreachable


def check_bits(bits: int | None) -> None:
    """``--bits`` within the ledger's bound (exit 2 otherwise)."""
    from clicooper.watermark.chain import check_watermark_bits

    if bits is not None:
        try:
            check_watermark_bits(bits)
        except ValueError as exc:
            fail(f"--bits: {exc}")


def one_line(text: object) -> str:
    """``text`` as one line of plain text for the console: whitespace folded, markup escaped.

    Verification messages quote a run directory that anyone may have edited; rich must
    neither break them over lines nor read them as markup.
    """
    from rich.markup import escape

    return escape(" ".join(str(text).split()))


def holds_line(report: VerifyReport, secrets: Path) -> str:
    """The last line of a verification that holds: what it did and did not establish."""
    parts = [f"chain holds: {len(report.lines)} records verified"]
    if report.bers_checked:
        parts.append("BERs re-checked")
    else:
        parts.append(f"BERs NOT re-checked (no watermark secrets at {secrets}: pass --secrets)")
    if report.anchored:
        parts.append(f"anchored to verifier key {report.verifier_fingerprint}")
    else:
        parts.append(
            "self-consistent but UNANCHORED: pass --anchor with the fingerprint published when "
            f"the session ran (this ledger's verifier key: {report.verifier_fingerprint})"
        )
    return one_line("; ".join(parts))


@app.command()
def verify(
    run_dir: Annotated[Path, typer.Argument(help="run directory holding ledger.sqlite")],
    anchor: Annotated[str | None, Opt(help=ANCHOR_HELP)] = None,
    secrets: Annotated[
        Path | None, Opt(help="verifier's watermark secrets (default: RUN_DIR/verifier/...)")
    ] = None,
    ber_threshold: Annotated[float | None, Opt()] = None,
    bits: Annotated[int | None, Opt(help="watermark bits B (default: the ledger's)")] = None,
    config: Annotated[Path | None, Opt(help="TOML config; flags override it")] = None,
) -> None:
    """Check a run's ledger, audit copies and final segments; exit 0 only if all holds."""
    from rich.table import Table

    from clicooper.runtime.verification import verify_run

    cfg = build_config(config, **{"watermark.ber_threshold": ber_threshold, "watermark.bits": bits})
    if not RunDir(run_dir).ledger.is_file():
        fail(f"{run_dir} has no ledger.sqlite: give the directory of a clicooper run")
    expected = None if anchor is None else parse_anchor(anchor)
    check_bits(bits)
    secrets_file = _secrets_file(run_dir, secrets)
    report = verify_run(run_dir, cfg.watermark, secrets_file, bits, expected)
    table = Table(title=f"ledger of {run_dir}")
    for column in ("seq", "stage", "party", "kind", "signature", "link", "hash", "BER", "verdict"):
        table.add_column(column)
    mark = {True: "ok", False: "BAD", None: "-"}
    for line in report.lines:
        ber = "-" if line.ber is None else f"{line.ber:.4f}"
        verdict = line.verdict if line.verdict in ("ok", "not retained") else "FAIL"
        table.add_row(
            str(line.seq),
            str(line.stage),
            one_line(line.party),
            one_line(line.kind),
            mark[line.signature_ok],
            mark[line.link_ok],
            mark[line.hash_ok],
            ber,
            verdict,
        )

    console.print(table)
    if not report.ok:
        fail(f"chain does not hold: {one_line(report.first_failure)}", code=1)
    console.print(holds_line(report, secrets_file), highlight=False, soft_wrap=True)


def _secrets_file(run_dir: Path, secrets: Path | None) -> Path:
    """``--secrets`` (which must exist), else the verifier's file in the run directory."""
    from clicooper.parties.verifier import SECRETS_FILE

    if secrets is not None and not secrets.is_file():
        fail(f"no secrets file at {secrets}: pass the verifier's {SECRETS_FILE}")
    return secrets or RunDir(run_dir).verifier / SECRETS_FILE


@app.command()
def claim(
    run_dir: Annotated[Path, typer.Argument(help="run directory holding ledger.sqlite")],
    party: Annotated[str, Opt(help="the claiming trainer, e.g. t1")],
    segment: Annotated[Path, Opt(help="suspect segment (.safetensors)")],
    anchor: Annotated[str | None, Opt(help=f"required: {ANCHOR_HELP}")] = None,
    secret: Annotated[
        Path | None, Opt(help="the claimant's watermark secret (default: its party directory)")
    ] = None,
    secrets: Annotated[
        Path | None, Opt(help="verifier's watermark secrets (default: RUN_DIR/verifier/...)")
    ] = None,
    p_value: Annotated[float | None, Opt(help="claim holds at or below this p-value")] = None,
    bits: Annotated[int | None, Opt(help="watermark bits B: must be the ledger's")] = None,
    config: Annotated[Path | None, Opt(help="TOML config; flags override it")] = None,
) -> None:
    """Ownership claim on a suspect segment: exit 0 only when the claim holds.

    The run is verified first, anchored (signatures, links, audit copies, BERs, final
    segments); a ledger that does not verify is refused.
    """
    from clicooper.runtime.verification import verify_run
    from clicooper.watermark import Ledger, LedgerError, claim_inputs, load_segment
    from clicooper.watermark import claim as run_claim

    cfg = build_config(config, **{"watermark.claim_p_value": p_value, "watermark.bits": bits})
    if anchor is None:
        fail(
            "claim needs --anchor: pass the verifier key fingerprint published when the session "
            "ran (a ledger in a run directory proves nothing by itself)"
        )
    expected = parse_anchor(anchor)
    check_bits(bits)
    secret = secret or RunDir(run_dir).party(party) / "watermark.secret"
    if not secret.is_file():
        fail(f"no watermark secret at {secret}: pass --secret FILE of the claiming trainer")
    if not segment.is_file():
        fail(f"no suspect segment at {segment}: give a .safetensors file")
    if not RunDir(run_dir).ledger.is_file():
        fail(f"{run_dir} has no ledger.sqlite: give the directory of a clicooper run")
    secrets_file = _secrets_file(run_dir, secrets)
    try:
        suspect = load_segment(segment)
        claimant_secret = secret.read_bytes()
    except (ValueError, OSError) as exc:
        fail(str(exc).splitlines()[0])
    try:
        ledger = Ledger.open(RunDir(run_dir).ledger, readonly=True)
    except LedgerError as exc:
        fail(f"claim refused: the run does not verify: {one_line(exc)}", code=1)
    with ledger:
        report = verify_run(run_dir, cfg.watermark, secrets_file, None, expected, ledger)
        refused = _refusal(report, secrets_file)
        if refused:
            fail(f"claim refused: {one_line(refused)}", code=1)
        if bits is not None and bits != ledger.watermark_bits:
            fail(f"--bits {bits} is not the ledger's signed B = {ledger.watermark_bits}")
        try:
            inputs = claim_inputs(ledger, party, report)
        except LedgerError as exc:  # the ledger holds, but not for this party
            fail(one_line(exc))
        n_bits = ledger.watermark_bits
    result = run_claim(
        suspect,
        claimant_secret,
        inputs.commitment,
        inputs.prev_link,
        inputs.party_index,
        inputs.stage,
        inputs.param_name,
        n_bits,
        cfg.watermark.claim_p_value,
    )
    ber = "-" if result.ber is None else f"{result.ber:.4f}"
    console.print(
        f"party {one_line(party)}, stage {inputs.stage}, tensor {one_line(inputs.param_name)}: "
        f"matching bits {result.matching}/{result.n_bits}, BER {ber}, p-value {result.p_value:.3g}"
    )
    console.print(one_line(result.reason))
    if not result.holds:
        raise typer.Exit(1)


def _refusal(report: VerifyReport, secrets: Path) -> str | None:
    """Why a claim cannot rest on this verification (None: it can)."""
    if not report.ok:
        return f"the run does not verify: {report.first_failure}"
    if not report.bers_checked:
        return f"BERs were not re-checked (no verifier watermark secrets at {secrets})"
    return None


# the deployment and evaluation commands, registered after verify and claim
from clicooper.cli import deploy as _deploy  # noqa: E402,F401
from clicooper.cli import evaluate as _evaluate  # noqa: E402,F401
from clicooper.cli import node as _node  # noqa: E402,F401
