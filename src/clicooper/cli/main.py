"""``clicooper``: run, verify, claim and deploy client-cooperative split learning.

Every command takes a TOML config (``--config``) and flags (flags win), shows
progress on long work, and on bad input exits with status 2 and one line that
names the problem.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from typer.exceptions import TyperException

from clicooper.cli.defaults import config_overrides, show_config_defaults
from clicooper.cli.progress import console, summary_table, training_progress
from clicooper.config import ConfigError, RunConfig
from clicooper.data import DataError
from clicooper.runtime.rundirs import RUNS_ROOT, new_run_dir, point_latest

if TYPE_CHECKING:
    from clicooper.watermark import VerifyReport
    from clicooper.watermark.anchor import Anchor

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Client-cooperative split learning with activation DP, secret label "
    "obfuscation and dynamic chained watermarking.",
)

Opt = typer.Option


@app.callback()
def _root() -> None:
    """Client-cooperative split learning (run ``clicooper COMMAND --help``)."""


def fail(message: str, code: int = 2) -> None:
    """Print one line to stderr and exit."""
    console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def build_config(config: Path | None, **flags: object) -> RunConfig:
    try:
        return RunConfig.load(config, **flags)
    except ConfigError as exc:
        fail(str(exc))
        raise  # unreachable


@app.command()
def run(
    dataset: Annotated[
        str | None, Opt(help="digits, fashion-mnist, mnist5k, an IDX dir, .npz or a dir of .npy")
    ] = None,
    channels_last: Annotated[
        bool | None,
        Opt(
            "--channels-last/--channels-first",
            help="axis order of 4-D user images (auto: the axis of size 1, 3 or 4)",
        ),
    ] = None,
    minmax_scale: Annotated[
        bool | None, Opt("--minmax-scale", help="map non-uint8 images to [0, 1] by min and max")
    ] = None,
    mode: Annotated[str | None, Opt(help="centralized, vanilla or clicooper")] = None,
    trainers: Annotated[int | None, Opt(help="trainers in the chain (1-8)")] = None,
    epochs: Annotated[int | None, Opt()] = None,
    seed: Annotated[int | None, Opt()] = None,
    out: Annotated[
        Path | None,
        Opt(help="run directory (default: a new runs/<UTC time>-<mode>, linked as runs/latest)"),
    ] = None,
    config: Annotated[Path | None, Opt(help="TOML config; flags override it")] = None,
    model: Annotated[str | None, Opt(help="mlp, cnn, cnn-light or resnet")] = None,
    cut: Annotated[str | None, Opt(help="named cut point of the preset")] = None,
    batch_size: Annotated[int | None, Opt()] = None,
    lr: Annotated[float | None, Opt(help="base learning rate (per party: lr_per_party)")] = None,
    optimizer: Annotated[str | None, Opt(help="adam, adamw or sgd (every party)")] = None,
    schedule: Annotated[str | None, Opt(help="lr schedule: constant, cosine or step")] = None,
    warmup_steps: Annotated[int | None, Opt(help="linear lr warm-up steps")] = None,
    weight_decay: Annotated[float | None, Opt()] = None,
    device: Annotated[
        str | None, Opt(help="auto, cpu, cuda[:N] or mps (per party: devices in --config)")
    ] = None,
    noise_multiplier: Annotated[float | None, Opt(help="noise std / clip norm")] = None,
    clip_norm: Annotated[float | None, Opt()] = None,
    mechanism: Annotated[str | None, Opt(help="gaussian or laplace")] = None,
    target_epsilon: Annotated[float | None, Opt(help="pick the noise for this epsilon")] = None,
    delta: Annotated[float | None, Opt()] = None,
    release: Annotated[
        str | None,
        Opt(help="every-epoch (the head trains) or once: a frozen head, one release per record"),
    ] = None,
    head_source: Annotated[
        str | None, Opt(help="where the frozen head comes from (--release once)")
    ] = None,
    warm_epochs: Annotated[
        int | None,
        Opt(help="release once: chain epochs on the public split's activations first (0: off)"),
    ] = None,
    denoise: Annotated[
        str | None,
        Opt(help="release once: post-mean (t1 trains on class-posterior means) or none"),
    ] = None,
    release_lr_factor: Annotated[
        float | None, Opt(help="release once: lr multiplier after the warm start")
    ] = None,
    noise_at_inference: Annotated[
        bool | None, Opt("--noise-at-inference/--no-noise-at-inference")
    ] = None,
    gradient_noise: Annotated[
        float | None, Opt(help="last trainer's gradient noise std / gradient clip (0: off)")
    ] = None,
    gradient_clip: Annotated[
        float | None, Opt(help="per-sample L2 clip of the gradients the last trainer sends back")
    ] = None,
    expansion: Annotated[int | None, Opt(help="pseudo-classes per true class (K)")] = None,
    decoys: Annotated[int | None, Opt(help="unused decoy pseudo-classes")] = None,
    label_mode: Annotated[str | None, Opt(help="keyed or feature")] = None,
    train_subset: Annotated[int | None, Opt(help="train on a seeded subset")] = None,
    test_subset: Annotated[int | None, Opt()] = None,
    micro_batches: Annotated[
        int | None, Opt(help="micro-batches in flight along the chain")
    ] = None,
    record: Annotated[int | None, Opt(help="samples per epoch each party records")] = None,
    watermark: Annotated[
        bool | None, Opt("--watermark/--no-watermark", help="watermark chain (clicooper mode)")
    ] = None,
    stage_steps: Annotated[int | None, Opt(help="watermark stage length in steps")] = None,
    threads: Annotated[int | None, Opt(help="torch threads per process")] = None,
    checkpoint_steps: Annotated[
        int | None, Opt(help="checkpoint every N steps too (0: at epoch and stage ends only)")
    ] = None,
    owner_secret: Annotated[
        Path | None, Opt(help="reuse an earlier run's owner/owner.secret: repeat that run")
    ] = None,
    overwrite: Annotated[bool, Opt(help="replace a run already in --out")] = False,
    resume: Annotated[
        Path | None,
        Opt(
            help="continue the unfinished in-process run in DIR (its own settings) from its "
            "last checkpoint"
        ),
    ] = None,
    transport: Annotated[str | None, Opt(help="inprocess or grpc (with --peers, --certs)")] = None,
    peers: Annotated[Path | None, Opt(help="peers file of served parties (grpc)")] = None,
    certs: Annotated[Path | None, Opt(help="the data owner's own bundle, OUT/do (grpc)")] = None,
) -> None:
    """Train with every party in this process (the embedded default)."""
    given = [name for name, value in locals().items() if value is not None and value is not False]
    flags = config_overrides(locals())
    flags["images.layout"] = _layout(channels_last)
    if resume is not None:
        cfg, out = _resumed(resume, [name for name in given if name != "resume"])
    else:
        cfg = build_config(config, **flags)
    from clicooper.cli.deploy import session_runner
    from clicooper.runtime.device import party_devices
    from clicooper.runtime.session import local_parties, resolve_dataset, warm_epochs

    how = "auto: fashion-mnist when installed, else digits" if dataset is None else "given"
    fresh = out is None
    try:
        party_devices(cfg, local_parties(cfg))  # an unusable device: one line, before the data
        if cfg.privacy.release == "once":  # an unknown head source fails before anything runs
            from clicooper.privacy.release import head_source

            head_source(cfg.head.source)
        data = resolve_dataset(cfg, None)
        batch = cfg.effective_batch_size(len(data.train))
        console.print(
            f"dataset: {cfg.dataset} ({how}); model {cfg.model}, {cfg.epochs} epochs, "
            f"batch size {batch}"
        )
        runner = session_runner(cfg, peers, certs, resume is not None)
        out = new_run_dir(RUNS_ROOT, cfg.mode) if out is None else out
        console.print(f"run directory: {out}")
        with training_progress(cfg.epochs + warm_epochs(cfg), cfg.mode) as progress:
            session = runner(cfg, out, data=data, progress=progress, overwrite=overwrite)
    except (DataError, ValueError) as exc:
        if fresh and out is not None:
            _drop_if_empty(out)
        fail(str(exc).splitlines()[0])
    if fresh:
        point_latest(out)
    console.print(summary_table(session.results))
    console.print(f"run directory: {out}")
    anchor = (session.results.get("watermark") or {}).get("anchor")
    if anchor:
        console.print(
            f"trust anchor (verifier key fingerprint): {anchor}\n"
            f"publish it now; `clicooper verify {out} --anchor {anchor}` and `clicooper claim` "
            "check the ledger against it"
        )


def _resumed(run_dir: Path, given: list[str]) -> tuple[RunConfig, Path]:
    """The settings and directory of the run ``--resume`` continues (exit 2 if none)."""
    from clicooper.runtime.resume import resumable_config

    if given:
        fail(
            f"--resume continues {run_dir} with its own settings ({run_dir}/config.toml): "
            f"leave out --{given[0].replace('_', '-')}"
        )
    try:
        return resumable_config(run_dir), run_dir
    except ValueError as exc:
        fail(str(exc).splitlines()[0])
        raise  # unreachable


def _drop_if_empty(path: Path) -> None:
    with contextlib.suppress(OSError):  # only an empty one: a failed fresh run leaves no debris
        path.rmdir()


show_config_defaults(run)


def _layout(channels_last: bool | None) -> str | None:
    if channels_last is None:
        return None
    return "channels-last" if channels_last else "channels-first"


def _one_line_warning(
    message: Warning | str, category: type[Warning], *_: object, **__: object
) -> None:
    console.print(f"[yellow]warning:[/yellow] {message}", highlight=False, soft_wrap=True)


def main() -> None:
    """Entry point: usage errors become one line with exit status 2; warnings one line each."""
    warnings.showwarning = _one_line_warning
    try:
        code = app(standalone_mode=False)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        console.print("aborted")
        sys.exit(130)
    except TyperException as exc:  # usage errors: bad flag, bad value, missing argument
        message = " ".join(exc.format_message().split())
        console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
        sys.exit(2 if exc.exit_code in (1, 2) else exc.exit_code)
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

    from clicooper.runtime.session import verify_run

    cfg = build_config(config, **{"watermark.ber_threshold": ber_threshold, "watermark.bits": bits})
    if not (run_dir / "ledger.sqlite").is_file():
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
    return secrets or run_dir / "verifier" / SECRETS_FILE


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
    from clicooper.runtime.session import verify_run
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
    secret = secret or run_dir / "parties" / party / "watermark.secret"
    if not secret.is_file():
        fail(f"no watermark secret at {secret}: pass --secret FILE of the claiming trainer")
    if not segment.is_file():
        fail(f"no suspect segment at {segment}: give a .safetensors file")
    if not (run_dir / "ledger.sqlite").is_file():
        fail(f"{run_dir} has no ledger.sqlite: give the directory of a clicooper run")
    secrets_file = _secrets_file(run_dir, secrets)
    try:
        suspect = load_segment(segment)
        claimant_secret = secret.read_bytes()
    except (ValueError, OSError) as exc:
        fail(str(exc).splitlines()[0])
    try:
        ledger = Ledger.open(run_dir / "ledger.sqlite", readonly=True)
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


from clicooper.cli import deploy as _deploy  # noqa: E402,F401
from clicooper.cli import evaluate as _evaluate  # noqa: E402,F401
