"""``clicooper``: run, verify, claim and deploy client-cooperative split learning.

Every command takes a TOML config (``--config``) and flags (flags win), shows
progress on long work, and on bad input exits with status 2 and one line that
names the problem.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from typer.exceptions import TyperException

from clicooper.cli.progress import console, summary_table, training_progress
from clicooper.config import ConfigError, RunConfig
from clicooper.data import DataError, default_dataset

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
        str | None, Opt(help="digits, fashion-mnist, mnist5k, an IDX dir or .npz")
    ] = None,
    mode: Annotated[str | None, Opt(help="centralized, vanilla or clicooper")] = None,
    trainers: Annotated[int | None, Opt(help="trainers in the chain (1-8)")] = None,
    epochs: Annotated[int | None, Opt()] = None,
    seed: Annotated[int | None, Opt()] = None,
    out: Annotated[Path, Opt(help="run directory")] = Path("runs/latest"),
    config: Annotated[Path | None, Opt(help="TOML config; flags override it")] = None,
    model: Annotated[str | None, Opt(help="mlp or cnn")] = None,
    cut: Annotated[str | None, Opt(help="named cut point of the preset")] = None,
    batch_size: Annotated[int | None, Opt()] = None,
    lr: Annotated[float | None, Opt()] = None,
    noise_multiplier: Annotated[float | None, Opt(help="noise std / clip norm")] = None,
    clip_norm: Annotated[float | None, Opt()] = None,
    mechanism: Annotated[str | None, Opt(help="gaussian or laplace")] = None,
    target_epsilon: Annotated[float | None, Opt(help="pick the noise for this epsilon")] = None,
    delta: Annotated[float | None, Opt()] = None,
    noise_at_inference: Annotated[
        bool | None, Opt("--noise-at-inference/--no-noise-at-inference")
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
) -> None:
    """Train with every party in this process (the embedded default)."""
    cfg = build_config(
        config,
        dataset=dataset,
        mode=mode,
        trainers=trainers,
        epochs=epochs,
        seed=seed,
        model=model,
        cut=cut,
        batch_size=batch_size,
        lr=lr,
        train_subset=train_subset,
        test_subset=test_subset,
        micro_batches=micro_batches,
        record=record,
        **{
            "privacy.noise_multiplier": noise_multiplier,
            "privacy.clip_norm": clip_norm,
            "privacy.mechanism": mechanism,
            "privacy.target_epsilon": target_epsilon,
            "privacy.delta": delta,
            "privacy.noise_at_inference": noise_at_inference,
            "labels.expansion": expansion,
            "labels.decoys": decoys,
            "labels.mode": label_mode,
        },
    )
    from clicooper.runtime.session import resolve_dataset
    from clicooper.runtime.session import run as run_session

    if cfg.dataset == "auto":
        cfg.dataset = default_dataset()
        console.print(f"dataset: {cfg.dataset} (auto: fashion-mnist when installed, else digits)")
    try:
        data = resolve_dataset(cfg, None)
        with training_progress(cfg.epochs, cfg.mode) as progress:
            session = run_session(cfg, out, data=data, progress=progress)
    except (DataError, ValueError) as exc:
        fail(str(exc).splitlines()[0])
    console.print(summary_table(session.results))
    console.print(f"run directory: {out}")


def main() -> None:
    """Entry point: usage errors become one line with exit status 2."""
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
